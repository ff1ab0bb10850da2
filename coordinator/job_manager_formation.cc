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

namespace {
constexpr int kMaxGenerationRecords = 100;
}  // namespace

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
  if (state == v1::JOB_STATE_RECOVERING && job.grow_target > need &&
      now - job.recovering_since < options_.heartbeat_timeout) {
    need = job.grow_target;  // growing: wait for the old generation and the standby together
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
  // The re-formation's reason is the job's message: settle who was behind first.
  if (state == v1::JOB_STATE_RECOVERING) SettleFailureWindow(job, true);
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
  {
    v1::GenerationRecord* g = next.add_generations();
    g->set_generation(generation);
    g->set_world_size(need);
    g->set_global_batch(next.schedule().global_batch());
    g->set_peak_lr(next.schedule().peak_lr());
    g->set_start_time_unix_ms(UnixMillis(absl::Now()));
    g->set_reason(state == v1::JOB_STATE_RECOVERING ? job.status.message() : "first formation");
    g->set_resume_epoch(job.status.last_checkpoint().epoch());
    if (next.generations_size() > kMaxGenerationRecords) {
      next.mutable_generations()->DeleteSubrange(0, next.generations_size() - kMaxGenerationRecords);
    }
  }
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
  job.grow_target = 0;
  job.formed_at = now;
  Changed(job);
  return absl::OkStatus();
}

absl::Status JobManager::MaybeGrow(Job& job) {
  const v1::JobSpec& spec = job.status.spec();
  const uint32_t k = job.status.world_size();
  if (job.status.state() != v1::JOB_STATE_RUNNING || spec.mode() == v1::JOB_MODE_EVALUATE ||
      spec.max_workers() <= k || job.status.last_checkpoint().epoch() >= spec.epochs()) {
    return absl::OkStatus();
  }
  const absl::Time now = options_.now();
  if (now - job.formed_at < options_.grow_interval) return absl::OkStatus();
  uint32_t standby = 0;
  for (const auto& [id, m] : job.members) {
    if (m.ready && IsAlive(m, now) && m.generation != job.status.generation()) ++standby;
  }
  const uint32_t target = std::min(k + standby, spec.max_workers());
  if (target <= k) return absl::OkStatus();
  const std::string reason =
      absl::StrCat("growing from ", k, " to ", target, " workers at the checkpoint of epoch ",
                   job.status.last_checkpoint().epoch(), " (", standby, " standby worker", standby > 1 ? "s" : "",
                   " ready)");
  LOG(INFO) << "job " << job.status.job_id() << ": " << reason;
  v1::JobStatus next = Snapshot(job);
  next.set_state(v1::JOB_STATE_RECOVERING);
  next.set_message(reason);
  RETURN_IF_ERROR(Persist(job, std::move(next)));
  job.bootstrap.clear();
  job.recovering_since = now;
  job.grow_target = target;
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
      const bool can_grow = s == v1::JOB_STATE_RUNNING && j->status.world_size() < j->status.spec().max_workers();
      if ((s == v1::JOB_STATE_PENDING || s == v1::JOB_STATE_WAITING_FOR_WORKERS ||
           s == v1::JOB_STATE_RECOVERING || can_grow) &&
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
  // Same slot, other incarnation: replaced when the old one is known dead (the new process
  // found the slot's lock free and names it) or silent; a live holder is a clash.
  const absl::Time now = options_.now();
  for (const auto& [other_id, old] : job->members) {
    if (old.info.host() == id.host() && old.info.local_device() == id.local_device() && other_id != worker_id &&
        old.info.incarnation() != id.replaces_incarnation() && IsAlive(old, now)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "local device ", id.local_device(), " of host ", id.host(), " is held by the live worker ", other_id,
          " (heard from ", absl::FormatDuration(absl::Trunc(now - old.last_seen, absl::Milliseconds(100))),
          " ago): start this worker with another --local_device (or leave it unset to claim a free one), or stop "
          "the other"));
    }
  }
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
  AnswerFailureWindow(*job, req.last_generation(), worker_id, std::nullopt);
  SettleFailureWindow(*job, false);
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

}  // namespace lmsgd::coordinator
