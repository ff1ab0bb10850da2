// From a (defaults-applied, validated) JobSpec to the pieces a worker trains with: the
// trainer configuration and the training / validation datasets.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "lmsgd/v1/job.pb.h"
#include "worker/data/dataset.h"
#include "worker/trainer.h"

namespace lmsgd::train {

absl::StatusOr<TrainerConfig> TrainerConfigFromJob(const v1::JobSpec& spec, const v1::Schedule& schedule);

struct Datasets {
  std::unique_ptr<data::Dataset> train;
  std::unique_ptr<data::Dataset> val;  // null when the job has none
};
// Opens the job's datasets and checks them against the spec (example count, classes, size);
// errors name the path and the mismatch.
absl::StatusOr<Datasets> OpenDatasets(const v1::JobSpec& spec);

}  // namespace lmsgd::train
