#include "worker/train/cuda_trainer.h"

#include "worker/data/resize.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "common/stopwatch.h"
#include "worker/backend/cuda/device.h"
#include "worker/backend/cuda/device_step.h"
#include "worker/backend/cuda/resnet.h"
#include "worker/comm/nccl_communicator.h"
#include "worker/data/resize.h"

namespace lmsgd::train {

absl::Status CheckCudaDevice(int cuda_device) {
  ASSIGN_OR_RETURN(const int n, backend::cuda::DeviceCount());
  if (n > 0 && cuda_device < n) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "device cuda:", cuda_device, ": ", n == 0 ? "no CUDA device on this machine (no GPU or no driver)"
                                                : absl::StrCat("only ", n, " CUDA device(s) here"),
      "; the CPU backend stays available (--device cpu)"));
}

CudaTrainer::CudaTrainer() = default;

CudaTrainer::~CudaTrainer() {
  // The step and the evaluation network go before the training network they use, and the
  // step before the communicator it allreduces on.
  step_.reset();
  eval_.reset();
  net_.reset();
  nccl_.reset();
}

absl::StatusOr<std::unique_ptr<backend::cuda::GpuResNet>> CudaTrainer::CreateNet(bool training, int batch,
                                                                                 int height, int width) {
  backend::NetworkOptions o;
  o.batch = batch;
  o.height = height;
  o.width = width;
  o.bn_group = config_.bn_group;
  o.training = training;
  backend::cuda::GpuOptions g;
  g.device = config_.cuda_device;
  g.precision = config_.precision;
  return backend::cuda::GpuResNet::Create(spec_, store_.get(), o, g);
}

absl::StatusOr<std::unique_ptr<CudaTrainer>> CudaTrainer::Create(const TrainerConfig& c) {
  if (c.virtual_workers > 1) {
    return absl::UnimplementedError(absl::StrCat("virtual workers (", c.virtual_workers,
                                                 " per worker) are not implemented on the GPU backend: run one "
                                                 "worker per GPU (virtual_workers_per_worker = 1)"));
  }
  RETURN_IF_ERROR(CheckCudaDevice(c.cuda_device));
  auto t = std::unique_ptr<CudaTrainer>(new CudaTrainer());
  RETURN_IF_ERROR(t->InitCommon(c));
  ASSIGN_OR_RETURN(t->net_, t->CreateNet(true, c.per_worker_batch, c.height, c.width));
  RETURN_IF_ERROR(t->net_->UploadState(*t->store_));
  backend::cuda::DeviceStepOptions so;
  so.sgd = c.sgd;
  ASSIGN_OR_RETURN(t->step_, backend::cuda::DeviceStep::Create(t->net_.get(), nullptr, so));
  return t;
}

backend::Network& CudaTrainer::network() { return *net_; }

absl::Status CudaTrainer::RebuildStep(size_t bucket_bytes, size_t first_bucket_bytes) {
  std::vector<float> velocity;
  RETURN_IF_ERROR(step_->DownloadVelocity(&velocity));
  backend::cuda::DeviceStepOptions so;
  so.sgd = config_.sgd;
  if (bucket_bytes > 0) so.bucket_bytes = bucket_bytes;
  if (first_bucket_bytes > 0) so.first_bucket_bytes = first_bucket_bytes;
  so.bf16_gradients = bf16_gradients_;
  step_.reset();
  ASSIGN_OR_RETURN(step_, backend::cuda::DeviceStep::Create(net_.get(), nccl_.get(), so));
  return step_->UploadVelocity(velocity);
}

absl::Status CudaTrainer::ConnectPeers(const PeerGroup& peers) {
  if (peers.world_size != config_.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("a trainer for ", config_.world_size, " workers cannot join ",
                                                   peers.world_size, " peers"));
  }
  if (peers.world_size <= 1) return absl::OkStatus();
  if (peers.store == nullptr) return absl::InvalidArgumentError("ConnectPeers: no store for the NCCL bootstrap");
  // The old communicator (if any) goes only after the step that uses it.
  std::unique_ptr<comm::NcclCommunicator> old = std::move(nccl_);
  bf16_gradients_ = peers.gradient_wire == comm::WireDtype::kBf16;
  ASSIGN_OR_RETURN(nccl_, comm::NcclCommunicator::Create(static_cast<int>(peers.rank),
                                                         static_cast<int>(peers.world_size), config_.cuda_device,
                                                         peers.store, peers.key_prefix, peers.bootstrap_deadline));
  return Annotate(RebuildStep(peers.bucket_bytes, peers.first_bucket_bytes), "GPU step with NCCL buckets");
}

