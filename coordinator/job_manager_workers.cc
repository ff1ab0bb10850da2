#include "coordinator/job_manager.h"

#include "common/lr_schedule.h"

#include <algorithm>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/history.h"
#include "common/job_spec.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "coordinator/job_manager_internal.h"

namespace lmsgd::coordinator {

using internal::DescribeMember;
using internal::StateName;
using internal::UnixMillis;

absl::Status JobManager::PublishBootstrap(const v1::PublishBootstrapRequest& req) {
  if (req.key().empty() || req.key().size() > 128) return absl::InvalidArgumentError("key: must be 1..128 characters");
  if (req.value().size() > options_.max_bootstrap_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("value: ", req.value().size(), " bytes exceeds the ",
                                                   options_.max_bootstrap_bytes, "-byte limit"));
  }
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(req.job_id());
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
  RETURN_IF_ERROR(CheckGeneration(*job, req.generation()));
  if (req.rank() < 0 || req.rank() >= static_cast<int>(job->status.world_size())) {
    return absl::InvalidArgumentError(absl::StrCat("rank: ", req.rank(), " is outside [0, ",
                                                   job->status.world_size(), ")"));
  }
  auto& slot = job->bootstrap[req.key()];
  auto it = slot.find(req.rank());
  if (it != slot.end()) {
    if (it->second == req.value()) return absl::OkStatus();
    return absl::AlreadyExistsError(absl::StrCat("rank ", req.rank(), " already published a different '",
                                                 req.key(), "' for generation ", req.generation()));
  }
  slot[req.rank()] = req.value();
  changed_.SignalAll();
  return absl::OkStatus();
}

absl::StatusOr<v1::GetBootstrapResponse> JobManager::GetBootstrap(const v1::GetBootstrapRequest& req,
                                                                  absl::Time deadline) {
  const absl::Time start = absl::Now();
  if (req.timeout_s() > 0) deadline = std::min(deadline, start + absl::Seconds(req.timeout_s()));
  deadline = std::min(deadline, start + options_.max_bootstrap_wait);
  absl::MutexLock lock(&mu_);
  while (true) {
    if (shutting_down_) return absl::UnavailableError("coordinator is shutting down");
    Job* job = FindJob(req.job_id());
    if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
    RETURN_IF_ERROR(CheckGeneration(*job, req.generation()));
    std::vector<int> ranks(req.ranks().begin(), req.ranks().end());
    if (ranks.empty()) {
      for (uint32_t r = 0; r < job->status.world_size(); ++r) ranks.push_back(static_cast<int>(r));
    }
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    const auto& slot = job->bootstrap[req.key()];
    std::vector<int> missing;
    v1::GetBootstrapResponse resp;
    for (int r : ranks) {
      if (r < 0 || r >= static_cast<int>(job->status.world_size())) {
        return absl::InvalidArgumentError(absl::StrCat("ranks: ", r, " is outside [0, ",
                                                       job->status.world_size(), ")"));
      }
      auto it = slot.find(r);
      if (it == slot.end()) {
        missing.push_back(r);
      } else {
        auto* e = resp.add_entries();
        e->set_rank(r);
        e->set_value(it->second);
      }
    }
    if (missing.empty()) return resp;
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "bootstrap key '", req.key(), "' of job ", req.job_id(), " generation ", req.generation(),
          ": rank(s) ", absl::StrJoin(missing, ","), " did not publish within ",
          absl::FormatDuration(absl::Now() - start)));
    }
    changed_.WaitWithDeadline(&mu_, deadline);
  }
}

