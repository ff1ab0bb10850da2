// The one interface every trainer (CPU: cpu_trainer.h, GPU: cuda_trainer.h) implements, and
// what the training loop and the sessions see of it. Which one is built is decided in one
// place, trainer_factory.h, chosen by CMake.
//
// Step(t) for a worker holding m virtual workers of n examples (paper section 2.2 / 5.1):
//   for j in 0..m-1:  loss_j = Forward(group j) with BN statistics per bn_group samples and
//                     the loss normalized by the GLOBAL minibatch kn = k * m * n;
//                     Backward(group j), gradients of the m groups summed locally;
//   the gradients are summed over the k workers while backward runs (gradient_exchange.h),
//   then the SGD step with lr(t) and the momentum correction lr(t)/lr(t-1).
// Summing normalized gradients over k*m groups is exactly the gradient of the mean loss over
// kn samples: m virtual workers in one process simulate m*k workers (what the paper did for
// kn >= 12k).
//
// State: the ParamStore (weights, BN statistics) and the optimizer (momentum) on the host are
// the trainer's state as far as checkpoints and broadcasts are concerned. A trainer whose step
// runs elsewhere (a GPU) copies it out with ExportState (before a checkpoint or reading the
// weights) and in with ImportState (after loading a checkpoint or receiving a broadcast); on
// the CPU both are no-ops.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/lr_schedule.h"
#include "worker/backend/network.h"
#include "worker/backend/precision.h"
#include "worker/data/dataset.h"
#include "worker/model/param_store.h"
#include "worker/model/resnet.h"
#include "worker/optim/sgd.h"
#include "worker/train/gradient_exchange.h"

namespace lmsgd::train {

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
  // >= 0: train on this CUDA device (the whole step on the GPU); -1: the CPU (oneDNN).
  int cuda_device = -1;
  backend::Precision precision = backend::Precision::kFp32;
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
  virtual ~Trainer() = default;

  // From now on gradients are summed over `peers` (k > 1). Until then, or with k = 1, each
  // step uses this worker's gradients alone.
  virtual absl::Status ConnectPeers(const PeerGroup& peers) = 0;
  // One synchronous SGD step on m*n examples (images (m*n, C, H, W), labels (m*n)).
  virtual absl::StatusOr<StepStats> Step(uint64_t iteration, const float* images, const int32_t* labels) = 0;
  // Whether the trainer also takes 8-bit pixels (m*n, H, W, C), not normalized, and
  // normalizes them itself with ImageNet's mean and std (data/resize.h): the GPU trainer does,
  // on the device, so a quarter of the bytes are staged. The loop asks the loader for them
  // when the dataset can produce them (Dataset::SupportsUint8).
  virtual bool TakesPixels() const { return false; }
  virtual absl::StatusOr<StepStats> StepPixels(uint64_t iteration, const uint8_t* pixels, const int32_t* labels) {
    (void)iteration, (void)pixels, (void)labels;
    return absl::UnimplementedError("this trainer takes normalized float images only");
  }
  // Top-1/top-5 counts over the examples of `dataset` with index % world == rank (sum the
  // counts over ranks for the whole set). Inference-mode BN (running statistics).
  virtual absl::StatusOr<EvalCounts> Evaluate(const data::Dataset& dataset, uint32_t rank, uint32_t world,
                                              int threads) = 0;
  // The state's copies between where the step runs and store()/sgd() (see the top of this file).
  virtual absl::Status ExportState() = 0;
  virtual absl::Status ImportState() = 0;
  // Whether the gradients go over the host Communicator (its lanes carry them) or over a
  // device library of the trainer's own (NCCL), which leaves the Communicator one lane.
  virtual bool SumsGradientsOnHost() const = 0;
  // One line for the log: the gradient exchange (buckets, lanes or NCCL) once connected.
  virtual std::string DescribeExchange() const = 0;
  // Gradient bytes summed over peers so far (metrics).
  virtual uint64_t bytes_reduced() const = 0;
  virtual backend::Network& network() = 0;

  std::string Describe() { return network().Describe(); }
  model::ParamStore& store() { return *store_; }
  optim::Sgd& sgd() { return *sgd_; }
  const model::ResNetSpec& spec() const { return spec_; }
  const TrainerConfig& config() const { return config_; }
  uint64_t global_batch() const {
    return static_cast<uint64_t>(config_.world_size) * config_.virtual_workers * config_.per_worker_batch;
  }

 protected:
  // Checks the configuration, builds the model spec, the store with the paper's
  // initialization (seeded) and the optimizer: what every trainer starts from.
  absl::Status InitCommon(const TrainerConfig& config);
  // The evaluation loop shared by the trainers: `predict` turns a batch of `batch` images into
  // logits (batch, classes).
  using PredictFn = std::function<absl::Status(const float* images, float* logits)>;
  absl::StatusOr<EvalCounts> CountCorrect(const data::Dataset& dataset, uint32_t rank, uint32_t world, int threads,
                                          int batch, const PredictFn& predict);

  TrainerConfig config_;
  model::ResNetSpec spec_;
  std::unique_ptr<model::ParamStore> store_;
  std::unique_ptr<optim::Sgd> sgd_;
};

}  // namespace lmsgd::train
