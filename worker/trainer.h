// One worker's training step and evaluation, backend- and transport-neutral.
//
// Step(t) for a worker holding m virtual workers of n examples (paper section 2.2 / 5.1):
//   for j in 0..m-1:  loss_j = Forward(group j) with BN statistics per bn_group samples and
//                     the loss normalized by the GLOBAL minibatch kn = k * m * n;
//                     Backward(group j); gradients of groups 0..m-2 accumulate in `accum_`;
//   the last group's Backward reports each parameter's final gradient (accumulated sum) to the
//   GradientReducer as soon as it is ready (reverse layer order), which sums it over the k
//   workers (the allreduce) while backward continues;
//   reducer->Finish(); SGD step with lr(t) and the momentum correction lr(t)/lr(t-1).
// With m = 1 nothing is accumulated or copied. Summing normalized gradients over k*m groups
// is exactly the gradient of the mean loss over kn samples: m virtual workers in one process
// simulate m*k workers (what the paper did for kn >= 12k).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/lr_schedule.h"
#include "worker/backend/network.h"
#include "worker/data/dataset.h"
#include "worker/model/param_store.h"
#include "worker/model/resnet.h"
#include "worker/optim/sgd.h"

namespace lmsgd::comm {
class NcclCommunicator;
}

namespace lmsgd::train {

// Sums gradients across workers. GradReady(i) is called once per parameter per step, in
// reverse layer order, when grads[i] is final locally; Finish() returns when every gradient
// holds the sum over all workers (or an error naming what failed or timed out).
class GradientReducer {
 public:
  virtual ~GradientReducer() = default;
  virtual void GradReady(size_t param_index) = 0;
  virtual absl::Status Finish() = 0;
};

// k = 1: nothing to sum.
class LocalReducer final : public GradientReducer {
 public:
  void GradReady(size_t) override {}
  absl::Status Finish() override { return absl::OkStatus(); }
};

enum class ComputePrecision { kFp32, kTf32, kBf16 };

struct TrainerConfig {
  model::Arch arch = model::Arch::kResNet50;
  int in_channels = 3;
  int num_classes = 1000;
  int height = 224, width = 224;
  int per_worker_batch = 32;   // n
  int bn_group = 32;
  int virtual_workers = 1;     // m
  uint32_t world_size = 1;     // k
  LrScheduleParams schedule;
  optim::SgdConfig sgd;
  bool zero_init_last_bn_gamma = true;
  uint64_t seed = 1;
  int eval_batch = 0;          // 0 = per_worker_batch
  // >= 0: train on this CUDA device with the cuDNN backend, the whole step on the GPU
  // (GpuTrainer: NCCL buckets once AttachNccl is called, fused SGD); -1: the CPU (oneDNN).
  int cuda_device = -1;
  ComputePrecision precision = ComputePrecision::kFp32;  // GPU only; the CPU trains in fp32
};

struct StepStats {
  double loss = 0;     // this worker's share: sum over its groups of loss / kn
  double lr = 0;
  double forward_s = 0, backward_s = 0, reduce_wait_s = 0, optimizer_s = 0;
};

struct EvalCounts {
  uint64_t examples = 0, top1_correct = 0, top5_correct = 0;
};

class Trainer {
 public:
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const TrainerConfig& config);

  ~Trainer();

  // One synchronous SGD step on m*n examples (images (m*n, C, H, W), labels (m*n)).
  // On a GPU the gradients are summed by the attached NCCL communicator and `reducer` is not
  // used (it must be a LocalReducer when none is attached).
  absl::StatusOr<StepStats> Step(uint64_t iteration, const float* images, const int32_t* labels,
                                 GradientReducer* reducer);

  // GPU training: gradients allreduced by `nccl` (bucketed during backward) from now on.
  absl::Status AttachNccl(comm::NcclCommunicator* nccl, size_t bucket_bytes, size_t first_bucket_bytes);
  // On a GPU the weights, BN statistics and momentum live on the device: SyncHostState copies
  // them into store()/sgd() (before a checkpoint or reading the weights), HostStateChanged
  // copies store()/sgd() to the device (after loading a checkpoint or a broadcast). No-ops on
  // the CPU.
  absl::Status SyncHostState();
  absl::Status HostStateChanged();
  bool on_gpu() const { return gpu_ != nullptr; }

  // Top-1/top-5 counts over the examples of `dataset` with index % world == rank (sum the
  // counts over ranks for the whole set). Inference-mode BN (running statistics).
  absl::StatusOr<EvalCounts> Evaluate(const data::Dataset& dataset, uint32_t rank, uint32_t world, int threads);

  model::ParamStore& store() { return *store_; }
  optim::Sgd& sgd() { return *sgd_; }
  const model::ResNetSpec& spec() const { return spec_; }
  const TrainerConfig& config() const { return config_; }
  uint64_t global_batch() const;
  backend::Network& network() { return *net_; }
  std::string Describe() const { return net_->Describe(); }

 private:
  Trainer() = default;
  TrainerConfig config_;
  model::ResNetSpec spec_;
  std::unique_ptr<model::ParamStore> store_;
  std::unique_ptr<optim::Sgd> sgd_;
  std::unique_ptr<backend::Network> net_;
  std::unique_ptr<backend::Network> eval_net_;
  std::vector<float> accum_;  // gradient accumulator for m > 1
  struct Gpu;
  std::unique_ptr<Gpu> gpu_;  // set when training on a GPU
};

}  // namespace lmsgd::train