absl::StatusOr<v1::HeartbeatResponse> JobManager::Heartbeat(const v1::HeartbeatRequest& req) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(req.job_id());
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
  v1::HeartbeatResponse resp;
  resp.set_generation(job->status.generation());
  auto it = job->members.find(req.worker_id());
  if (IsFinal(job->status.state())) {
    resp.set_directive(v1::DIRECTIVE_STOP);
    resp.set_message(absl::StrCat("job ", req.job_id(), " ended: ", StateName(job->status.state())));
    if (it != job->members.end()) it->second.last_seen = options_.now();
    return resp;
  }
  if (it == job->members.end()) {
    resp.set_directive(v1::DIRECTIVE_ABORT_AND_REJOIN);
    resp.set_message(absl::StrCat("worker ", req.worker_id(), " is not a member of job ", req.job_id(),
                                  " (declared dead or replaced); re-join"));
    return resp;
  }
  Member& m = it->second;
  m.last_seen = options_.now();
  std::optional<uint64_t> count;
  if (req.has_collectives_completed()) count = req.collectives_completed();
  if (count.has_value() && req.generation() == m.generation) {
    m.collectives_generation = m.generation;
    m.collectives_completed = *count;
  }
  if (req.generation() != job->status.generation() || m.generation != job->status.generation() ||
      job->status.state() != v1::JOB_STATE_RUNNING) {
    AnswerFailureWindow(*job, req.generation(), req.worker_id(), count);
    SettleFailureWindow(*job, false);
    resp.set_directive(v1::DIRECTIVE_ABORT_AND_REJOIN);
    resp.set_message(absl::StrCat("generation ", req.generation(), " is over (job ",
                                  StateName(job->status.state()), ", generation ",
                                  job->status.generation(), ")",
                                  job->status.message().empty() ? "" : ": ", job->status.message()));
    return resp;
  }
  resp.set_directive(v1::DIRECTIVE_CONTINUE);
  if (req.recent_steps() > 0) {
    if (m.step_generation != job->status.generation()) {  // a new generation starts its count afresh
      m.slow_beats = 0;
      m.straggler = false;
    }
    m.recent_step = req.recent_step();
    m.has_step = true;
    m.step_generation = job->status.generation();
    UpdateStragglers(*job, req.job_id(), m);
  }
  if (m.info.rank() == 0) {
    const uint64_t total = job->status.progress().total_iterations();
    *job->status.mutable_progress() = req.progress();
    job->status.mutable_progress()->set_total_iterations(total);
    if (req.completed()) {
      v1::JobStatus next = Snapshot(*job);
      next.set_state(v1::JOB_STATE_SUCCEEDED);
      if (next.spec().mode() == v1::JOB_MODE_EVALUATE) {
        const auto& e = next.last_evaluation();
        next.set_message(next.has_last_evaluation()
                             ? absl::StrFormat("evaluated %s: top-1 error %.2f%%, top-5 error %.2f%% (%d images)",
                                               next.spec().init_checkpoint(), 100 * e.top1_error(),
                                               100 * e.top5_error(), e.examples())
                             : absl::StrCat("evaluated ", next.spec().init_checkpoint()));
      } else {
        next.set_message(absl::StrCat("finished ", next.spec().epochs(), " epochs"));
      }
      RETURN_IF_ERROR(Persist(*job, std::move(next)));
      resp.set_directive(v1::DIRECTIVE_STOP);
      resp.set_message("job succeeded");
      return resp;
    }
    Changed(*job);
  }
  return resp;
}

absl::Status JobManager::ReportCheckpoint(const v1::ReportCheckpointRequest& req) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(req.job_id());
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
  RETURN_IF_ERROR(CheckGeneration(*job, req.checkpoint().generation()));
  if (req.checkpoint().path().empty()) return absl::InvalidArgumentError("checkpoint.path: required");
  if (job->members.find(req.worker_id()) == job->members.end()) {
    return absl::NotFoundError(absl::StrCat("worker ", req.worker_id(), " is not a member of job ", req.job_id()));
  }
  v1::JobStatus next = Snapshot(*job);
  *next.mutable_last_checkpoint() = req.checkpoint();
  if (next.last_checkpoint().time_unix_ms() == 0) {
    next.mutable_last_checkpoint()->set_time_unix_ms(UnixMillis(absl::Now()));
  }
  RETURN_IF_ERROR(Persist(*job, std::move(next)));
  return MaybeGrow(*job);
}

absl::Status JobManager::ReportEvaluation(const v1::ReportEvaluationRequest& req) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(req.job_id());
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
  RETURN_IF_ERROR(CheckGeneration(*job, req.generation()));
  const auto& e = req.evaluation();
  if (!(e.top1_error() >= 0 && e.top1_error() <= 1 && e.top5_error() >= 0 && e.top5_error() <= 1)) {
    return absl::InvalidArgumentError("evaluation: errors must be fractions in [0, 1]");
  }
  v1::JobStatus next = Snapshot(*job);
  *next.mutable_last_evaluation() = e;
  v1::EpochRecord r;  // evaluation only: the epoch's training fields, if any, stay
  r.set_epoch(e.epoch());
  *r.mutable_evaluation() = e;
  AddToHistory(r, &next);
  return Persist(*job, std::move(next));
}

