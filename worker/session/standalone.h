// Single-process training (`lmsgd-worker --standalone --job_file FILE`): the training loop of
// train/training_loop.h with k = 1 (virtual workers allowed), no coordinator.
//
// Resuming from the checkpoint directory's LATEST restores weights, BN statistics, momentum
// and the iteration, after checking that the checkpoint is this recipe's (kn and seed); the
// loop then computes exactly what the uninterrupted run would have.
#pragma once

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lmsgd/v1/job.pb.h"
#include "worker/backend/network.h"
#include "worker/train/trainer.h"
#include "worker/train/training_loop.h"

namespace lmsgd::session {

struct StandaloneOptions {
  int threads = 0;                  // compute threads (0 = cores)
  int data_threads = 0;             // 0: dataset.decode_threads, else 2 (train::DataThreads)
  bool resume = true;               // continue from the checkpoint dir's LATEST if there is one
  uint64_t stop_after_iterations = 0;  // stop (with a checkpoint) after this many; 0 = run to the end
  int log_every = 0;                // iterations between progress lines (0 = per epoch only)
  bool evaluate = true;
  int cuda_device = -1;             // >= 0: train on this GPU (the job's device must be DEVICE_CUDA)
  std::ostream* log = nullptr;      // progress lines (null: none)
  // Rewritten atomically after every epoch with the run's history (common/history.h: JSON
  // lines, or CSV for a ".csv" path). A resumed run keeps the file's records up to its resume
  // epoch. Empty: none.
  std::string history_file;
};

struct StandaloneResult {
  uint64_t iterations = 0;  // completed steps (total, including before a resume)
  std::vector<train::EpochSummary> epochs;
  std::vector<v1::EpochRecord> history;  // what history_file holds (also without one)
  std::string last_checkpoint;
  backend::OpTimes op_times;  // summed over the run
};

// `trainer_out`, when given, receives the trainer (tests inspect the final weights).
absl::StatusOr<StandaloneResult> RunStandalone(const v1::JobSpec& spec, const StandaloneOptions& options,
                                               std::unique_ptr<train::Trainer>* trainer_out = nullptr);

}  // namespace lmsgd::session
