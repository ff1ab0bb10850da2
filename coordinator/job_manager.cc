#include "coordinator/job_manager.h"

#include "common/lr_schedule.h"

#include <algorithm>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/job_spec.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "coordinator/job_manager_internal.h"

namespace lmsgd::coordinator {

using internal::DescribeMember;
using internal::StateName;
using internal::UnixMillis;

JobManager::JobManager(JobManagerOptions options, StateStore* store, CoordinatorMetrics* metrics)
    : options_(std::move(options)), store_(store), metrics_(metrics) {}

JobManager::~JobManager() { Shutdown(); }

bool JobManager::IsFinal(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED;
}

JobManager::Job* JobManager::FindJob(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? nullptr : it->second.get();
}

bool JobManager::IsAlive(const Member& m, absl::Time now) const {
  return m.join_calls > 0 || now - m.last_seen <= options_.heartbeat_timeout || now <= m.alive_until;
}

int JobManager::AliveCount(const Job& job, absl::Time now) const {
  int n = 0;
  for (const auto& [id, m] : job.members) n += IsAlive(m, now) ? 1 : 0;
  return n;
}

v1::JobStatus JobManager::Snapshot(const Job& job) const {
  v1::JobStatus s = job.status;
  s.clear_workers();
  std::vector<const Member*> ms;
  for (const auto& [id, m] : job.members) ms.push_back(&m);
  // Ranked members first, by rank; then standby members by id.
  std::sort(ms.begin(), ms.end(), [&](const Member* a, const Member* b) {
    bool ra = a->generation == job.status.generation() && a->generation != 0;
    bool rb = b->generation == job.status.generation() && b->generation != 0;
    if (ra != rb) return ra;
    if (ra) return a->info.rank() < b->info.rank();
    return a->info.worker_id() < b->info.worker_id();
  });
  for (const Member* m : ms) {
    v1::WorkerInfo* w = s.add_workers();
    *w = m->info;
    if (m->generation != job.status.generation() || m->generation == 0) {
      w->set_rank(-1);
      w->set_local_rank(-1);
    }
    w->set_last_heartbeat_unix_ms(UnixMillis(m->last_seen));
    if (m->has_step && m->step_generation == job.status.generation() && m->generation == job.status.generation()) {
      *w->mutable_recent_step() = m->recent_step;
      w->set_busy_ratio(m->busy_ratio);
      w->set_straggler(m->straggler);
    }
  }
  return s;
}

void JobManager::Changed(Job& job) {
  ++job.version;
  changed_.SignalAll();
  if (metrics_ != nullptr) metrics_->SetJob(job.status, AliveCount(job, options_.now()));
}

void JobManager::UpdateStateGauges() {
  if (metrics_ == nullptr) return;
  std::map<v1::JobState, int> counts;
  for (const auto& [id, job] : jobs_) counts[job->status.state()]++;
  metrics_->SetJobsByState(counts);
}

absl::Status JobManager::Persist(Job& job, v1::JobStatus next) {
  next.set_update_time_unix_ms(UnixMillis(absl::Now()));
  absl::Status st = store_->SaveJob(next);
  if (!st.ok()) {
    LOG(ERROR) << "cannot persist job " << next.job_id() << ": " << st;
    return absl::InternalError(absl::StrCat("could not persist job ", next.job_id(),
                                            " (nothing changed): ", st.message()));
  }
  const bool state_changed = next.state() != job.status.state();
  if (state_changed) {
    LOG(INFO) << "job " << next.job_id() << ": " << StateName(job.status.state()) << " -> "
              << StateName(next.state()) << " (generation " << next.generation() << ")"
              << (next.message().empty() ? "" : ": ") << next.message();
  }
  job.status = std::move(next);
  job.dirty = false;
  Changed(job);
  if (state_changed) UpdateStateGauges();
  return absl::OkStatus();
}

void JobManager::PersistOrRetryLater(Job& job, v1::JobStatus next) {
  v1::JobStatus copy = next;
  if (Persist(job, std::move(next)).ok()) return;
  // Tick-driven transitions have nobody to refuse: apply them and keep retrying the write.
  const bool state_changed = copy.state() != job.status.state();
  job.status = std::move(copy);
  job.dirty = true;
  Changed(job);
  if (state_changed) UpdateStateGauges();
}

absl::StatusOr<std::vector<std::string>> JobManager::Recover() {
  ASSIGN_OR_RETURN(LoadedState loaded, store_->Load());
  absl::MutexLock lock(&mu_);
  const absl::Time now = options_.now();
  for (auto& status : loaded.jobs) {
    auto job = std::make_unique<Job>();
    for (const auto& w : status.workers()) {
      Member m;
      m.info = w;
      m.last_seen = now;  // workers keep heartbeating to the new process
      m.alive_until = now + options_.heartbeat_timeout + options_.restart_grace;
      m.generation = (w.rank() >= 0) ? status.generation() : 0;
      job->members[w.worker_id()] = m;
    }
    job->status = std::move(status);
    job->formed_at = now;  // the formation time is not durable: growth waits a full interval
    const std::string id = job->status.job_id();
    jobs_[id] = std::move(job);
  }
  next_job_seq_ = std::max(next_job_seq_, loaded.max_job_seq + 1);
  for (auto& [id, job] : jobs_) Changed(*job);
  UpdateStateGauges();
  LOG(INFO) << "recovered " << loaded.jobs.size() << " job(s); " << loaded.errors.size()
            << " unreadable record(s)";
  for (const auto& e : loaded.errors) LOG(ERROR) << "state store: " << e;
  return loaded.errors;
}

absl::StatusOr<v1::JobStatus> JobManager::Submit(v1::JobSpec spec) {
  ApplyDefaults(&spec);
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  absl::MutexLock lock(&mu_);
  if (shutting_down_) return absl::UnavailableError("coordinator is shutting down");
  size_t live = 0;
  for (const auto& [id, job] : jobs_) live += IsFinal(job->status.state()) ? 0 : 1;
  if (live >= options_.max_live_jobs) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the coordinator already holds ", live, " live jobs (--max_jobs=",
                     options_.max_live_jobs, "); cancel or wait for one"));
  }
  auto job = std::make_unique<Job>();
  v1::JobStatus next;
  next.set_job_id(JobIdFromSeq(next_job_seq_));
  *next.mutable_spec() = std::move(spec);
  next.set_state(v1::JOB_STATE_PENDING);
  next.set_world_size(next.spec().world_size());
  *next.mutable_schedule() = MakeSchedule(next.spec(), next.spec().world_size());
  next.mutable_progress()->set_total_iterations(next.schedule().total_iterations());
  next.set_create_time_unix_ms(UnixMillis(absl::Now()));
  job->status.set_job_id(next.job_id());
  Job* raw = job.get();
  jobs_[next.job_id()] = std::move(job);
  absl::Status st = Persist(*raw, std::move(next));
  if (!st.ok()) {
    jobs_.erase(raw->status.job_id());
    return st;
  }
  ++next_job_seq_;
  UpdateStateGauges();
  LOG(INFO) << "job " << raw->status.job_id() << " submitted: " << raw->status.spec().name()
            << ", k=" << raw->status.spec().world_size()
            << ", kn=" << raw->status.schedule().global_batch()
            << ", peak lr=" << raw->status.schedule().peak_lr();
  return Snapshot(*raw);
}

