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

namespace lmsgd::coordinator {
namespace {

int64_t UnixMillis(absl::Time t) { return absl::ToUnixMillis(t); }

std::string StateName(v1::JobState s) { return JobStateLabel(s); }

std::string DescribeMember(const v1::WorkerInfo& w) {
  if (w.rank() >= 0) return absl::StrCat("worker ", w.worker_id(), " (rank ", w.rank(), ")");
  return absl::StrCat("worker ", w.worker_id());
}

}  // namespace

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
  return m.join_calls > 0 || now - m.last_seen <= options_.heartbeat_timeout;
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
      m.last_seen = now;  // grace period: workers keep heartbeating to the new process
      m.generation = (w.rank() >= 0) ? status.generation() : 0;
      job->members[w.worker_id()] = m;
    }
    job->status = std::move(status);
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

absl::Status JobManager::TryForm(Job& job) {
  const v1::JobState state = job.status.state();
  if (state != v1::JOB_STATE_PENDING && state != v1::JOB_STATE_WAITING_FOR_WORKERS &&
      state != v1::JOB_STATE_RECOVERING) {
    return absl::OkStatus();
  }
  const absl::Time now = options_.now();
  std::vector<Member*> ready;
  for (auto& [id, m] : job.members) {
    if (m.ready && IsAlive(m, now)) ready.push_back(&m);
  }
  // Elastic jobs (min_workers < world_size or max_workers > world_size): grow up to max_workers
  // whenever more are ready; after a loss, once the survivors have had a heartbeat timeout to
  // come back, re-form with as few as min_workers (see FormSchedule for the learning rate).
  const v1::JobSpec& spec = job.status.spec();
  uint32_t need = spec.world_size();
  const uint32_t avail = static_cast<uint32_t>(std::min<size_t>(ready.size(), spec.max_workers()));
  if (spec.min_workers() < spec.world_size() || spec.max_workers() > spec.world_size()) {
    if (avail >= spec.world_size()) {
      need = avail;
    } else if (state == v1::JOB_STATE_RECOVERING && avail >= spec.min_workers() &&
               now - job.recovering_since >= options_.heartbeat_timeout) {
      need = avail;
    }
  }
  if (ready.size() < need) {
    if (state == v1::JOB_STATE_PENDING && !ready.empty()) {
      v1::JobStatus next = Snapshot(job);
      next.set_state(v1::JOB_STATE_WAITING_FOR_WORKERS);
      next.set_message(absl::StrCat(ready.size(), " of ", need, " workers joined"));
      RETURN_IF_ERROR(Persist(job, std::move(next)));
    } else if (job.status.state() == v1::JOB_STATE_WAITING_FOR_WORKERS) {
      // Not a transition: just refresh the message for status readers.
      job.status.set_message(absl::StrCat(ready.size(), " of ", need, " workers joined"));
      Changed(job);
    }
    return absl::OkStatus();
  }
  // The first `need` workers to become ready, then ranks by (host, local_device).
  std::sort(ready.begin(), ready.end(),
            [](const Member* a, const Member* b) { return a->ready_seq < b->ready_seq; });
  ready.resize(need);
  std::sort(ready.begin(), ready.end(), [](const Member* a, const Member* b) {
    return std::make_tuple(a->info.host(), a->info.local_device(), a->info.worker_id()) <
           std::make_tuple(b->info.host(), b->info.local_device(), b->info.worker_id());
  });
  const uint64_t generation = job.status.generation() + 1;
  v1::JobStatus next = Snapshot(job);
  next.set_generation(generation);
  next.set_state(v1::JOB_STATE_RUNNING);
  next.set_world_size(need);
  *next.mutable_schedule() = MakeSchedule(next.spec(), need);
  const v1::Schedule& old = job.status.schedule();
  if (old.global_batch() != 0 && old.global_batch() != next.schedule().global_batch() &&
      !job.status.last_checkpoint().path().empty()) {
    // kn changed (elastic): the new generation resumes at the checkpoint's epoch boundary with
    // the rate rescaled by the linear scaling rule, ramped from the old rate over 1/4 epoch.
    v1::Schedule* sch = next.mutable_schedule();
    sch->set_rewarm_start_iteration(job.status.last_checkpoint().epoch() * sch->iterations_per_epoch());
    sch->set_rewarm_iterations(std::max<uint64_t>(1, sch->iterations_per_epoch() / 4));
    sch->set_rewarm_from_lr(LearningRate(ScheduleParams(old), job.status.last_checkpoint().iteration()));
    LOG(INFO) << "job " << next.job_id() << ": elastic re-formation with " << need << " workers (was "
              << job.status.world_size() << "): kn " << old.global_batch() << " -> " << sch->global_batch()
              << ", peak lr " << old.peak_lr() << " -> " << sch->peak_lr();
  }
  next.mutable_progress()->set_total_iterations(next.schedule().total_iterations());
  next.set_message("");
  next.clear_workers();
  std::vector<std::pair<int, int>> ranks;  // rank, local_rank per chosen member
  std::set<const Member*> chosen(ready.begin(), ready.end());
  int local = 0;
  for (size_t r = 0; r < ready.size(); ++r) {
    if (r > 0 && ready[r]->info.host() != ready[r - 1]->info.host()) local = 0;
    ranks.emplace_back(static_cast<int>(r), local++);
    v1::WorkerInfo* w = next.add_workers();
    *w = ready[r]->info;
    w->set_rank(static_cast<int>(r));
    w->set_local_rank(ranks.back().second);
    w->set_last_heartbeat_unix_ms(UnixMillis(ready[r]->last_seen));
  }
  for (const auto& [id, m] : job.members) {
    if (chosen.count(&m)) continue;
    v1::WorkerInfo* w = next.add_workers();
    *w = m.info;
    w->set_rank(-1);
    w->set_local_rank(-1);
  }
  RETURN_IF_ERROR(Persist(job, std::move(next)));
  for (size_t r = 0; r < ready.size(); ++r) {
    Member* m = ready[r];
    m->info.set_rank(ranks[r].first);
    m->info.set_local_rank(ranks[r].second);
    m->generation = generation;
    m->ready = false;
  }
  for (auto& [id, m] : job.members) {
    if (!chosen.count(&m)) {
      m.info.set_rank(-1);
      m.info.set_local_rank(-1);
    }
  }
  job.bootstrap.clear();
  Changed(job);
  return absl::OkStatus();
}

