// JobManager: the coordinator's state machine for jobs, membership and generations.
// Plain C++ (no gRPC server): coordinator/service.cc adapts it, unit tests drive it directly.
//
// Job states (persisted before any transition is acknowledged):
//   PENDING --first worker ready--> WAITING_FOR_WORKERS --world_size ready--> RUNNING
//   RUNNING --worker dead / left / restarted / non-fatal failure--> RECOVERING
//   RUNNING --a checkpoint while standby workers could grow it (elastic)--> RECOVERING
//   RECOVERING --world_size ready again--> RUNNING (generation + 1)
//   RUNNING --rank 0 reports completed--> SUCCEEDED
//   any live state --cancel--> CANCELLED;  --fatal failure / too many recoveries--> FAILED
//
// Generations: every formation of the worker set gets generation + 1. Ranks are assigned
// deterministically: the chosen workers are sorted by (host, local_device), so ranks are
// contiguous per host and local_rank runs 0..g-1 on each host. A worker whose generation is not
// the job's current one, or whose job is not RUNNING, is told ABORT_AND_REJOIN; bootstrap blobs
// are keyed by generation and dropped when a new one forms.
//
// Liveness: a member is alive while it is inside a JoinJob call or was heard from within the
// heartbeat timeout. Tick() declares the others dead. Durable writes that Tick() cannot make
// are retried on the next Tick (the job stays marked dirty).
//
// Growth: an elastic job (max_workers > world_size) that is RUNNING with ready standby workers
// re-forms at the next checkpoint its rank 0 reports (the new generation resumes from it, the
// rate rescaled with the re-warm ramp of a shrink), at most once per grow_interval. The
// re-formation waits for the old generation's members and the standby together (up to a
// heartbeat timeout) so it does not form with whoever re-joins first. Growth is not a recovery
// (it does not count against max_recoveries).
//
// Blame: a non-fatal failure report breaks the generation at once, but the reporter may have
// waited for another survivor. For a failure window (2 heartbeat intervals + 1 s) the coordinator
// collects the broken generation's answers: failure reports and heartbeats carry each rank's
// completed collectives (comm/communicator.h), a re-join counts as an answer. Then, or once every
// member answered, it names in the job's message the members that never answered (dead or
// stopped), or else the one rank whose collectives lag the others', before the first report.
//
// Worker identity: (host, local_device) names a slot; incarnation tells a restarted process
// from the old one. worker_id = "host/device/incarnation".
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/metrics.h"
#include "coordinator/state_store.h"
#include "lmsgd/v1/coordinator.pb.h"
#include "lmsgd/v1/job.pb.h"

namespace lmsgd::coordinator {

struct JobManagerOptions {
  absl::Duration heartbeat_timeout = absl::Seconds(30);
  absl::Duration heartbeat_interval = absl::Seconds(5);  // told to workers
  absl::Duration max_join_wait = absl::Seconds(30);      // server cap on one JoinJob wait
  absl::Duration max_bootstrap_wait = absl::Seconds(120);
  // After a restart every member of a recovered job is alive for heartbeat_timeout plus this
  // long before its silence counts: the time its client needs to reconnect (worker/session/
  // coordinator_client.h bounds its retry and reconnect backoff to 1 s each).
  absl::Duration restart_grace = absl::Seconds(3);
  // Stragglers: a rank whose busy time per step (its step less exposed communication) stays
  // above straggler_factor x the median rank's for straggler_heartbeats heartbeats in a row.
  double straggler_factor = 1.5;
  int straggler_heartbeats = 5;
  // The least time between a job's formation and its growth by standby workers.
  absl::Duration grow_interval = absl::Minutes(5);
  size_t max_live_jobs = 1000;
  size_t max_bootstrap_bytes = 1 << 20;
  std::string build_version = LMSGD_VERSION;
  // Time source for liveness decisions (tests inject a fake).
  std::function<absl::Time()> now = [] { return absl::Now(); };
};

class JobManager {
 public:
  // `store` must outlive the manager; `metrics` may be null.
  JobManager(JobManagerOptions options, StateStore* store, CoordinatorMetrics* metrics);
  ~JobManager();

  // Loads persisted jobs. Members of a running generation get a fresh grace period (they keep
  // heartbeating to the restarted coordinator). Returns the unreadable records as warnings.
  absl::StatusOr<std::vector<std::string>> Recover();

  // --- client side ---
  // INVALID_ARGUMENT naming every bad field; RESOURCE_EXHAUSTED over max_live_jobs;
  // INTERNAL if the job cannot be persisted (then it does not exist).
  absl::StatusOr<v1::JobStatus> Submit(v1::JobSpec spec);
  absl::StatusOr<v1::JobStatus> Get(const std::string& job_id);
  std::vector<v1::JobStatus> List(bool include_finished);
  absl::StatusOr<v1::JobStatus> Cancel(const std::string& job_id, const std::string& reason);
  // Returns the job's status once its version differs from `known_version` (immediately if it
  // already does) or at `deadline` (then with the same version). NOT_FOUND for unknown jobs.
  absl::StatusOr<std::pair<uint64_t, v1::JobStatus>> WaitForUpdate(const std::string& job_id,
                                                                   uint64_t known_version,
                                                                   absl::Time deadline);

