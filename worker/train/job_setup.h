// From a (defaults-applied, validated) JobSpec to the pieces a worker trains with: the
// trainer configuration and the training / validation datasets.
#pragma once

#include <memory>

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
  std::unique_ptr<data::Dataset> train;
  std::unique_ptr<data::Dataset> val;  // null when the job has none
};
// Opens the job's datasets and checks them against the spec (example count, classes, size);
// errors name the path and the mismatch.
absl::StatusOr<Datasets> OpenDatasets(const v1::JobSpec& spec);

// The loader for one rank's training epoch: the rank's examples in WorkerOrder (its virtual
// workers' shards interleaved), batches of m*n, starting at batch `first_batch` (resume).
std::unique_ptr<data::BatchLoader> MakeEpochLoader(const v1::JobSpec& spec, const data::Dataset* train,
                                                   uint32_t epoch, uint32_t rank, uint32_t world_size,
                                                   uint64_t first_batch, int data_threads,
                                                   data::PixelFormat format = data::PixelFormat::kFloatChw);

}  // namespace lmsgd::train
