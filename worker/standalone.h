// Single-process training (`lmsgd-worker --standalone --job_file FILE`): the distributed
// worker's loop with k = 1 (virtual workers allowed), no coordinator.
//
// Per epoch e: the sampler's permutation for (seed, e) split 1 way, batches of m*n, one
// Trainer::Step each (iterations_per_epoch = floor(N / kn) of them), then evaluation on the
// validation set and, every checkpoint_interval_epochs (and at the end), a checkpoint.
// Resuming from a checkpoint restores weights, BN statistics, momentum and the iteration;
// data order and augmentation are functions of (seed, epoch, index), so a resumed run
// computes exactly what the uninterrupted run would have.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lmsgd/v1/job.pb.h"
#include "worker/trainer.h"

namespace lmsgd::train {

struct StandaloneOptions {
  int threads = 0;                  // compute threads (0 = cores)
  int data_threads = 0;             // 0 = dataset.decode_threads or 2
  bool resume = true;               // continue from the checkpoint dir's LATEST if there is one
  uint64_t stop_after_iterations = 0;  // stop (with a checkpoint) after this many; 0 = run to the end
  int log_every = 0;                // iterations between progress lines (0 = per epoch only)
  bool evaluate = true;
  int cuda_device = -1;             // >= 0: train on this GPU (the job's device must be DEVICE_CUDA)
  std::ostream* log = nullptr;      // progress lines (null: none)
};

struct EpochSummary {
  uint32_t epoch = 0;  // 1-based
  double mean_loss = 0, lr = 0, images_per_second = 0, seconds = 0;
  EvalCounts eval;
};

struct StandaloneResult {
  uint64_t iterations = 0;  // completed steps (total, including before a resume)
  std::vector<EpochSummary> epochs;
  std::string last_checkpoint;
  backend::OpTimes op_times;  // summed over the run
};

// `trainer_out`, when given, receives the trainer (tests inspect the final weights).
absl::StatusOr<StandaloneResult> RunStandalone(const v1::JobSpec& spec, const StandaloneOptions& options,
                                               std::unique_ptr<Trainer>* trainer_out = nullptr);

}  // namespace lmsgd::train
