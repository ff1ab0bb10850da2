// The factory of a build without CUDA: the CPU trainer only.
#include "absl/strings/str_cat.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/train/cpu_trainer.h"
#include "worker/train/trainer_factory.h"

namespace lmsgd::train {

absl::Status CheckDeviceAvailable(int cuda_device) {
  if (cuda_device < 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "device cuda:", cuda_device, ": this build has no CUDA backend (configured without LMSGD_WITH_CUDA); "
      "use --device cpu"));
}

absl::StatusOr<std::unique_ptr<Trainer>> CreateTrainer(const TrainerConfig& config) {
  if (config.cuda_device >= 0) return CheckDeviceAvailable(config.cuda_device);
  auto t = CpuTrainer::Create(config);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Trainer>(std::move(*t));
}

int SetComputeThreads(int threads) { return backend::onednn::SetNumThreads(threads); }

}  // namespace lmsgd::train
