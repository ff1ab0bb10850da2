// Runs an experiment's planned runs (experiment.h) one after another, in this process or
// through a coordinator, and keeps what each produced in the report directory:
//
//   experiment.textproto            the experiment as planned (provenance)
//   runs/<arm>.seed<S>.result.json  a finished run (v1::ExperimentRun), written atomically;
//                                   its presence, with the same JobSpec, is what "done" means
//   runs/<arm>.seed<S>.job          through a coordinator: the submitted job's id, so that a
//                                   resumed sweep waits for that job instead of submitting again
//   runs/<arm>.seed<S>.history.jsonl, .log, checkpoints/<arm>.seed<S>/   standalone runs; an
//                                   interrupted one resumes from its last checkpoint
// A resumed sweep (the same command again) skips finished runs, and re-runs one whose recorded
// JobSpec differs from the plan (the file changed). Standalone runs that fail stop the sweep
// (they would fail again: a bad path, a full disk); a coordinator job that fails or is
// cancelled is recorded as such and the sweep goes on. After every run the CSVs are
// rewritten (report.h), so a report of the finished runs can be rendered at any time.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "coordinator/ctl/experiment.h"
#include "lmsgd/v1/experiment.pb.h"

namespace lmsgd::ctl {

// The coordinator, as the runner uses it (lmsgdctl implements it over gRPC).
class JobService {
 public:
  virtual ~JobService() = default;
  virtual absl::StatusOr<std::string> Submit(const v1::JobSpec& spec) = 0;
  virtual absl::StatusOr<v1::JobStatus> Get(const std::string& job_id) = 0;
};

struct ExperimentOptions {
  std::string dir;                     // the report directory
  JobService* coordinator = nullptr;   // null: standalone, in this process
  int threads = 0;                     // standalone compute threads (0 = cores)
  absl::Duration poll = absl::Seconds(2);
  absl::Duration run_timeout = absl::Hours(24);  // a coordinator job that has not ended by then
  absl::Duration unreachable_timeout = absl::Seconds(60);  // coordinator unreachable this long
  std::ostream* log = nullptr;         // one line per run
};

absl::StatusOr<std::vector<v1::ExperimentRun>> RunExperiment(const v1::Experiment& experiment,
                                                             const std::vector<PlannedRun>& runs,
                                                             const ExperimentOptions& options);

}  // namespace lmsgd::ctl
