#include "worker/trainer.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/stopwatch.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/data/loader.h"
#ifdef LMSGD_HAVE_CUDA
#include "worker/backend/cuda/device.h"
#include "worker/backend/cuda/gpu_trainer.h"
#include "worker/backend/cuda/resnet.h"
#endif

namespace lmsgd::train {
namespace {
using Clock = SteadyClock;
}  // namespace

// The GPU side of a trainer: the device-resident network and step (params, grads, BN
// statistics and momentum live on the GPU), and an inference network for evaluation.
struct Trainer::Gpu {
#ifdef LMSGD_HAVE_CUDA
  backend::cuda::GpuResNet* net = nullptr;  // owned by Trainer::net_
  std::unique_ptr<backend::cuda::GpuTrainer> step;
  std::unique_ptr<backend::cuda::GpuResNet> eval;
  comm::NcclCommunicator* nccl = nullptr;
  backend::cuda::GpuTrainerOptions step_options;
#endif
};

Trainer::~Trainer() {
  // The GPU step and evaluation network go before the training network they use.
  gpu_.reset();
}

#ifdef LMSGD_HAVE_CUDA
namespace {
absl::StatusOr<std::unique_ptr<backend::cuda::GpuResNet>> CreateGpuNet(const TrainerConfig& c,
                                                                       const model::ResNetSpec& spec,
                                                                       model::ParamStore* store,
                                                                       const backend::NetworkOptions& o) {
  auto n = cuda::DeviceCount();
  if (!n.ok()) return n.status();
  if (*n == 0 || c.cuda_device >= *n) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device cuda:", c.cuda_device, ": ", *n == 0 ? "no CUDA device on this machine (no GPU or no driver)"
                                                     : absl::StrCat("only ", *n, " CUDA device(s) here"),
        "; the CPU backend stays available (--device cpu)"));
  }
  backend::cuda::GpuOptions g;
  g.device = c.cuda_device;
  g.precision = c.precision == ComputePrecision::kBf16   ? backend::cuda::Precision::kBf16
                : c.precision == ComputePrecision::kTf32 ? backend::cuda::Precision::kTf32
                                                         : backend::cuda::Precision::kFp32;
  return backend::cuda::GpuResNet::Create(spec, store, o, g);
}
}  // namespace
#endif

uint64_t Trainer::global_batch() const {
  return static_cast<uint64_t>(config_.world_size) * config_.virtual_workers * config_.per_worker_batch;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const TrainerConfig& c) {
  if (c.per_worker_batch < 1 || c.virtual_workers < 1 || c.world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("per_worker_batch=", c.per_worker_batch, " virtual_workers=",
                                                   c.virtual_workers, " world_size=", c.world_size, " must be >= 1"));
  }
  auto t = std::unique_ptr<Trainer>(new Trainer());
  t->config_ = c;
  auto spec = model::MakeResNet(c.arch, c.in_channels, c.num_classes);
  if (!spec.ok()) return spec.status();
  t->spec_ = *spec;
  t->store_ = std::make_unique<model::ParamStore>(t->spec_);
  if (auto st = t->store_->Load(model::InitializeParameters(t->spec_, {c.seed, c.zero_init_last_bn_gamma})); !st.ok()) {
    return st;
  }
  t->sgd_ = std::make_unique<optim::Sgd>(c.sgd, t->store_->OptimizerParams());
  backend::NetworkOptions o;
  o.batch = c.per_worker_batch;
  o.height = c.height;
  o.width = c.width;
  o.bn_group = c.bn_group;
  if (c.cuda_device >= 0) {
#ifdef LMSGD_HAVE_CUDA
    if (c.virtual_workers > 1) {
      return absl::UnimplementedError(absl::StrCat("virtual workers (", c.virtual_workers,
                                                   " per worker) are not implemented on the GPU backend: run one "
                                                   "worker per GPU (virtual_workers_per_worker = 1)"));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<backend::cuda::GpuResNet> gnet, CreateGpuNet(c, t->spec_, t->store_.get(), o));
    t->gpu_ = std::make_unique<Gpu>();
    t->gpu_->net = gnet.get();
    t->net_ = std::move(gnet);
    RETURN_IF_ERROR(t->gpu_->net->UploadState(*t->store_));
    t->gpu_->step_options.sgd = c.sgd;
    ASSIGN_OR_RETURN(t->gpu_->step,
                     backend::cuda::GpuTrainer::Create(t->gpu_->net, nullptr, t->gpu_->step_options));
    return t;
#else
    return absl::FailedPreconditionError(absl::StrCat(
        "device cuda:", c.cuda_device, ": this build has no CUDA backend (configured without LMSGD_WITH_CUDA); "
        "use --device cpu"));
#endif
  }
  auto net = backend::onednn::CreateResNet(t->spec_, t->store_.get(), o);
  if (!net.ok()) return net.status();
  t->net_ = std::move(*net);
  if (c.virtual_workers > 1) t->accum_.assign(t->store_->grads().size(), 0.0f);
  return t;
}