  // --- worker side ---
  absl::StatusOr<v1::JoinJobResponse> Join(const v1::JoinJobRequest& request, absl::Time deadline);
  absl::Status PublishBootstrap(const v1::PublishBootstrapRequest& request);
  absl::StatusOr<v1::GetBootstrapResponse> GetBootstrap(const v1::GetBootstrapRequest& request,
                                                        absl::Time deadline);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status ReportCheckpoint(const v1::ReportCheckpointRequest& request);
  absl::Status ReportEvaluation(const v1::ReportEvaluationRequest& request);
  absl::Status ReportEpoch(const v1::ReportEpochRequest& request);
  absl::Status ReportFailure(const v1::ReportFailureRequest& request);

  // Declares silent workers dead, retries pending durable writes, refreshes gauges.
  void Tick();
  // Wakes every waiting call; later waits return UNAVAILABLE.
  void Shutdown();

 private:
  // Merges into job->history (common/history.h) and recomputes final_error.
  static void AddToHistory(const v1::EpochRecord& record, v1::JobStatus* job);

  struct Member {
    v1::WorkerInfo info;
    absl::Time last_seen;
    absl::Time alive_until = absl::InfinitePast();  // restart grace (Recover)
    int join_calls = 0;
    bool ready = false;   // wants a rank in the next generation
    uint64_t ready_seq = 0;
    uint64_t generation = 0;  // generation it holds a rank in (0: none)
    bool has_step = false;
    uint64_t step_generation = 0;  // the generation recent_step was reported in
    v1::StepTimeSplit recent_step;
    double busy_ratio = 0;
    int slow_beats = 0;
    bool straggler = false;
    uint64_t collectives_generation = 0;  // the generation collectives_completed was heartbeated in
    uint64_t collectives_completed = 0;
  };
  struct FailureWindow {
    uint64_t generation = 0;  // the generation being judged; 0: no window open
    absl::Time opened;
    std::string first_report;
    std::map<std::string, int> rank_of;          // the generation's members, by worker_id
    std::map<std::string, uint64_t> completed;   // collectives completed, by worker_id
    std::set<std::string> answered;
  };
  struct Job {
    v1::JobStatus status;  // durable record, `workers` rebuilt from members on every save
    std::map<std::string, Member> members;  // by worker_id
    std::map<std::string, std::map<int, std::string>> bootstrap;  // key -> rank -> blob
    uint64_t version = 1;
    bool dirty = false;  // the last transition is not yet on disk (Tick retries)
    absl::Time recovering_since = absl::InfinitePast();  // elastic: when the generation broke
    absl::Time formed_at = absl::InfinitePast();         // when the current generation formed
    uint32_t grow_target = 0;  // growing: the size to wait for (0: not growing)
    FailureWindow window;
  };

  static bool IsFinal(v1::JobState state);
  Job* FindJob(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::JobStatus Snapshot(const Job& job) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Saves `next` (whose workers must already be filled) and makes it current.
  absl::Status Persist(Job& job, v1::JobStatus next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // As Persist, but on a failed write keeps the transition in memory and marks the job dirty.
  void PersistOrRetryLater(Job& job, v1::JobStatus next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Changed(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateStateGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int AliveCount(const Job& job, absl::Time now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IsAlive(const Member& m, absl::Time now) const;
  // Re-rates every rank of the running generation after `reporter`'s heartbeat.
  void UpdateStragglers(Job& job, const std::string& job_id, Member& reporter);
  // Forms a generation when enough members are ready.
  absl::Status TryForm(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Blame (above): opens the window on a failure report; records an answer from `worker_id` of
  // `generation` (count: its completed collectives, when known); settles when due or `force`.
  void OpenFailureWindow(Job& job, const std::string& reporter, const std::string& report,
                         std::optional<uint64_t> count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AnswerFailureWindow(Job& job, uint64_t generation, const std::string& worker_id,
                           std::optional<uint64_t> count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SettleFailureWindow(Job& job, bool force) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // RUNNING -> RECOVERING to re-form larger, when standby workers are ready (see Growth above).
  absl::Status MaybeGrow(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // RUNNING -> RECOVERING (or FAILED when out of recoveries). Acknowledged=false: Tick path.
  absl::Status BreakGeneration(Job& job, const std::string& reason, bool acknowledged)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::JoinJobResponse MakeJoinResponse(const Job& job, const Member& m) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckGeneration(const Job& job, uint64_t generation) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const JobManagerOptions options_;
  StateStore* const store_;
  CoordinatorMetrics* const metrics_;

  mutable absl::Mutex mu_;
  absl::CondVar changed_;
  std::map<std::string, std::unique_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);  // ordered by id = age
  uint64_t next_job_seq_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_ready_seq_ ABSL_GUARDED_BY(mu_) = 1;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace lmsgd::coordinator
