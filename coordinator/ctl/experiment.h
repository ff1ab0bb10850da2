// Experiment files (proto/lmsgd/v1/experiment.proto): parsing, validation that names the bad
// field, and expansion into runs.
//
// An arm is the base JobSpec with the arm's fields replaced; its kn is reached through
// virtual workers (m = kn / (k n)) or the world size (k = kn / (m n)), never by changing n,
// the BN group. The learning rate follows from the arm's lr_scaling (the paper's linear rule
// by default), so arms never state an lr. Runs are arm x seed, in file order: the explicit
// arms, then the sweep's product (kn outermost), each arm for every seed.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lmsgd/v1/experiment.pb.h"
#include "lmsgd/v1/job.pb.h"

namespace lmsgd::ctl {

struct PlannedRun {
  std::string arm;
  uint64_t seed = 0;
  bool reference = false;
  v1::JobSpec spec;  // defaults applied, validated; name "<experiment>/<arm>/seed<S>"
  // "<arm>.seed<S>": the run's files in the report directory.
  std::string key() const;
};

// Reads a .textproto / .json experiment file.
absl::StatusOr<v1::Experiment> ReadExperimentFile(const std::string& path);

// INVALID_ARGUMENT naming every bad field ("arms[2].kn: ...", "reference: ..."), or the runs.
// `standalone`: every arm at k = 1 (kn through virtual workers whatever kn_via says).
absl::StatusOr<std::vector<PlannedRun>> PlanExperiment(const v1::Experiment& experiment, bool standalone);

// "gradual", "none", "linear", "sqrt": the short names the report and arm names use.
std::string WarmupName(v1::WarmupKind kind);
std::string ScalingName(v1::LrScaling scaling);

}  // namespace lmsgd::ctl
