#include "coordinator/ctl/experiment_runner.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/history.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "coordinator/ctl/report.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "worker/session/standalone.h"

namespace lmsgd::ctl {
namespace {

std::string ToJson(const google::protobuf::Message& m) { return ProtoToJson(m, /*pretty=*/true); }

std::string Duration(double s) {
  if (s < 60) return absl::StrFormat("%.0f s", s);
  return absl::StrFormat("%d min %02d s", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
}

// The run's recipe fields, from its spec at the k it runs with.
v1::ExperimentRun Describe(const PlannedRun& p) {
  v1::ExperimentRun r;
  r.set_arm(p.arm);
  r.set_seed(p.seed);
  r.set_reference(p.reference);
  const uint32_t k = p.spec.world_size();
  const v1::Schedule s = MakeSchedule(p.spec, k);
  r.set_kn(s.global_batch());
  r.set_world_size(k);
  r.set_virtual_workers(p.spec.virtual_workers_per_worker());
  r.set_per_worker_batch(p.spec.per_worker_batch());
  r.set_peak_lr(s.peak_lr());
  r.set_warmup(p.spec.warmup() == v1::WARMUP_UNSPECIFIED ? v1::WARMUP_GRADUAL : p.spec.warmup());
  r.set_warmup_epochs(s.warmup_epochs());
  r.set_lr_scaling(s.lr_scaling());
  r.set_epochs(p.spec.epochs());
  r.set_iterations(s.total_iterations());
  *r.mutable_spec() = p.spec;
  return r;
}

void Finish(v1::ExperimentRun* r) {
  EpochRecords h(r->history().begin(), r->history().end());
  if (auto e = FinalErrorOf(h); e.has_value()) *r->mutable_final_error() = *e;
}

absl::Status RunStandalone(const PlannedRun& p, const ExperimentOptions& o, v1::ExperimentRun* r) {
  const std::string base = absl::StrCat(o.dir, "/runs/", p.key());
  std::ofstream log(base + ".log", std::ios::app);
  if (!log) return absl::InternalError(absl::StrCat("cannot open ", base, ".log"));
  v1::JobSpec spec = p.spec;
  spec.set_checkpoint_dir(absl::StrCat(o.dir, "/checkpoints/", p.key()));
  session::StandaloneOptions so;
  so.threads = o.threads;
  so.resume = true;
  so.history_file = base + ".history.jsonl";
  so.log = &log;
  ASSIGN_OR_RETURN(session::StandaloneResult result, session::RunStandalone(spec, so));
  r->set_state(v1::JOB_STATE_SUCCEEDED);
  for (const auto& e : result.history) *r->add_history() = e;
  return absl::OkStatus();
}

absl::Status RunThroughCoordinator(const PlannedRun& p, const ExperimentOptions& o, v1::ExperimentRun* r) {
  const std::string job_file = absl::StrCat(o.dir, "/runs/", p.key(), ".job");
  std::string job_id;
  if (auto old = ReadFileToString(job_file); old.ok() && !old->empty()) {
    job_id = *old;
    if (o.log) *o.log << "  waiting for " << job_id << " (submitted before)" << std::endl;
  } else {
    ASSIGN_OR_RETURN(job_id, o.coordinator->Submit(p.spec));
    RETURN_IF_ERROR(WriteFileAtomically(job_file, job_id));
    if (o.log) *o.log << "  submitted " << job_id << std::endl;
  }
  r->set_job_id(job_id);
  const absl::Time deadline = absl::Now() + o.run_timeout;
  absl::Time unreachable_since = absl::InfiniteFuture();
  while (true) {
    auto st = o.coordinator->Get(job_id);
    if (st.ok()) {
      unreachable_since = absl::InfiniteFuture();
      const v1::JobState s = st->state();
      if (s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED) {
        r->set_state(s);
        r->set_message(st->message());
        for (const auto& e : st->history()) *r->add_history() = e;
        return absl::OkStatus();
      }
    } else if (st.status().code() == absl::StatusCode::kUnavailable ||
               st.status().code() == absl::StatusCode::kDeadlineExceeded) {
      if (unreachable_since == absl::InfiniteFuture()) unreachable_since = absl::Now();
      if (absl::Now() - unreachable_since > o.unreachable_timeout) {
        return absl::UnavailableError(absl::StrCat("job ", job_id, ": ", st.status().message(), " for longer than ",
                                                   absl::FormatDuration(o.unreachable_timeout)));
      }
    } else {
      return absl::Status(st.status().code(), absl::StrCat("job ", job_id, ": ", st.status().message()));
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat("job ", job_id, " (", p.key(), ") did not end within ",
                                                      absl::FormatDuration(o.run_timeout), " (--run_timeout)"));
    }
    absl::SleepFor(o.poll);
  }
}

}  // namespace

absl::StatusOr<std::vector<v1::ExperimentRun>> RunExperiment(const v1::Experiment& x,
                                                             const std::vector<PlannedRun>& plan,
                                                             const ExperimentOptions& o) {
  RETURN_IF_ERROR(MakeDirs(o.dir + "/runs"));
  std::string text;
  google::protobuf::TextFormat::PrintToString(x, &text);
  RETURN_IF_ERROR(WriteFileAtomically(o.dir + "/experiment.textproto", text));

  std::vector<v1::ExperimentRun> done;
  for (size_t i = 0; i < plan.size(); ++i) {
    const PlannedRun& p = plan[i];
    const std::string result_file = absl::StrCat(o.dir, "/runs/", p.key(), ".result.json");
    const std::string tag = absl::StrFormat("[%d/%d] %s", i + 1, plan.size(), p.key());
    if (auto old = ReadFileToString(result_file); old.ok()) {
      v1::ExperimentRun r;
      if (google::protobuf::util::JsonStringToMessage(*old, &r).ok() &&
          google::protobuf::util::MessageDifferencer::Equals(r.spec(), p.spec)) {
        if (o.log) *o.log << tag << ": done before" << std::endl;
        done.push_back(std::move(r));
        continue;
      }
      if (o.log) *o.log << tag << ": its result is of another recipe (the file changed): running it again" << std::endl;
      if (o.coordinator != nullptr) (void)WriteFileAtomically(absl::StrCat(o.dir, "/runs/", p.key(), ".job"), "");
    }
    v1::ExperimentRun r = Describe(p);
    if (o.log) {
      *o.log << tag << ": kn " << r.kn() << " (k " << r.world_size() << " x m " << r.virtual_workers() << " x n "
             << r.per_worker_batch() << "), peak lr " << r.peak_lr() << ", warmup " << WarmupName(r.warmup())
             << ", " << ScalingName(r.lr_scaling()) << " scaling, " << r.iterations() << " iterations" << std::endl;
    }
    const absl::Time start = absl::Now();
    absl::Status st = o.coordinator != nullptr ? RunThroughCoordinator(p, o, &r) : RunStandalone(p, o, &r);
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat(p.key(), ": ", st.message()));
    r.set_wall_seconds(absl::ToDoubleSeconds(absl::Now() - start));
    Finish(&r);
    RETURN_IF_ERROR(WriteFileAtomically(result_file, ToJson(r)));
    if (o.log) {
      *o.log << tag << ": "
             << (r.state() == v1::JOB_STATE_SUCCEEDED && r.has_final_error()
                     ? DescribeFinalError(r.final_error())
                     : absl::StrCat(v1::JobState_Name(r.state()), " ", r.message()))
             << ", " << Duration(r.wall_seconds()) << std::endl;
    }
    done.push_back(std::move(r));
    RETURN_IF_ERROR(WriteExperimentCsv(o.dir, done));
  }
  RETURN_IF_ERROR(WriteExperimentCsv(o.dir, done));
  return done;
}

}  // namespace lmsgd::ctl
