// The factory of a build with CUDA: the GPU trainer for cuda:N, the CPU trainer otherwise.
#include "worker/backend/onednn/resnet.h"
#include "worker/train/cpu_trainer.h"
#include "worker/train/cuda_trainer.h"
#include "worker/train/trainer_factory.h"

namespace lmsgd::train {

absl::Status CheckDeviceAvailable(int cuda_device) {
  if (cuda_device < 0) return absl::OkStatus();
  return CheckCudaDevice(cuda_device);
}

absl::StatusOr<std::unique_ptr<Trainer>> CreateTrainer(const TrainerConfig& config) {
  if (config.cuda_device >= 0) {
    auto t = CudaTrainer::Create(config);
    if (!t.ok()) return t.status();
    return std::unique_ptr<Trainer>(std::move(*t));
  }
  auto t = CpuTrainer::Create(config);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Trainer>(std::move(*t));
}

int SetComputeThreads(int threads) { return backend::onednn::SetNumThreads(threads); }

}  // namespace lmsgd::train