absl::Status JobManager::ReportEpoch(const v1::ReportEpochRequest& req) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(req.job_id());
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
  RETURN_IF_ERROR(CheckGeneration(*job, req.generation()));
  const auto& r = req.record();
  // An evaluation job's record is numbered by its checkpoint's epoch: 0 when the file did not say.
  if (r.epoch() == 0 && job->status.spec().mode() != v1::JOB_MODE_EVALUATE) {
    return absl::InvalidArgumentError("record.epoch: must be >= 1 (epochs are 1-based)");
  }
  if (r.has_evaluation()) {
    const auto& e = r.evaluation();
    if (!(e.top1_error() >= 0 && e.top1_error() <= 1 && e.top5_error() >= 0 && e.top5_error() <= 1)) {
      return absl::InvalidArgumentError("record.evaluation: errors must be fractions in [0, 1]");
    }
  }
  v1::JobStatus next = Snapshot(*job);
  v1::EpochRecord rec = r;
  rec.set_generation(req.generation());
  if (rec.time_unix_ms() == 0) rec.set_time_unix_ms(UnixMillis(absl::Now()));
  if (rec.has_evaluation()) {
    rec.mutable_evaluation()->set_epoch(rec.epoch());
    *next.mutable_last_evaluation() = rec.evaluation();
  }
  AddToHistory(rec, &next);
  return Persist(*job, std::move(next));
}

void JobManager::AddToHistory(const v1::EpochRecord& record, v1::JobStatus* job) {
  uint32_t dropped = job->history_dropped();
  MergeEpochRecord(record, job->mutable_history(), &dropped);
  job->set_history_dropped(dropped);
  if (auto e = FinalErrorOf(job->history()); e.has_value()) {
    *job->mutable_final_error() = *e;
  } else {
    job->clear_final_error();
  }
}

absl::Status JobManager::ReportFailure(const v1::ReportFailureRequest& req) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(req.job_id());
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
  if (IsFinal(job->status.state())) return absl::OkStatus();
  const std::string msg = absl::StrCat("worker ", req.worker_id(), ": ", req.message().substr(0, 4096));
  LOG(WARNING) << "job " << req.job_id() << ": failure reported" << (req.fatal() ? " (fatal)" : "")
               << " by " << msg;
  if (req.fatal()) {
    v1::JobStatus next = Snapshot(*job);
    next.set_state(v1::JOB_STATE_FAILED);
    next.set_message(msg);
    return Persist(*job, std::move(next));
  }
  std::optional<uint64_t> count;
  if (req.has_collectives_completed()) count = req.collectives_completed();
  if (req.generation() == job->status.generation() && job->status.state() == v1::JOB_STATE_RUNNING) {
    OpenFailureWindow(*job, req.worker_id(), msg, count);
    RETURN_IF_ERROR(BreakGeneration(*job, msg, true));
    SettleFailureWindow(*job, false);
    return absl::OkStatus();
  }
  AnswerFailureWindow(*job, req.generation(), req.worker_id(), count);
  SettleFailureWindow(*job, false);
  return absl::OkStatus();
}

void JobManager::OpenFailureWindow(Job& job, const std::string& reporter, const std::string& report,
                                   std::optional<uint64_t> count) {
  FailureWindow w;
  w.generation = job.status.generation();
  w.opened = options_.now();
  w.first_report = report;
  for (const auto& [id, m] : job.members) {
    if (m.generation != w.generation) continue;
    w.rank_of[id] = m.info.rank();
    if (m.collectives_generation == w.generation) w.completed[id] = m.collectives_completed;
  }
  job.window = std::move(w);
  AnswerFailureWindow(job, job.window.generation, reporter, count);
}

void JobManager::AnswerFailureWindow(Job& job, uint64_t generation, const std::string& worker_id,
                                     std::optional<uint64_t> count) {
  FailureWindow& w = job.window;
  if (w.generation == 0 || generation != w.generation || w.rank_of.count(worker_id) == 0) return;
  w.answered.insert(worker_id);
  if (count.has_value()) w.completed[worker_id] = *count;
}

