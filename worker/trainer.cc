#include "worker/trainer.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/data/loader.h"

namespace lmsgd::train {
namespace {
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

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
  auto net = backend::onednn::CreateResNet(t->spec_, t->store_.get(), o);
  if (!net.ok()) return net.status();
  t->net_ = std::move(*net);
  if (c.virtual_workers > 1) t->accum_.assign(t->store_->grads().size(), 0.0f);
  return t;
}

absl::StatusOr<StepStats> Trainer::Step(uint64_t iteration, const float* images, const int32_t* labels,
                                        GradientReducer* reducer) {
  StepStats s;
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
    s.forward_s += Since(t0);
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
    s.backward_s += Since(t0);
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("step ", iteration, ", virtual worker ", j, ": ", st.message()));
    }
  }
  auto t0 = Clock::now();
  if (auto st = reducer->Finish(); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("step ", iteration, ": gradient allreduce: ", st.message()));
  }
  s.reduce_wait_s = Since(t0);
  t0 = Clock::now();
  s.lr = LearningRate(config_.schedule, iteration);
  if (auto st = sgd_->Step(s.lr, MomentumCorrection(config_.schedule, iteration)); !st.ok()) return st;
  s.optimizer_s = Since(t0);
  return s;
}

absl::StatusOr<EvalCounts> Trainer::Evaluate(const data::Dataset& ds, uint32_t rank, uint32_t world, int threads) {
  const int batch = config_.eval_batch > 0 ? config_.eval_batch : config_.per_worker_batch;
  if (!eval_net_) {
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
    if (auto st = eval_net_->Predict(bt.images.data(), logits.data()); !st.ok()) return st;
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