absl::StatusOr<StepStats> Trainer::Step(uint64_t iteration, const float* images, const int32_t* labels,
                                        GradientReducer* reducer) {
  StepStats s;
#ifdef LMSGD_HAVE_CUDA
  if (gpu_) {
    if (config_.world_size > 1 && gpu_->nccl == nullptr) {
      return absl::FailedPreconditionError("GPU training with more than one worker needs an NCCL communicator");
    }
    (void)reducer;
    const auto t0 = Clock::now();
    const double kn = static_cast<double>(global_batch());
    s.lr = LearningRate(config_.schedule, iteration);
    auto step = [&]() -> absl::StatusOr<double> {
      RETURN_IF_ERROR(gpu_->net->StageBatch(images, labels));
      RETURN_IF_ERROR(gpu_->step->Step(kn, s.lr, MomentumCorrection(config_.schedule, iteration)));
      return gpu_->step->Finish();
    };
    auto loss = step();
    if (!loss.ok()) {
      return absl::Status(loss.status().code(), absl::StrCat("step ", iteration, " (GPU): ", loss.status().message()));
    }
    s.loss = *loss;
    // Forward, backward, the overlapped allreduce and SGD all run on the device; the host
    // waits once, so the step's time is reported as backward.
    s.backward_s = SecondsSince(t0);
    return s;
  }
#endif
  const int m = config_.virtual_workers, n = config_.per_worker_batch;
  const size_t per = static_cast<size_t>(config_.in_channels) * config_.height * config_.width;
  const double kn = static_cast<double>(global_batch());
  auto& grads = store_->grads();
  for (int j = 0; j < m; ++j) {
    auto t0 = Clock::now();
    auto loss = net_->ForwardTrain(images + per * n * j, labels + static_cast<size_t>(n) * j, kn, j, m);
    if (!loss.ok()) {
      return absl::Status(loss.status().code(),
                          absl::StrCat("step ", iteration, ", virtual worker ", j, ": ", loss.status().message()));
    }
    s.loss += *loss;
    s.forward_s += SecondsSince(t0);
    t0 = Clock::now();
    const bool last = j == m - 1;
    absl::Status st;
    if (!last) {
      st = net_->Backward(nullptr);
      if (st.ok()) {
        if (j == 0) {
          std::copy(grads.begin(), grads.end(), accum_.begin());
        } else {
          for (size_t i = 0; i < grads.size(); ++i) accum_[i] += grads[i];
        }
      }
    } else {
      st = net_->Backward([&](size_t p) {
        if (m > 1) {
          float* g = store_->grad(p);
          const float* a = accum_.data() + store_->param_offset(p);
          const int64_t size = store_->param_specs()[p].numel();
          for (int64_t i = 0; i < size; ++i) g[i] += a[i];
        }
        reducer->GradReady(p);
      });
    }
    s.backward_s += SecondsSince(t0);
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("step ", iteration, ", virtual worker ", j, ": ", st.message()));
    }
  }
  auto t0 = Clock::now();
  if (auto st = reducer->Finish(); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("step ", iteration, ": gradient allreduce: ", st.message()));
  }
  s.reduce_wait_s = SecondsSince(t0);
  t0 = Clock::now();
  s.lr = LearningRate(config_.schedule, iteration);
  if (auto st = sgd_->Step(s.lr, MomentumCorrection(config_.schedule, iteration)); !st.ok()) return st;
  s.optimizer_s = SecondsSince(t0);
  return s;
}

absl::Status Trainer::AttachNccl(comm::NcclCommunicator* nccl, size_t bucket_bytes, size_t first_bucket_bytes) {
#ifdef LMSGD_HAVE_CUDA
  if (!gpu_) return absl::FailedPreconditionError("AttachNccl on a CPU trainer");
  std::vector<float> velocity;
  RETURN_IF_ERROR(gpu_->step->DownloadVelocity(&velocity));
  gpu_->nccl = nccl;
  if (bucket_bytes > 0) gpu_->step_options.bucket_bytes = bucket_bytes;
  if (first_bucket_bytes > 0) gpu_->step_options.first_bucket_bytes = first_bucket_bytes;
  gpu_->step.reset();
  ASSIGN_OR_RETURN(gpu_->step, backend::cuda::GpuTrainer::Create(gpu_->net, nccl, gpu_->step_options));
  return gpu_->step->UploadVelocity(velocity);
#else
  (void)nccl;
  (void)bucket_bytes;
  (void)first_bucket_bytes;
  return absl::FailedPreconditionError("AttachNccl: this build has no CUDA backend");
#endif
}