absl::StatusOr<v1::JobStatus> JobManager::Get(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(job_id);
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", job_id, "'"));
  return Snapshot(*job);
}

std::vector<v1::JobStatus> JobManager::List(bool include_finished) {
  absl::MutexLock lock(&mu_);
  std::vector<v1::JobStatus> out;
  for (const auto& [id, job] : jobs_) {
    if (!include_finished && IsFinal(job->status.state())) continue;
    out.push_back(Snapshot(*job));
    out.back().clear_history();  // GetJob has it; a list of many jobs stays small
  }
  return out;
}

absl::StatusOr<v1::JobStatus> JobManager::Cancel(const std::string& job_id, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  Job* job = FindJob(job_id);
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", job_id, "'"));
  if (IsFinal(job->status.state())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " has already ended (", StateName(job->status.state()), ")"));
  }
  v1::JobStatus next = Snapshot(*job);
  next.set_state(v1::JOB_STATE_CANCELLED);
  next.set_message(reason.empty() ? "cancelled by user" : absl::StrCat("cancelled: ", reason));
  RETURN_IF_ERROR(Persist(*job, std::move(next)));
  job->bootstrap.clear();
  return Snapshot(*job);
}

absl::StatusOr<std::pair<uint64_t, v1::JobStatus>> JobManager::WaitForUpdate(
    const std::string& job_id, uint64_t known_version, absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  while (true) {
    Job* job = FindJob(job_id);
    if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", job_id, "'"));
    if (job->version != known_version || shutting_down_ || absl::Now() >= deadline) {
      if (shutting_down_) return absl::UnavailableError("coordinator is shutting down");
      return std::make_pair(job->version, Snapshot(*job));
    }
    changed_.WaitWithDeadline(&mu_, deadline);
  }
}


void JobManager::Tick() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = options_.now();
  for (auto& [job_id, job_ptr] : jobs_) {
    Job& job = *job_ptr;
    if (job.dirty) {
      PersistOrRetryLater(job, Snapshot(job));
    }
    if (IsFinal(job.status.state())) continue;
    std::vector<std::string> dead_in_generation;
    bool removed = false;
    for (auto it = job.members.begin(); it != job.members.end();) {
      const Member& m = it->second;
      if (IsAlive(m, now)) {
        ++it;
        continue;
      }
      const bool in_generation = m.generation != 0 && m.generation == job.status.generation() &&
                                 job.status.state() == v1::JOB_STATE_RUNNING;
      if (in_generation) {
        dead_in_generation.push_back(absl::StrCat(DescribeMember(m.info), " on ", m.info.host(),
                                                  " silent for ",
                                                  absl::FormatDuration(absl::Trunc(now - m.last_seen, absl::Milliseconds(100)))));
      }
      LOG(WARNING) << "job " << job_id << ": " << DescribeMember(m.info) << " missed heartbeats for "
                   << absl::FormatDuration(now - m.last_seen) << "; removed";
      it = job.members.erase(it);
      removed = true;
    }
    if (!dead_in_generation.empty()) {
      if (metrics_ != nullptr) metrics_->AddHeartbeatsMissed(job_id, static_cast<int>(dead_in_generation.size()));
      (void)BreakGeneration(job, absl::StrCat("lost ", absl::StrJoin(dead_in_generation, ", "),
                                              " (heartbeat timeout ",
                                              absl::FormatDuration(options_.heartbeat_timeout), ")"),
                            false);
    } else if (removed) {
      Changed(job);
    } else if (metrics_ != nullptr) {
      metrics_->SetJob(job.status, AliveCount(job, now));
    }
    SettleFailureWindow(job, false);
    // Elastic re-formation is due by time, not by a Join: try it here too (waiting joiners are
    // woken by the transition).
    if (job.status.state() == v1::JOB_STATE_RECOVERING &&
        (job.status.spec().min_workers() < job.status.spec().world_size() || job.grow_target > 0)) {
      (void)TryForm(job);
    }
  }
}

void JobManager::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutting_down_ = true;
  changed_.SignalAll();
}

}  // namespace lmsgd::coordinator
