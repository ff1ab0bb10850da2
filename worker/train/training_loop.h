// The epoch loop of every worker: standalone (k = 1, session/standalone.h) and each rank of a
// coordinated generation (session/distributed.h) run this same function.
//
// From `start_iteration` (0, or a resumed checkpoint's), for each epoch e up to spec.epochs:
//   1. the rank's shard of the permutation for (seed, e), split k ways (data/sampler.h), in
//      batches of m*n, from the iteration's place in the epoch; one Trainer::Step per batch
//      (iterations_per_epoch = floor(N / kn) of them);
//   2. with k > 1, the ranks' BN running statistics replaced by their mean (the
//      average_bn_statistics hook): each rank's running statistics follow its own groups only,
//      and the running statistics are linear in the groups' statistics, so the mean over the
//      ranks is exactly what one process with k*m virtual workers holds. Evaluation and the
//      checkpoint (rank 0's) then see one model, the same on every rank;
//   3. the sharded evaluation: each rank counts its part of the validation set and the
//      sum_eval_counts hook sums the counts over the ranks;
//   4. every checkpoint_interval_epochs (and after the last epoch) the rank that writes
//      checkpoints (rank 0) exports the trainer's state and writes one.
// Data order and augmentation are functions of (seed, epoch, index), so a run resumed at
// iteration t computes exactly what the uninterrupted run would have.
//
// An evaluation job (JOB_MODE_EVALUATE) runs step 3 alone, once, on the weights it was given:
// one EpochSummary numbered LoopOptions::evaluated_epoch, with no steps, through on_epoch_end.
//
// The hooks let a session report without the loop knowing about coordinators: none of them
// may block for long (the distributed session queues its RPCs on a background thread).
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lmsgd/v1/job.pb.h"
#include "worker/train/job_setup.h"
#include "worker/train/trainer.h"

namespace lmsgd::train {

struct StepReport {
  uint32_t epoch = 0;        // 0-based, the epoch the step belongs to
  uint64_t iteration = 0;    // steps completed, this one included
  StepStats stats;
  double data_wait_s = 0;    // waiting for the loader before this step
  double worker_images_per_second = 0;  // this worker's rate over the epoch so far
};

struct EpochSummary {
  uint32_t epoch = 0;        // 1-based
  uint64_t iteration = 0;    // steps completed at the epoch's end
  double mean_loss = 0;      // mean over the epoch's steps of the global loss (this rank's share x k)
  double lr = 0;             // the last step's rate
  double images_per_second = 0;  // the job's (k workers) over the epoch's training time
  double train_seconds = 0, seconds = 0, data_wait_seconds = 0;
  uint64_t steps = 0;        // this call's steps of the epoch (fewer than an epoch's after a resume)
  double forward_seconds = 0, backward_seconds = 0, reduce_wait_seconds = 0, optimizer_seconds = 0;  // sums
  int64_t corrupt_skipped = 0;   // unreadable examples the loader skipped this epoch
  bool evaluated = false;
  EvalCounts eval;           // summed over the ranks
};

// The history record of an epoch (common/history.h): per-step means of the time split, the
// evaluation's errors when there was one. `generation` and the time are the caller's to set.
v1::EpochRecord ToEpochRecord(const EpochSummary& summary, uint32_t world_size, uint64_t global_batch);

struct LoopHooks {
  std::function<bool()> stop_requested;                            // polled before every step
  std::function<void(const StepReport&)> on_step;
  std::function<void(const EpochSummary&)> on_epoch_trained;       // before evaluation
  std::function<absl::Status()> average_bn_statistics;             // null: one rank
  std::function<absl::Status(EvalCounts*)> sum_eval_counts;        // null: one rank
  std::function<void(const EpochSummary&)> on_epoch_end;           // after evaluation
  std::function<void(const std::string& path, uint32_t epochs_done, uint64_t iteration)> on_checkpoint;
  // Checkpoints retention must keep whatever their age (checkpoint.h): the one the job's
  // record points at and those not yet acknowledged. Null: none (the standalone case).
  std::function<std::set<std::string>()> retained_checkpoints;
};

struct LoopOptions {
  uint32_t rank = 0, world_size = 1;
  int data_threads = 2;
  bool evaluate = true;
  bool write_checkpoints = true;       // this rank writes them (rank 0); needs spec.checkpoint_dir
  uint64_t stop_after_iterations = 0;  // stop, with a checkpoint, after this many; 0 = the end
  uint32_t evaluated_epoch = 0;        // an evaluation job: the epoch its weights finished (0: unknown)
  int log_every = 0;                   // iterations between progress lines (0: per epoch only)
  // Tests only: sleep this long while waiting for each batch, as a slow input pipeline would.
  absl::Duration test_data_delay = absl::ZeroDuration();
  std::function<void(const std::string&)> log;
};

// Where a loop that did not finish stopped: the session decides what each means (the
// distributed one re-forms the generation after kStopRequested, kStep, kAverageBnStatistics
// and kSumEvalCounts,
// which a peer or the coordinator caused, and fails the job after the others).
enum class LoopPhase {
  kNone, kStopRequested, kData, kStep, kAverageBnStatistics, kEvaluate, kSumEvalCounts, kCheckpoint
};
const char* LoopPhaseName(LoopPhase phase);

struct LoopResult {
  absl::Status status;                   // OK: finished, or stopped at stop_after_iterations
  LoopPhase failed_in = LoopPhase::kNone;
  uint64_t iterations = 0;               // steps completed, including those before a resume
  std::vector<EpochSummary> epochs;      // the epochs this call completed
  std::string last_checkpoint;
};

LoopResult RunTrainingLoop(const v1::JobSpec& spec, const v1::Schedule& schedule, Trainer& trainer,
                           const Datasets& datasets, uint64_t start_iteration, const LoopOptions& options,
                           const LoopHooks& hooks);

}  // namespace lmsgd::train