absl::Status JobManager::BreakGeneration(Job& job, const std::string& reason, bool acknowledged) {
  v1::JobStatus next = Snapshot(job);
  next.set_recoveries(job.status.recoveries() + 1);
  if (next.recoveries() > next.spec().max_recoveries()) {
    next.set_state(v1::JOB_STATE_FAILED);
    next.set_message(absl::StrCat(reason, "; giving up after ", next.spec().max_recoveries(),
                                  " recoveries (spec.max_recoveries)"));
  } else {
    next.set_state(v1::JOB_STATE_RECOVERING);
    next.set_message(reason);
  }
  if (acknowledged) {
    RETURN_IF_ERROR(Persist(job, std::move(next)));
  } else {
    PersistOrRetryLater(job, std::move(next));
  }
  job.bootstrap.clear();
  job.recovering_since = options_.now();
  return absl::OkStatus();
}

v1::JoinJobResponse JobManager::MakeJoinResponse(const Job& job, const Member& m) const {
  v1::JoinJobResponse r;
  r.set_job_id(job.status.job_id());
  r.set_worker_id(m.info.worker_id());
  r.set_heartbeat_interval_s(absl::ToDoubleSeconds(options_.heartbeat_interval));
  *r.mutable_spec() = job.status.spec();
  r.set_needed(job.status.spec().world_size());
  if (m.generation == 0 || m.generation != job.status.generation() ||
      job.status.state() != v1::JOB_STATE_RUNNING) {
    r.set_assigned(false);
    uint32_t joined = 0;
    for (const auto& [id, other] : job.members) joined += other.ready ? 1 : 0;
    r.set_joined(joined);
    return r;
  }
  r.set_assigned(true);
  r.set_generation(job.status.generation());
  r.set_rank(m.info.rank());
  r.set_local_rank(m.info.local_rank());
  r.set_world_size(static_cast<int>(job.status.world_size()));
  *r.mutable_schedule() = job.status.schedule();
  if (!job.status.last_checkpoint().path().empty()) *r.mutable_resume_from() = job.status.last_checkpoint();
  // Hosts in rank order (ranks are contiguous per host).
  v1::JobStatus snap = Snapshot(job);
  std::vector<std::string> hosts;
  int local_world = 0;
  for (const auto& w : snap.workers()) {
    if (w.rank() < 0) continue;
    if (hosts.empty() || hosts.back() != w.host()) hosts.push_back(w.host());
    if (w.host() == m.info.host()) ++local_world;
    *r.add_members() = w;
  }
  r.set_local_world_size(local_world);
  r.set_num_nodes(static_cast<int>(hosts.size()));
  r.set_node_rank(static_cast<int>(std::find(hosts.begin(), hosts.end(), m.info.host()) - hosts.begin()));
  r.set_joined(static_cast<uint32_t>(job.status.world_size()));
  return r;
}

