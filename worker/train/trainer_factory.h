// The one place that decides which trainer a configuration gets: the CPU trainer (oneDNN) for
// cuda_device < 0, the GPU trainer for cuda:N. CMake compiles trainer_factory_cuda.cc when it
// finds CUDA and trainer_factory_cpu.cc otherwise, so no shared code asks which build it is.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "worker/train/trainer.h"

namespace lmsgd::train {

absl::StatusOr<std::unique_ptr<Trainer>> CreateTrainer(const TrainerConfig& config);

// OK when cuda:`cuda_device` can be trained on here; otherwise FAILED_PRECONDITION naming the
// device and why (no GPU, too few, or a build without CUDA).
absl::Status CheckDeviceAvailable(int cuda_device);

// Compute threads for the CPU backend (0 = all cores); returns the number in use.
int SetComputeThreads(int threads);

}  // namespace lmsgd::train