absl::Status Trainer::SyncHostState() {
#ifdef LMSGD_HAVE_CUDA
  if (!gpu_) return absl::OkStatus();
  RETURN_IF_ERROR(gpu_->net->DownloadState(store_.get()));
  std::vector<float> device_order, flat(store_->params().size());
  RETURN_IF_ERROR(gpu_->step->DownloadVelocity(&device_order));
  gpu_->net->DeviceToStoreOrder(device_order.data(), flat.data());
  std::vector<std::vector<float>> velocity(store_->num_params());
  for (size_t i = 0; i < store_->num_params(); ++i) {
    const float* v = flat.data() + store_->param_offset(i);
    velocity[i].assign(v, v + store_->param_specs()[i].numel());
  }
  return sgd_->SetVelocity(velocity);
#else
  return absl::OkStatus();
#endif
}

absl::Status Trainer::HostStateChanged() {
#ifdef LMSGD_HAVE_CUDA
  if (!gpu_) return absl::OkStatus();
  RETURN_IF_ERROR(gpu_->net->UploadState(*store_));
  std::vector<float> flat(store_->params().size()), device_order(flat.size());
  for (size_t i = 0; i < store_->num_params(); ++i) {
    const std::vector<float>& v = sgd_->velocity()[i];
    std::copy(v.begin(), v.end(), flat.begin() + store_->param_offset(i));
  }
  gpu_->net->StoreToDeviceOrder(flat.data(), device_order.data());
  return gpu_->step->UploadVelocity(device_order);
#else
  return absl::OkStatus();
#endif
}

absl::StatusOr<EvalCounts> Trainer::Evaluate(const data::Dataset& ds, uint32_t rank, uint32_t world, int threads) {
  const int batch = config_.eval_batch > 0 ? config_.eval_batch : config_.per_worker_batch;
#ifdef LMSGD_HAVE_CUDA
  if (gpu_) {
    // The weights and BN statistics reach the evaluation network through the store (the
    // momentum stays on the device: evaluation does not need it).
    RETURN_IF_ERROR(gpu_->net->DownloadState(store_.get()));
    if (!gpu_->eval) {
      backend::NetworkOptions o;
      o.batch = batch;
      o.height = ds.height();
      o.width = ds.width();
      o.training = false;
      ASSIGN_OR_RETURN(gpu_->eval, CreateGpuNet(config_, spec_, store_.get(), o));
    }
    RETURN_IF_ERROR(gpu_->eval->UploadState(*store_));
  }
#endif
  if (!eval_net_ && !gpu_) {
    backend::NetworkOptions o;
    o.batch = batch;
    o.height = ds.height();
    o.width = ds.width();
    o.training = false;
    auto net = backend::onednn::CreateResNet(spec_, store_.get(), o);
    if (!net.ok()) return net.status();
    eval_net_ = std::move(*net);
  }
  std::vector<uint64_t> indices;
  for (uint64_t i = rank; i < ds.size(); i += world) indices.push_back(i);
  data::LoaderOptions lo;
  lo.batch = batch;
  lo.train = false;
  lo.threads = threads;
  lo.pad_last = true;
  data::BatchLoader loader(&ds, std::move(indices), lo);
  EvalCounts counts;
  const int K = config_.num_classes;
  std::vector<float> logits(static_cast<size_t>(batch) * K);
  for (uint64_t b = 0; b < loader.num_batches(); ++b) {
    auto next = loader.Next(absl::Minutes(10));
    if (!next.ok()) return absl::Status(next.status().code(), absl::StrCat("evaluation: ", next.status().message()));
    const data::Batch& bt = **next;
    absl::Status st;
#ifdef LMSGD_HAVE_CUDA
    if (gpu_) st = gpu_->eval->PredictOnDevice(bt.images.data(), logits.data());
#endif
    if (!gpu_) st = eval_net_->Predict(bt.images.data(), logits.data());
    if (!st.ok()) return st;
    for (int i = 0; i < bt.valid; ++i) {
      const float* z = &logits[static_cast<size_t>(i) * K];
      const float target = z[bt.labels[i]];
      // Rank of the true class: how many classes score strictly higher (ties favour the label).
      int higher = 0;
      for (int k = 0; k < K; ++k) higher += z[k] > target;
      counts.examples++;
      counts.top1_correct += higher < 1;
      counts.top5_correct += higher < 5;
    }
  }
  return counts;
}

}  // namespace lmsgd::train