absl::StatusOr<v1::JoinJobResponse> JobManager::Join(const v1::JoinJobRequest& req, absl::Time deadline) {
  const auto& id = req.identity();
  if (id.host().empty() || id.host().size() > 255) {
    return absl::InvalidArgumentError("identity.host: must be 1..255 characters");
  }
  if (id.incarnation().empty() || id.incarnation().size() > 128) {
    return absl::InvalidArgumentError("identity.incarnation: must be 1..128 characters");
  }
  if (id.host().find('/') != std::string::npos || id.incarnation().find('/') != std::string::npos) {
    return absl::InvalidArgumentError("identity: host and incarnation must not contain '/'");
  }
  deadline = std::min(deadline, absl::Now() + options_.max_join_wait);
  absl::MutexLock lock(&mu_);
  // Which job: the named one, or the oldest that needs workers (waiting for one to appear).
  Job* job = nullptr;
  while (job == nullptr) {
    if (shutting_down_) return absl::UnavailableError("coordinator is shutting down");
    if (!req.job_id().empty()) {
      job = FindJob(req.job_id());
      if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job '", req.job_id(), "'"));
      break;
    }
    for (auto& [jid, j] : jobs_) {
      auto s = j->status.state();
      if ((s == v1::JOB_STATE_PENDING || s == v1::JOB_STATE_WAITING_FOR_WORKERS ||
           s == v1::JOB_STATE_RECOVERING) &&
          j->status.spec().device() == id.device()) {
        job = j.get();
        break;
      }
    }
    if (job != nullptr) break;
    if (absl::Now() >= deadline) {
      v1::JoinJobResponse none;
      none.set_assigned(false);
      none.set_heartbeat_interval_s(absl::ToDoubleSeconds(options_.heartbeat_interval));
      return none;
    }
    changed_.WaitWithDeadline(&mu_, deadline);
  }
  const std::string job_id = job->status.job_id();
  if (IsFinal(job->status.state())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " has ended (", StateName(job->status.state()), ")"));
  }
  if (id.device() != job->status.spec().device()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " trains on ", v1::Device_Name(job->status.spec().device()),
        " but this worker offers ", v1::Device_Name(id.device())));
  }
  if (!id.build_version().empty() && id.build_version() != options_.build_version) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker build ", id.build_version(), " is incompatible with coordinator build ",
        options_.build_version, "; run the same lmsgd version everywhere"));
  }
  const size_t max_members = 2 * static_cast<size_t>(std::max(job->status.spec().world_size(),
                                                               job->status.spec().max_workers())) + 16;

  const std::string worker_id = absl::StrCat(id.host(), "/", id.local_device(), "/", id.incarnation());
  // Same slot, other incarnation: the process restarted; the old one is gone.
  for (auto it = job->members.begin(); it != job->members.end();) {
    const Member& old = it->second;
    if (old.info.host() == id.host() && old.info.local_device() == id.local_device() &&
        old.info.worker_id() != worker_id) {
      const bool in_generation = old.generation == job->status.generation() && old.generation != 0 &&
                                 job->status.state() == v1::JOB_STATE_RUNNING;
      std::string who = DescribeMember(old.info);
      it = job->members.erase(it);
      if (in_generation) {
        RETURN_IF_ERROR(BreakGeneration(*job, absl::StrCat(who, " was restarted"), true));
      }
    } else {
      ++it;
    }
  }
  auto it = job->members.find(worker_id);
  if (it == job->members.end()) {
    if (job->members.size() >= max_members) {
      return absl::ResourceExhaustedError(absl::StrCat("job ", job_id, " already has ",
                                                       job->members.size(), " workers registered"));
    }
    Member m;
    m.info.set_worker_id(worker_id);
    m.info.set_host(id.host());
    m.info.set_local_device(id.local_device());
    m.info.set_incarnation(id.incarnation());
    m.info.set_rank(-1);
    m.info.set_local_rank(-1);
    it = job->members.emplace(worker_id, std::move(m)).first;
  } else if (it->second.generation == job->status.generation() && it->second.generation != 0 &&
             job->status.state() == v1::JOB_STATE_RUNNING) {
    if (req.last_generation() != job->status.generation()) {
      // Given a rank while between JoinJob calls: hand the assignment out.
      it->second.last_seen = options_.now();
      return MakeJoinResponse(*job, it->second);
    }
    // A member of the running generation joins again: it has left that generation.
    RETURN_IF_ERROR(BreakGeneration(
        *job, absl::StrCat(DescribeMember(it->second.info), " left generation ",
                           job->status.generation(), " and re-joined"),
        true));
  }
  Member* m = &it->second;
  if (!m->ready) {
    m->ready = true;
    m->ready_seq = next_ready_seq_++;
  }
  m->last_seen = options_.now();
  m->join_calls++;
  absl::Status formed = TryForm(*job);
  if (!formed.ok()) {
    m->join_calls--;
    return formed;
  }
  // Wait until this worker holds a rank in a RUNNING generation, or the wait ends.
  while (true) {
    auto mit = job->members.find(worker_id);
    if (mit == job->members.end()) {
      return absl::AbortedError(absl::StrCat("worker ", worker_id, " was replaced while joining"));
    }
    m = &mit->second;
    const bool assigned = m->generation != 0 && m->generation == job->status.generation() &&
                          job->status.state() == v1::JOB_STATE_RUNNING && !m->ready;
    if (assigned || IsFinal(job->status.state()) || shutting_down_ || absl::Now() >= deadline) break;
    changed_.WaitWithDeadline(&mu_, deadline);
  }
  m->join_calls--;
  m->last_seen = options_.now();
  if (shutting_down_) return absl::UnavailableError("coordinator is shutting down");
  if (IsFinal(job->status.state())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, " has ended (", StateName(job->status.state()), ")"));
  }
  return MakeJoinResponse(*job, *m);
}

