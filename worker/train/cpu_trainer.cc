#include "worker/train/cpu_trainer.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/stopwatch.h"
#include "worker/backend/onednn/resnet.h"

namespace lmsgd::train {

absl::StatusOr<std::unique_ptr<CpuTrainer>> CpuTrainer::Create(const TrainerConfig& c) {
  RETURN_IF_ERROR(backend::onednn::CheckPrecision(c.precision));
  auto t = std::unique_ptr<CpuTrainer>(new CpuTrainer());
  RETURN_IF_ERROR(t->InitCommon(c));
  backend::NetworkOptions o;
  o.batch = c.per_worker_batch;
  o.height = c.height;
  o.width = c.width;
  o.bn_group = c.bn_group;
  o.precision = c.precision;
  ASSIGN_OR_RETURN(t->net_, backend::onednn::CreateResNet(t->spec_, t->store_.get(), o));
  if (c.virtual_workers > 1) t->accum_.assign(t->store_->grads().size(), 0.0f);
  return t;
}

absl::Status CpuTrainer::ConnectPeers(const PeerGroup& peers) {
  if (peers.world_size != config_.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("a trainer for ", config_.world_size, " workers cannot join ",
                                                   peers.world_size, " peers"));
  }
  if (peers.world_size <= 1) {
    exchange_.reset();
    return absl::OkStatus();
  }
  if (peers.communicator == nullptr) return absl::InvalidArgumentError("ConnectPeers: no communicator");
  exchange_ = std::make_unique<BucketedExchange>(peers, store_.get());
  return absl::OkStatus();
}

std::string CpuTrainer::DescribeExchange() const {
  return exchange_ ? exchange_->Describe() : std::string("gradients of this worker alone (k = 1)");
}

absl::StatusOr<StepStats> CpuTrainer::Step(uint64_t iteration, const float* images, const int32_t* labels) {
  StepStats s;
  const int m = config_.virtual_workers, n = config_.per_worker_batch;
  const size_t per = static_cast<size_t>(config_.in_channels) * config_.height * config_.width;
  const double kn = static_cast<double>(global_batch());
  auto& grads = store_->grads();
  for (int j = 0; j < m; ++j) {
    // Built only on an error: the step's hot path allocates nothing for it.
    auto where = [&] { return absl::StrCat("step ", iteration, ", virtual worker ", j); };
    auto t0 = SteadyClock::now();
    auto loss = net_->ForwardTrain(images + per * n * j, labels + static_cast<size_t>(n) * j, kn, j, m);
    if (!loss.ok()) return Annotate(loss.status(), where());
    s.loss += *loss;
    s.forward_s += SecondsSince(t0);
    t0 = SteadyClock::now();
    absl::Status st;
    if (j < m - 1) {
      st = net_->Backward(nullptr);
      if (st.ok() && j == 0) std::copy(grads.begin(), grads.end(), accum_.begin());
      if (st.ok() && j > 0) {
        for (size_t i = 0; i < grads.size(); ++i) accum_[i] += grads[i];
      }
    } else {
      st = net_->Backward([&](size_t p) {
        if (m > 1) {
          float* g = store_->grad(p);
          const float* a = accum_.data() + store_->param_offset(p);
          const int64_t size = store_->param_specs()[p].numel();
          for (int64_t i = 0; i < size; ++i) g[i] += a[i];
        }
        if (exchange_) exchange_->GradReady(p);
      });
    }
    s.backward_s += SecondsSince(t0);
    if (!st.ok()) return Annotate(st, where());
  }
  auto t0 = SteadyClock::now();
  if (exchange_) {
    if (auto st = exchange_->Finish(); !st.ok()) {
      return Annotate(st, absl::StrCat("step ", iteration, ": gradient allreduce"));
    }
  }
  s.reduce_wait_s = SecondsSince(t0);
  t0 = SteadyClock::now();
  s.lr = LearningRate(config_.schedule, iteration);
  RETURN_IF_ERROR(sgd_->Step(s.lr, MomentumCorrection(config_.schedule, iteration)));
  s.optimizer_s = SecondsSince(t0);
  return s;
}

absl::StatusOr<EvalCounts> CpuTrainer::Evaluate(const data::Dataset& ds, uint32_t rank, uint32_t world, int threads) {
  const int batch = config_.eval_batch > 0 ? config_.eval_batch : config_.per_worker_batch;
  if (!eval_net_) {
    backend::NetworkOptions o;
    o.batch = batch;
    o.height = ds.height();
    o.width = ds.width();
    o.training = false;
    o.precision = config_.precision;
    ASSIGN_OR_RETURN(eval_net_, backend::onednn::CreateResNet(spec_, store_.get(), o));
  }
  return CountCorrect(ds, rank, world, threads, batch,
                      [&](const float* images, float* logits) { return eval_net_->Predict(images, logits); });
}

}  // namespace lmsgd::train
