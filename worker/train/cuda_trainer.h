// The GPU trainer: the whole step on one CUDA device (backend/cuda/device_step.h: forward,
// backward with NCCL gradient buckets, fused SGD), built only when CMake finds CUDA.
//
// The weights, BN statistics and momentum live on the device. ExportState copies them into
// store()/sgd() (momentum from the device order to the store's), ImportState the other way.
// Evaluation uses a second, inference-only network that gets the weights through the store.
// Virtual workers are not implemented here: one worker per GPU.
#pragma once

#include <memory>

#include "worker/train/trainer.h"

namespace lmsgd::backend::cuda {
class GpuResNet;
class DeviceStep;
}  // namespace lmsgd::backend::cuda
namespace lmsgd::comm {
class NcclCommunicator;
}

namespace lmsgd::train {

class CudaTrainer final : public Trainer {
 public:
  // FAILED_PRECONDITION naming the device when there is no such GPU (the CPU stays available).
  static absl::StatusOr<std::unique_ptr<CudaTrainer>> Create(const TrainerConfig& config);
  ~CudaTrainer() override;

  // k > 1: bootstraps NCCL through peers.store and rebuilds the step with the peers' buckets
  // (the momentum is kept).
  absl::Status ConnectPeers(const PeerGroup& peers) override;
  absl::StatusOr<StepStats> Step(uint64_t iteration, const float* images, const int32_t* labels) override;
  bool TakesPixels() const override { return spec_.in_channels == 3; }
  absl::StatusOr<StepStats> StepPixels(uint64_t iteration, const uint8_t* pixels, const int32_t* labels) override;
  absl::StatusOr<EvalCounts> Evaluate(const data::Dataset& dataset, uint32_t rank, uint32_t world,
                                      int threads) override;
  absl::Status ExportState() override;
  absl::Status ImportState() override;
  bool SumsGradientsOnHost() const override { return false; }
  std::string DescribeExchange() const override;
  uint64_t bytes_reduced() const override { return bytes_reduced_; }
  backend::Network& network() override;

 private:
  CudaTrainer();
  absl::StatusOr<std::unique_ptr<backend::cuda::GpuResNet>> CreateNet(bool training, int batch, int height,
                                                                      int width);
  absl::Status RebuildStep(size_t bucket_bytes, size_t first_bucket_bytes);
  // The step after `stage` has put the batch on the device.
  absl::StatusOr<StepStats> StepStaged(uint64_t iteration, const std::function<absl::Status()>& stage);

  std::unique_ptr<backend::cuda::GpuResNet> net_;
  std::unique_ptr<backend::cuda::DeviceStep> step_;
  std::unique_ptr<backend::cuda::GpuResNet> eval_;
  std::unique_ptr<comm::NcclCommunicator> nccl_;
  bool bf16_gradients_ = false;  // PeerGroup::gradient_wire: NCCL sums the buckets as bf16
  uint64_t bytes_reduced_ = 0;
};

// The device's presence, for a check before a worker joins anything: FAILED_PRECONDITION
// naming the device and what this machine has.
absl::Status CheckCudaDevice(int cuda_device);

}  // namespace lmsgd::train