absl::Status JobManager::CheckGeneration(const Job& job, uint64_t generation) const {
  if (generation != job.status.generation() || job.status.state() != v1::JOB_STATE_RUNNING) {
    return absl::AbortedError(absl::StrCat("generation ", generation, " of job ", job.status.job_id(),
                                           " is not current (current generation ",
                                           job.status.generation(), ", state ",
                                           StateName(job.status.state()), "); re-join"));
  }
  return absl::OkStatus();
}

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
  if (req.generation() != job->status.generation() || m.generation != job->status.generation() ||
      job->status.state() != v1::JOB_STATE_RUNNING) {
    resp.set_directive(v1::DIRECTIVE_ABORT_AND_REJOIN);
    resp.set_message(absl::StrCat("generation ", req.generation(), " is over (job ",
                                  StateName(job->status.state()), ", generation ",
                                  job->status.generation(), ")",
                                  job->status.message().empty() ? "" : ": ", job->status.message()));
    return resp;
  }
  resp.set_directive(v1::DIRECTIVE_CONTINUE);
  if (m.info.rank() == 0) {
    const uint64_t total = job->status.progress().total_iterations();
    *job->status.mutable_progress() = req.progress();
    job->status.mutable_progress()->set_total_iterations(total);
    if (req.completed()) {
      v1::JobStatus next = Snapshot(*job);
      next.set_state(v1::JOB_STATE_SUCCEEDED);
      next.set_message(absl::StrCat("finished ", next.spec().epochs(), " epochs"));
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
  return Persist(*job, std::move(next));
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
  return Persist(*job, std::move(next));
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
  if (req.generation() == job->status.generation() && job->status.state() == v1::JOB_STATE_RUNNING) {
    return BreakGeneration(*job, msg, true);
  }
  return absl::OkStatus();
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
    // Elastic re-formation is due by time, not by a Join: try it here too (waiting joiners are
    // woken by the transition).
    if (job.status.state() == v1::JOB_STATE_RECOVERING && job.status.spec().min_workers() < job.status.spec().world_size()) {
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
