// From a (defaults-applied, validated) JobSpec to the pieces a worker trains with: the
// trainer configuration and the training / validation datasets.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "lmsgd/v1/job.pb.h"
#include "worker/data/dataset.h"
#include "worker/data/loader.h"
#include "worker/train/trainer.h"

namespace lmsgd::train {

absl::StatusOr<TrainerConfig> TrainerConfigFromJob(const v1::JobSpec& spec, const v1::Schedule& schedule);

// The worker's device (--device: cuda_device >= 0 for cuda:N, -1 for cpu) must be the job's
// (JobSpec.device); FAILED_PRECONDITION names both otherwise.
absl::Status CheckDevice(const v1::JobSpec& spec, int cuda_device);

// Decoder threads: the --data_threads flag when > 0, else the job's dataset.decode_threads
// when > 0, else 2. Standalone and distributed workers use this one rule.
int DataThreads(const v1::JobSpec& spec, int flag);

struct Datasets {
  std::unique_ptr<data::Dataset> train;  // null only in an evaluation job without one
  std::unique_ptr<data::Dataset> val;    // null when the job has none
};
// Opens the job's datasets and checks them against the spec (example count, classes, size);
// errors name the path and the mismatch. An evaluation job (JOB_MODE_EVALUATE) opens the
// training set only when it names one (for its classes), and needs the validation set.
absl::StatusOr<Datasets> OpenDatasets(const v1::JobSpec& spec);

// A fresh trainer's state from JobSpec.init_checkpoint (none: nothing to do, iteration 0), by
// its init_mode: the weights and BN buffers; the momentum too (INIT_WEIGHTS_AND_MOMENTUM,
// INIT_CONTINUE); and for INIT_CONTINUE the iteration to start at: the checkpoint's, or its
// epoch's first under this schedule when kn differs (as an elastic re-formation resumes).
// Writes store() and sgd(); the caller imports them. `log` may be null.
struct InitFromCheckpoint {
  uint64_t start_iteration = 0;
  bool has_epoch = false;  // the file said which epoch its weights finished (an lmsgd checkpoint)
  uint32_t epoch = 0;
};
absl::StatusOr<InitFromCheckpoint> ApplyInitCheckpoint(const v1::JobSpec& spec, const v1::Schedule& schedule,
                                                       Trainer& trainer,
                                                       const std::function<void(const std::string&)>& log);

// The loader for one rank's training epoch: the rank's examples in WorkerOrder (its virtual
// workers' shards interleaved), batches of m*n, starting at batch `first_batch` (resume).
std::unique_ptr<data::BatchLoader> MakeEpochLoader(const v1::JobSpec& spec, const data::Dataset* train,
                                                   uint32_t epoch, uint32_t rank, uint32_t world_size,
                                                   uint64_t first_batch, int data_threads,
                                                   data::PixelFormat format = data::PixelFormat::kFloatChw);

}  // namespace lmsgd::train