void JobManager::SettleFailureWindow(Job& job, bool force) {
  FailureWindow& w = job.window;
  if (w.generation == 0) return;
  std::vector<std::string> silent;
  for (const auto& [id, rank] : w.rank_of) {
    if (w.answered.count(id) == 0) silent.push_back(id);
  }
  const absl::Duration length = 2 * options_.heartbeat_interval + absl::Seconds(1);
  if (!force && !silent.empty() && options_.now() - w.opened < length) return;
  auto count_of = [&](const std::string& id) -> std::optional<uint64_t> {
    auto it = w.completed.find(id);
    if (it == w.completed.end()) return std::nullopt;
    return it->second;
  };
  uint64_t most = 0;
  for (const auto& [id, c] : w.completed) most = std::max(most, c);
  std::string blame;
  if (!silent.empty() && silent.size() < w.rank_of.size()) {
    std::vector<std::string> names;
    for (const auto& id : silent) {
      auto c = count_of(id);
      names.push_back(absl::StrCat("rank ", w.rank_of[id], " (", id, c ? absl::StrCat(", last heard at collective #", *c)
                                                                         : std::string(), ")"));
    }
    blame = absl::StrCat(absl::StrJoin(names, ", "), " stopped responding: no failure report, heartbeat or re-join within ",
                         absl::FormatDuration(length), " of the failure (the others completed collectives up to #",
                         most, ")");
  } else if (silent.empty()) {
    // Everyone answered: a single rank whose collectives lag every other's is the one behind.
    std::string low;
    uint64_t low_count = 0;
    int at_low = 0;
    for (const auto& [id, c] : w.completed) {
      if (low.empty() || c < low_count) {
        low = id;
        low_count = c;
        at_low = 1;
      } else if (c == low_count) {
        ++at_low;
      }
    }
    if (!low.empty() && at_low == 1 && low_count < most && w.completed.size() == w.rank_of.size()) {
      blame = absl::StrCat("rank ", w.rank_of[low], " (", low, ") fell behind: its collectives succeeded up to #",
                           low_count, ", the others' up to #", most);
    }
  }
  const std::string first = w.first_report;
  w = FailureWindow();
  if (blame.empty()) return;
  LOG(WARNING) << "job " << job.status.job_id() << ": " << blame;
  if (job.status.state() != v1::JOB_STATE_RECOVERING) return;
  v1::JobStatus next = Snapshot(job);
  next.set_message(absl::StrCat(blame, "; first report: ", first));
  PersistOrRetryLater(job, std::move(next));
}

}  // namespace lmsgd::coordinator

namespace lmsgd::coordinator {

namespace {
double Busy(const v1::StepTimeSplit& t) { return t.data_wait_s() + t.forward_s() + t.backward_s() + t.optimizer_s(); }
}  // namespace

void JobManager::UpdateStragglers(Job& job, const std::string& job_id, Member& reporter) {
  std::vector<double> busy;
  for (const auto& [id, m] : job.members) {
    if (m.has_step && m.step_generation == job.status.generation() && m.generation == job.status.generation()) {
      busy.push_back(Busy(m.recent_step));
    }
  }
  if (busy.size() < 2) return;
  std::sort(busy.begin(), busy.end());
  const double median = busy[(busy.size() - 1) / 2];  // the lower median: with 2 ranks, the faster
  if (!(median > 0)) return;
  Member& m = reporter;
  m.busy_ratio = Busy(m.recent_step) / median;
  m.slow_beats = m.busy_ratio > options_.straggler_factor ? m.slow_beats + 1 : 0;
  const bool was = m.straggler;
  m.straggler = m.slow_beats >= options_.straggler_heartbeats;
  if (metrics_ != nullptr) metrics_->SetRankStep(job_id, m.info.host(), m.info.rank(), m.recent_step, m.busy_ratio);
  if (m.straggler && !was) {
    LOG(WARNING) << "job " << job_id << ": straggler rank " << m.info.rank() << " on " << m.info.host() << ": busy "
                 << absl::StrFormat("%.1f ms", 1e3 * Busy(m.recent_step)) << " per step, "
                 << absl::StrFormat("%.2fx", m.busy_ratio) << " the median rank's for " << m.slow_beats
                 << " heartbeats";
    if (metrics_ != nullptr) metrics_->AddStraggler(job_id, m.info.host(), m.info.rank());
  }
}

}  // namespace lmsgd::coordinator
