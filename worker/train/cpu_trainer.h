// The CPU trainer: the step on the oneDNN ResNet (backend/onednn), with virtual workers.
//
// With m virtual workers the groups 0..m-2 run forward and backward and their gradients
// accumulate in `accum_`; the last group's backward adds the accumulated sum to each
// parameter's gradient as it becomes final and reports it to the gradient exchange, which
// starts summing it over the k workers while backward continues. With m = 1 nothing is
// accumulated or copied.
#pragma once

#include <memory>
#include <vector>

#include "worker/train/trainer.h"

namespace lmsgd::train {

class CpuTrainer final : public Trainer {
 public:
  static absl::StatusOr<std::unique_ptr<CpuTrainer>> Create(const TrainerConfig& config);

  absl::Status ConnectPeers(const PeerGroup& peers) override;
  // Sums gradients with `exchange` from now on (tests compare exchanges; ConnectPeers builds
  // the BucketedExchange).
  void UseGradientExchange(std::unique_ptr<GradientExchange> exchange) { exchange_ = std::move(exchange); }
  absl::StatusOr<StepStats> Step(uint64_t iteration, const float* images, const int32_t* labels) override;
  absl::StatusOr<EvalCounts> Evaluate(const data::Dataset& dataset, uint32_t rank, uint32_t world,
                                      int threads) override;
  absl::Status ExportState() override { return absl::OkStatus(); }
  absl::Status ImportState() override { return absl::OkStatus(); }
  bool SumsGradientsOnHost() const override { return true; }
  std::string DescribeExchange() const override;
  uint64_t bytes_reduced() const override { return exchange_ ? exchange_->bytes_reduced() : 0; }
  backend::Network& network() override { return *net_; }

 private:
  CpuTrainer() = default;
  std::unique_ptr<backend::Network> net_;
  std::unique_ptr<backend::Network> eval_net_;
  std::unique_ptr<GradientExchange> exchange_;  // null: this worker's gradients alone
  std::vector<float> accum_;                    // gradient accumulator for m > 1
};

}  // namespace lmsgd::train