std::string CudaTrainer::DescribeExchange() const {
  if (!nccl_) return "gradients of this worker alone (k = 1)";
  return absl::StrFormat("gradients in %d NCCL buckets on the device%s", step_->buckets().size(),
                         bf16_gradients_ ? " (ncclBfloat16)" : "");
}

absl::StatusOr<StepStats> CudaTrainer::Step(uint64_t iteration, const float* images, const int32_t* labels) {
  return StepStaged(iteration, [&] { return net_->StageBatch(images, labels); });
}

absl::StatusOr<StepStats> CudaTrainer::StepPixels(uint64_t iteration, const uint8_t* pixels, const int32_t* labels) {
  backend::cuda::GpuResNet::PixelNormalization norm;
  for (int c = 0; c < 3; ++c) {
    norm.mul[c] = 1.0f / (255.0f * data::kImageNetStd[c]);
    norm.add[c] = -data::kImageNetMean[c] / data::kImageNetStd[c];
  }
  return StepStaged(iteration, [&] { return net_->StageBatchPixels(pixels, labels, norm); });
}

absl::StatusOr<StepStats> CudaTrainer::StepStaged(uint64_t iteration, const std::function<absl::Status()>& stage) {
  if (config_.world_size > 1 && nccl_ == nullptr) {
    return absl::FailedPreconditionError("GPU training with more than one worker needs ConnectPeers (NCCL)");
  }
  StepStats s;
  const auto t0 = SteadyClock::now();
  s.lr = LearningRate(config_.schedule, iteration);
  auto run = [&]() -> absl::StatusOr<double> {
    RETURN_IF_ERROR(stage());
    RETURN_IF_ERROR(step_->Step(static_cast<double>(global_batch()), s.lr, MomentumCorrection(config_.schedule, iteration)));
    return step_->Finish();
  };
  auto loss = run();
  if (!loss.ok()) return Annotate(loss.status(), absl::StrCat("step ", iteration, " (GPU)"));
  s.loss = *loss;
  if (nccl_) bytes_reduced_ += net_->param_floats() * sizeof(float);
  // Forward, backward, the overlapped allreduce and SGD all run on the device; the host waits
  // once, so the step's time is reported as backward.
  s.backward_s = SecondsSince(t0);
  return s;
}

absl::Status CudaTrainer::ExportState() {
  RETURN_IF_ERROR(net_->DownloadState(store_.get()));
  std::vector<float> device_order, flat(store_->params().size());
  RETURN_IF_ERROR(step_->DownloadVelocity(&device_order));
  net_->DeviceToStoreOrder(device_order.data(), flat.data());
  std::vector<std::vector<float>> velocity(store_->num_params());
  for (size_t i = 0; i < store_->num_params(); ++i) {
    const float* v = flat.data() + store_->param_offset(i);
    velocity[i].assign(v, v + store_->param_specs()[i].numel());
  }
  return sgd_->SetVelocity(velocity);
}

absl::Status CudaTrainer::ImportState() {
  RETURN_IF_ERROR(net_->UploadState(*store_));
  std::vector<float> flat(store_->params().size()), device_order(flat.size());
  for (size_t i = 0; i < store_->num_params(); ++i) {
    const std::vector<float>& v = sgd_->velocity()[i];
    std::copy(v.begin(), v.end(), flat.begin() + store_->param_offset(i));
  }
  net_->StoreToDeviceOrder(flat.data(), device_order.data());
  return step_->UploadVelocity(device_order);
}

absl::StatusOr<EvalCounts> CudaTrainer::Evaluate(const data::Dataset& ds, uint32_t rank, uint32_t world, int threads) {
  const int batch = config_.eval_batch > 0 ? config_.eval_batch : config_.per_worker_batch;
  // The weights and BN statistics reach the evaluation network through the store (the
  // momentum stays on the device: evaluation does not need it).
  RETURN_IF_ERROR(net_->DownloadState(store_.get()));
  if (!eval_) {
    ASSIGN_OR_RETURN(eval_, CreateNet(false, batch, ds.height(), ds.width()));
  }
  RETURN_IF_ERROR(eval_->UploadState(*store_));
  return CountCorrect(ds, rank, world, threads, batch,
                      [&](const float* images, float* logits) { return eval_->PredictOnDevice(images, logits); });
}

}  // namespace lmsgd::train
