// JobManager unit tests: the state machine, rank assignment, generations, liveness,
// bootstrap store and durability, with an in-memory store and a fake clock.
#include "coordinator/job_manager.h"

#include <gtest/gtest.h>

#include "common/job_spec.h"
#include "common/lr_schedule.h"

#include <atomic>
#include <future>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lmsgd::coordinator {
namespace {

class FakeClock {
 public:
  absl::Time Now() const { return absl::FromUnixNanos(nanos_.load()); }
  void Advance(absl::Duration d) { nanos_ += absl::ToInt64Nanoseconds(d); }

 private:
  std::atomic<int64_t> nanos_{absl::ToUnixNanos(absl::Now())};
};

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override { Reset(); }

  void Reset() {
    manager_.reset();
    JobManagerOptions o;
    o.heartbeat_timeout = absl::Seconds(10);
    o.now = [this] { return clock_.Now(); };
    o.max_live_jobs = 3;
    options_ = o;
    manager_ = std::make_unique<JobManager>(o, &store_, nullptr);
  }

  v1::JobStatus SubmitJob(uint32_t world_size, uint32_t max_recoveries = 10) {
    v1::JobSpec spec;
    spec.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
    spec.set_world_size(world_size);
    spec.set_max_recoveries(max_recoveries);
    auto job = manager_->Submit(spec);
    EXPECT_TRUE(job.ok()) << job.status();
    return *job;
  }

  static v1::JoinJobRequest JoinReq(const std::string& host, uint32_t dev, const std::string& job,
                                    const std::string& inc = "i1") {
    v1::JoinJobRequest r;
    r.mutable_identity()->set_host(host);
    r.mutable_identity()->set_local_device(dev);
    r.mutable_identity()->set_incarnation(inc);
    r.set_job_id(job);
    return r;
  }

  std::future<absl::StatusOr<v1::JoinJobResponse>> JoinAsync(v1::JoinJobRequest req,
                                                             absl::Duration wait = absl::Seconds(5)) {
    return std::async(std::launch::async, [this, req, wait] { return manager_->Join(req, absl::Now() + wait); });
  }

  // Joins all (host, device) pairs concurrently and returns their replies in input order.
  std::vector<v1::JoinJobResponse> JoinAll(const std::string& job,
                                           const std::vector<std::pair<std::string, uint32_t>>& workers,
                                           const std::string& inc = "i1") {
    std::vector<std::future<absl::StatusOr<v1::JoinJobResponse>>> fs;
    for (const auto& [h, d] : workers) fs.push_back(JoinAsync(JoinReq(h, d, job, inc)));
    std::vector<v1::JoinJobResponse> out;
    for (auto& f : fs) {
      auto r = f.get();
      EXPECT_TRUE(r.ok()) << r.status();
      out.push_back(r.ok() ? *r : v1::JoinJobResponse());
    }
    return out;
  }

  v1::HeartbeatResponse Beat(const v1::JoinJobResponse& j, bool completed = false, uint64_t iter = 0) {
    v1::HeartbeatRequest r;
    r.set_job_id(j.job_id());
    r.set_worker_id(j.worker_id());
    r.set_generation(j.generation());
    r.set_rank(j.rank());
    r.mutable_progress()->set_iteration(iter);
    r.mutable_progress()->set_lr(0.1);
    r.set_completed(completed);
    auto resp = manager_->Heartbeat(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? *resp : v1::HeartbeatResponse();
  }

  v1::JobState State(const std::string& job) { return manager_->Get(job)->state(); }

  FakeClock clock_;
  MemoryStateStore store_;
  JobManagerOptions options_;
  std::unique_ptr<JobManager> manager_;
};

TEST_F(JobManagerTest, SubmitIsPersistedAndPending) {
  auto job = SubmitJob(2);
  EXPECT_EQ(job.job_id(), "job-000001");
  EXPECT_EQ(job.state(), v1::JOB_STATE_PENDING);
  EXPECT_EQ(store_.writes(), 1u);
  EXPECT_EQ(SubmitJob(2).job_id(), "job-000002");
}

TEST_F(JobManagerTest, InvalidSpecRejectedNamingFields) {
  v1::JobSpec spec;  // no dataset kind
  spec.set_momentum(2);
  auto r = manager_->Submit(spec);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "dataset.kind")) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "momentum")) << r.status();
  EXPECT_EQ(store_.writes(), 0u);
}

TEST_F(JobManagerTest, FailedPersistMeansNoJob) {
  store_.set_fail_writes(true);
  v1::JobSpec spec;
  spec.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
  auto r = manager_->Submit(spec);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(manager_->List(true).empty());
  store_.set_fail_writes(false);
  EXPECT_EQ(SubmitJob(1).job_id(), "job-000001");
}

TEST_F(JobManagerTest, LiveJobLimit) {
  SubmitJob(1);
  SubmitJob(1);
  auto third = SubmitJob(1);
  v1::JobSpec spec;
  spec.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
  EXPECT_EQ(manager_->Submit(spec).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(manager_->Cancel(third.job_id(), "").ok());
  EXPECT_TRUE(manager_->Submit(spec).ok());
}

TEST_F(JobManagerTest, JoinWaitsForWorldSizeThenRanksAreContiguousPerHost) {
  auto job = SubmitJob(4);
  // The first worker alone does not form a generation.
  auto lone = manager_->Join(JoinReq("hostB", 1, job.job_id()), absl::Now() + absl::Milliseconds(100));
  ASSERT_TRUE(lone.ok()) << lone.status();
  EXPECT_FALSE(lone->assigned());
  EXPECT_EQ(lone->joined(), 1u);
  EXPECT_EQ(lone->needed(), 4u);
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_WAITING_FOR_WORKERS);

  auto replies = JoinAll(job.job_id(), {{"hostB", 1}, {"hostA", 1}, {"hostB", 0}, {"hostA", 0}});
  // Sorted by (host, device): A0 A1 B0 B1.
  const std::vector<std::pair<int, int>> want = {{3, 1}, {1, 1}, {2, 0}, {0, 0}};
  for (size_t i = 0; i < replies.size(); ++i) {
    ASSERT_TRUE(replies[i].assigned());
    EXPECT_EQ(replies[i].rank(), want[i].first) << i;
    EXPECT_EQ(replies[i].local_rank(), want[i].second) << i;
    EXPECT_EQ(replies[i].world_size(), 4);
    EXPECT_EQ(replies[i].local_world_size(), 2);
    EXPECT_EQ(replies[i].num_nodes(), 2);
    EXPECT_EQ(replies[i].generation(), 1u);
    EXPECT_EQ(replies[i].schedule().global_batch(), 128u);
    EXPECT_NEAR(replies[i].schedule().peak_lr(), 0.05, 1e-12);
    EXPECT_EQ(replies[i].members_size(), 4);
  }
  EXPECT_EQ(replies[0].node_rank(), 1);
  EXPECT_EQ(replies[1].node_rank(), 0);
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(status.generation(), 1u);
  ASSERT_EQ(status.workers_size(), 4);
  EXPECT_EQ(status.workers(0).host(), "hostA");
  EXPECT_EQ(status.workers(0).rank(), 0);
}

// A worker whose JoinJob wait ended (unassigned) can be given a rank before it calls again:
// the next call returns that assignment instead of breaking the new generation.
TEST_F(JobManagerTest, AssignmentMadeBetweenJoinCallsIsHandedOut) {
  auto job = SubmitJob(2);
  auto lone = manager_->Join(JoinReq("h", 0, job.job_id()), absl::Now() + absl::Milliseconds(50));
  ASSERT_TRUE(lone.ok());
  ASSERT_FALSE(lone->assigned());
  auto other = JoinAll(job.job_id(), {{"h", 1}});  // forms generation 1 with h/0 included
  ASSERT_TRUE(other[0].assigned());
  auto again = manager_->Join(JoinReq("h", 0, job.job_id()), absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->assigned());
  EXPECT_EQ(again->generation(), 1u);
  EXPECT_EQ(again->rank(), 0);
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RUNNING);
  // Re-joining with last_generation = 1 means leaving generation 1.
  auto leave = JoinReq("h", 0, job.job_id());
  leave.set_last_generation(1);
  auto left = manager_->Join(leave, absl::Now() + absl::Milliseconds(50));
  ASSERT_TRUE(left.ok());
  EXPECT_FALSE(left->assigned());
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RECOVERING);
}

TEST_F(JobManagerTest, ExtraWorkerIsStandby) {
  auto job = SubmitJob(2);
  auto replies = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  auto extra = manager_->Join(JoinReq("h", 2, job.job_id()), absl::Now() + absl::Milliseconds(100));
  ASSERT_TRUE(extra.ok());
  EXPECT_FALSE(extra->assigned());
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.workers_size(), 3);
  EXPECT_EQ(status.workers(2).rank(), -1);
}

TEST_F(JobManagerTest, HeartbeatsProgressAndSuccess) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  EXPECT_EQ(Beat(r[0], false, 7).directive(), v1::DIRECTIVE_CONTINUE);
  EXPECT_EQ(Beat(r[1], false, 3).directive(), v1::DIRECTIVE_CONTINUE);
  // Rank 0's progress is the job's.
  EXPECT_EQ(manager_->Get(job.job_id())->progress().iteration(), 7u);
  EXPECT_EQ(Beat(r[0], true, 10).directive(), v1::DIRECTIVE_STOP);
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Beat(r[1]).directive(), v1::DIRECTIVE_STOP);
}

TEST_F(JobManagerTest, SilentWorkerIsDeclaredDeadAndSurvivorsRejoin) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  clock_.Advance(absl::Seconds(6));
  Beat(r[0]);
  manager_->Tick();
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RUNNING);
  clock_.Advance(absl::Seconds(6));  // rank 1 silent for 12 s > 10 s
  manager_->Tick();
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_RECOVERING);
  EXPECT_TRUE(absl::StrContains(status.message(), "h/1/i1")) << status.message();
  EXPECT_EQ(status.recoveries(), 1u);
  EXPECT_EQ(Beat(r[0]).directive(), v1::DIRECTIVE_ABORT_AND_REJOIN);
  // The dead worker's heartbeat (it was only slow) is told to re-join as well.
  EXPECT_EQ(Beat(r[1]).directive(), v1::DIRECTIVE_ABORT_AND_REJOIN);
  // Bootstrap of the old generation is refused.
  v1::PublishBootstrapRequest pub;
  pub.set_job_id(job.job_id());
  pub.set_generation(1);
  pub.set_rank(0);
  pub.set_key("k");
  EXPECT_EQ(manager_->PublishBootstrap(pub).code(), absl::StatusCode::kAborted);
  // Survivor + replacement form generation 2.
  auto r2 = JoinAll(job.job_id(), {{"h", 0}, {"h", 2}});
  EXPECT_EQ(r2[0].generation(), 2u);
  EXPECT_EQ(r2[1].generation(), 2u);
  EXPECT_EQ(r2[0].rank(), 0);
  EXPECT_EQ(r2[1].rank(), 1);
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Beat(r2[1]).directive(), v1::DIRECTIVE_CONTINUE);
  // A heartbeat from generation 1 is stale.
  EXPECT_EQ(Beat(r[0]).directive(), v1::DIRECTIVE_ABORT_AND_REJOIN);
}

TEST_F(JobManagerTest, WorkerInsideJoinIsNotDeclaredDead) {
  auto job = SubmitJob(2);
  auto waiting = JoinAsync(JoinReq("h", 0, job.job_id()), absl::Seconds(2));
  absl::SleepFor(absl::Milliseconds(100));
  clock_.Advance(absl::Seconds(60));
  manager_->Tick();
  auto r = JoinAll(job.job_id(), {{"h", 1}});
  auto first = waiting.get();
  ASSERT_TRUE(first.ok());
  EXPECT_TRUE(first->assigned());
  EXPECT_TRUE(r[0].assigned());
}

// A restarted worker names the incarnation it replaces (it found that one's slot lock free):
// the old member goes at once and the generation breaks.
TEST_F(JobManagerTest, RestartedIncarnationBreaksGeneration) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  v1::JoinJobRequest restarted = JoinReq("h", 1, job.job_id(), "i2");
  restarted.mutable_identity()->set_replaces_incarnation("i1");
  auto again = manager_->Join(restarted, absl::Now() + absl::Milliseconds(50));
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->assigned());
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_RECOVERING);
  EXPECT_TRUE(absl::StrContains(status.message(), "restarted")) << status.message();
  EXPECT_EQ(Beat(r[1]).directive(), v1::DIRECTIVE_ABORT_AND_REJOIN);
}

// Two live workers claiming one (host, local_device): the second is refused, naming the
// holder and the fix, and the job is untouched; once the holder is silent it is replaced.
TEST_F(JobManagerTest, ALiveWorkersSlotIsNotTakenByAnother) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  auto clash = manager_->Join(JoinReq("h", 1, job.job_id(), "other"), absl::Now() + absl::Milliseconds(50));
  ASSERT_FALSE(clash.ok());
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(absl::StrContains(clash.status().message(), "held by the live worker h/1/i1")) << clash.status();
  EXPECT_TRUE(absl::StrContains(clash.status().message(), "--local_device")) << clash.status();
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(Beat(r[1]).directive(), v1::DIRECTIVE_CONTINUE);
  // Naming a wrong incarnation proves nothing.
  v1::JoinJobRequest wrong = JoinReq("h", 1, job.job_id(), "other");
  wrong.mutable_identity()->set_replaces_incarnation("i9");
  EXPECT_EQ(manager_->Join(wrong, absl::Now() + absl::Milliseconds(50)).status().code(),
            absl::StatusCode::kAlreadyExists);
  // Silent past the timeout: replaced.
  clock_.Advance(absl::Seconds(11));
  Beat(r[0]);
  auto later = manager_->Join(JoinReq("h", 1, job.job_id(), "other"), absl::Now() + absl::Milliseconds(50));
  EXPECT_TRUE(later.ok()) << later.status();
}

// Stragglers: busy time (the step less exposed communication) against the median rank's, for
// straggler_heartbeats (5) heartbeats in a row above straggler_factor (1.5).
TEST_F(JobManagerTest, ARankSlowForFiveHeartbeatsIsAStraggler) {
  auto job = SubmitJob(3);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}, {"h", 2}});
  auto beat = [&](const v1::JoinJobResponse& j, double busy, double comm) {
    v1::HeartbeatRequest req;
    req.set_job_id(j.job_id());
    req.set_worker_id(j.worker_id());
    req.set_generation(j.generation());
    req.set_rank(j.rank());
    req.mutable_recent_step()->set_forward_s(busy / 2);
    req.mutable_recent_step()->set_backward_s(busy / 2);
    req.mutable_recent_step()->set_exposed_comm_s(comm);
    req.set_recent_steps(4);
    ASSERT_TRUE(manager_->Heartbeat(req).ok());
  };
  auto flagged = [&] {
    std::vector<int> ranks;
    const v1::JobStatus st = *manager_->Get(job.job_id());
    for (const auto& w : st.workers()) {
      if (w.straggler()) ranks.push_back(w.rank());
    }
    return ranks;
  };
  const int slow = r[2].rank();
  for (int i = 0; i < 4; ++i) {
    for (const auto& j : r) beat(j, j.rank() == slow ? 0.30 : 0.10, j.rank() == slow ? 0.0 : 0.20);
  }
  EXPECT_TRUE(flagged().empty()) << "4 heartbeats are not yet 5";
  for (const auto& j : r) beat(j, j.rank() == slow ? 0.30 : 0.10, j.rank() == slow ? 0.0 : 0.20);
  EXPECT_EQ(flagged(), std::vector<int>{slow});
  const v1::JobStatus st = *manager_->Get(job.job_id());
  for (const auto& w : st.workers()) {
    EXPECT_NEAR(w.busy_ratio(), w.rank() == slow ? 3.0 : 1.0, 1e-9) << w.rank();
    EXPECT_NEAR(w.recent_step().exposed_comm_s(), w.rank() == slow ? 0.0 : 0.2, 1e-12);
  }
  // Back to speed: the flag clears with its next heartbeat.
  for (const auto& j : r) beat(j, 0.10, 0.0);
  EXPECT_TRUE(flagged().empty());
}

// An elastic job (2 of up to 3) with a standby worker grows at a checkpoint once the grow
// interval has passed since it formed, waits for all three to re-join (not the first two), and
// records the generations; growth is not a recovery.
TEST_F(JobManagerTest, AnElasticJobGrowsAtACheckpointOncePerGrowInterval) {
  manager_.reset();
  options_.grow_interval = absl::Seconds(60);
  manager_ = std::make_unique<JobManager>(options_, &store_, nullptr);
  v1::JobSpec spec;
  spec.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
  spec.set_world_size(2);
  spec.set_max_workers(3);
  const std::string job = manager_->Submit(spec)->job_id();
  auto r = JoinAll(job, {{"h", 0}, {"h", 1}});
  ASSERT_EQ(r[0].world_size(), 2);
  const v1::Schedule old = manager_->Get(job)->schedule();
  auto standby = JoinAsync(JoinReq("h", 2, job), absl::Seconds(30));
  auto checkpoint = [&](uint32_t epoch) {
    const v1::Schedule& sc = manager_->Get(job)->schedule();
    v1::ReportCheckpointRequest c;
    c.set_job_id(job);
    c.set_worker_id(r[0].worker_id());
    c.mutable_checkpoint()->set_path(absl::StrCat("/ckpt/e", epoch));
    c.mutable_checkpoint()->set_epoch(epoch);
    c.mutable_checkpoint()->set_iteration(epoch * sc.iterations_per_epoch());
    c.mutable_checkpoint()->set_generation(1);
    return manager_->ReportCheckpoint(c);
  };
  // The standby is registered (inside its Join) before the first checkpoint.
  for (int i = 0; i < 200 && manager_->Get(job)->workers_size() < 3; ++i) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_EQ(manager_->Get(job)->workers_size(), 3);
  ASSERT_TRUE(checkpoint(1).ok());
  EXPECT_EQ(State(job), v1::JOB_STATE_RUNNING) << "formed 0 s ago, under the 60 s grow interval";
  clock_.Advance(absl::Seconds(61));
  Beat(r[0]);
  Beat(r[1]);
  ASSERT_TRUE(checkpoint(2).ok());
  v1::JobStatus st = *manager_->Get(job);
  EXPECT_EQ(st.state(), v1::JOB_STATE_RECOVERING);
  EXPECT_EQ(st.message(), "growing from 2 to 3 workers at the checkpoint of epoch 2 (1 standby worker ready)");
  EXPECT_EQ(st.recoveries(), 0u);
  EXPECT_EQ(Beat(r[0]).directive(), v1::DIRECTIVE_ABORT_AND_REJOIN);
  // Rank 0 re-joins first: with the standby that is world_size, but the growth waits for 3.
  auto req0 = JoinReq("h", 0, job);
  req0.set_last_generation(1);
  auto again0 = JoinAsync(req0, absl::Seconds(30));
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(State(job), v1::JOB_STATE_RECOVERING);
  auto req1 = JoinReq("h", 1, job);
  req1.set_last_generation(1);
  auto again1 = JoinAsync(req1, absl::Seconds(30));
  for (auto* f : {&standby, &again0, &again1}) {
    auto j = f->get();
    ASSERT_TRUE(j.ok()) << j.status();
    EXPECT_EQ(j->generation(), 2u);
    EXPECT_EQ(j->world_size(), 3);
    EXPECT_EQ(j->resume_from().path(), "/ckpt/e2");
  }
  st = *manager_->Get(job);
  EXPECT_EQ(st.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(st.schedule().global_batch(), 96u);
  EXPECT_DOUBLE_EQ(st.schedule().peak_lr(), 0.1 * 96 / 256);
  // The same re-warm ramp as a shrink: from the old rate at the checkpoint to the new schedule.
  EXPECT_EQ(st.schedule().rewarm_start_iteration(), 2 * st.schedule().iterations_per_epoch());
  EXPECT_DOUBLE_EQ(st.schedule().rewarm_from_lr(), LearningRate(ScheduleParams(old), 2 * old.iterations_per_epoch()));
  ASSERT_EQ(st.generations_size(), 2);
  EXPECT_EQ(st.generations(0).world_size(), 2u);
  EXPECT_EQ(st.generations(0).reason(), "first formation");
  EXPECT_EQ(st.generations(1).generation(), 2u);
  EXPECT_EQ(st.generations(1).world_size(), 3u);
  EXPECT_EQ(st.generations(1).global_batch(), 96u);
  EXPECT_EQ(st.generations(1).resume_epoch(), 2u);
  EXPECT_TRUE(absl::StrContains(st.generations(1).reason(), "growing from 2 to 3")) << st.generations(1).reason();
}

// Blame: the first failure report may name a survivor (rank 0 waited for rank 3, which waited
// for the dead rank 2). The coordinator waits for the generation's answers and names the rank
// that never answered; when all answer, the one whose collectives lag.
TEST_F(JobManagerTest, TheRankBehindAFailureIsNamedNotTheSurvivorTheReporterWaitedFor) {
  manager_.reset();
  options_.heartbeat_interval = absl::Seconds(1);  // a failure window of 3 s
  manager_ = std::make_unique<JobManager>(options_, &store_, nullptr);
  const std::string job = manager_->Submit([] {
                                     v1::JobSpec s;
                                     s.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
                                     s.set_world_size(4);
                                     return s;
                                   }())->job_id();
  auto r = JoinAll(job, {{"h", 0}, {"h", 1}, {"h", 2}, {"h", 3}});
  auto beat = [&](const v1::JoinJobResponse& j, uint64_t completed) {
    v1::HeartbeatRequest req;
    req.set_job_id(j.job_id());
    req.set_worker_id(j.worker_id());
    req.set_generation(j.generation());
    req.set_rank(j.rank());
    req.set_collectives_completed(completed);
    return manager_->Heartbeat(req)->directive();
  };
  auto fail = [&](const v1::JoinJobResponse& j, uint64_t completed, const std::string& msg) {
    v1::ReportFailureRequest f;
    f.set_job_id(job);
    f.set_worker_id(j.worker_id());
    f.set_generation(j.generation());
    f.set_message(msg);
    f.set_collectives_completed(completed);
    ASSERT_TRUE(manager_->ReportFailure(f).ok());
  };
  for (const auto& j : r) beat(j, 40);
  fail(r[0], 41, "allreduce #42: timed out waiting for rank 3 to send");
  EXPECT_EQ(State(job), v1::JOB_STATE_RECOVERING);
  EXPECT_TRUE(absl::StrContains(manager_->Get(job)->message(), "waiting for rank 3")) << "the first report, for now";
  fail(r[1], 41, "allreduce #42: rank 2 failed");
  EXPECT_EQ(beat(r[3], 41), v1::DIRECTIVE_ABORT_AND_REJOIN);  // rank 3 answers with its heartbeat
  manager_->Tick();
  EXPECT_FALSE(absl::StartsWith(manager_->Get(job)->message(), "rank ")) << "the window is still open";
  clock_.Advance(absl::Seconds(4));
  manager_->Tick();
  std::string msg = manager_->Get(job)->message();
  EXPECT_TRUE(absl::StartsWith(msg, absl::StrCat("rank 2 (", r[2].worker_id(), ", last heard at collective #40)")))
      << msg;
  EXPECT_TRUE(absl::StrContains(msg, "stopped responding")) << msg;
  EXPECT_TRUE(absl::StrContains(msg, "the others completed collectives up to #41")) << msg;
  EXPECT_TRUE(absl::StrContains(msg, "first report: worker " + r[0].worker_id())) << msg;
  EXPECT_FALSE(absl::StrContains(msg, "rank 3 (")) << msg;

  // The next generation; this time every rank answers and rank 1's collectives lag.
  std::vector<v1::JoinJobResponse> r2;
  {
    std::vector<std::future<absl::StatusOr<v1::JoinJobResponse>>> fs;
    for (uint32_t d : {0u, 1u, 2u, 3u}) {
      auto req = JoinReq("h", d, job, d == 2 ? "i2" : "i1");
      req.set_last_generation(1);
      if (d == 2) req.mutable_identity()->set_replaces_incarnation("i1");
      fs.push_back(JoinAsync(req));
    }
    for (auto& f : fs) r2.push_back(*f.get());
  }
  ASSERT_EQ(r2[0].generation(), 2u);
  const v1::JobStatus formed = *manager_->Get(job);
  ASSERT_EQ(formed.generations_size(), 2);
  EXPECT_TRUE(absl::StartsWith(formed.generations(1).reason(), "rank 2 (")) << formed.generations(1).reason();
  for (const auto& j : r2) beat(j, 100);
  fail(r2[0], 120, "allreduce #121: timed out waiting for rank 3 to send");
  fail(r2[2], 120, "allreduce #121: timed out waiting for rank 1 to send");
  fail(r2[3], 120, "allreduce #121: timed out waiting for rank 2 to send");
  EXPECT_FALSE(absl::StartsWith(manager_->Get(job)->message(), "rank ")) << "rank 1 has not answered";
  fail(r2[1], 117, "allreduce #118: aborted");
  msg = manager_->Get(job)->message();
  EXPECT_TRUE(absl::StartsWith(msg, absl::StrCat("rank 1 (", r2[1].worker_id(),
                                                    ") fell behind: its collectives succeeded up to #117, the "
                                                    "others' up to #120")))
      << msg;
}

TEST_F(JobManagerTest, TooManyRecoveriesFailsTheJob) {
  auto job = SubmitJob(1, /*max_recoveries=*/1);
  JoinAll(job.job_id(), {{"h", 0}});
  clock_.Advance(absl::Seconds(11));
  manager_->Tick();
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RECOVERING);
  JoinAll(job.job_id(), {{"h", 0}}, "i2");
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RUNNING);
  clock_.Advance(absl::Seconds(11));
  manager_->Tick();
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_FAILED);
  EXPECT_TRUE(absl::StrContains(status.message(), "max_recoveries")) << status.message();
}

TEST_F(JobManagerTest, BootstrapExchange) {
  auto job = SubmitJob(3);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}, {"h", 2}});
  auto pub = [&](int rank, const std::string& v) {
    v1::PublishBootstrapRequest p;
    p.set_job_id(job.job_id());
    p.set_generation(1);
    p.set_rank(rank);
    p.set_key("ucx_address");
    p.set_value(v);
    return manager_->PublishBootstrap(p);
  };
  v1::GetBootstrapRequest get;
  get.set_job_id(job.job_id());
  get.set_generation(1);
  get.set_key("ucx_address");
  ASSERT_TRUE(pub(0, "a0").ok());
  ASSERT_TRUE(pub(2, "a2").ok());
  // Missing rank 1: the deadline error names it.
  auto timed_out = manager_->GetBootstrap(get, absl::Now() + absl::Milliseconds(100));
  EXPECT_EQ(timed_out.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(timed_out.status().message(), "rank(s) 1 ")) << timed_out.status();
  // A waiting Get completes when rank 1 publishes.
  auto waiter = std::async(std::launch::async, [&] { return manager_->GetBootstrap(get, absl::Now() + absl::Seconds(5)); });
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_TRUE(pub(1, "a1").ok());
  auto all = waiter.get();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->entries_size(), 3);
  EXPECT_EQ(all->entries(1).value(), "a1");
  // Idempotent republish; conflicting republish refused; rank range checked.
  EXPECT_TRUE(pub(1, "a1").ok());
  EXPECT_EQ(pub(1, "other").code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(pub(3, "x").code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JobManagerTest, CancelStopsWorkersAndIsFinal) {
  auto job = SubmitJob(1);
  auto r = JoinAll(job.job_id(), {{"h", 0}});
  auto c = manager_->Cancel(job.job_id(), "user request");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(Beat(r[0]).directive(), v1::DIRECTIVE_STOP);
  EXPECT_EQ(manager_->Cancel(job.job_id(), "").status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(manager_->Cancel("job-999999", "").status().code(), absl::StatusCode::kNotFound);
  auto join = manager_->Join(JoinReq("h", 0, job.job_id()), absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(join.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(manager_->List(false).empty());
  EXPECT_EQ(manager_->List(true).size(), 1u);
}

TEST_F(JobManagerTest, IncompatibleWorkersRefused) {
  auto job = SubmitJob(1);
  auto req = JoinReq("h", 0, job.job_id());
  req.mutable_identity()->set_device(v1::DEVICE_CUDA);
  auto r = manager_->Join(req, absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "DEVICE_CPU")) << r.status();
  req = JoinReq("h", 0, job.job_id());
  req.mutable_identity()->set_build_version("0.0.0-other");
  r = manager_->Join(req, absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "0.0.0-other")) << r.status();
  req = JoinReq("", 0, job.job_id());
  EXPECT_EQ(manager_->Join(req, absl::Now()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(manager_->Join(JoinReq("h", 0, "job-424242"), absl::Now()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(JobManagerTest, JoinWithoutJobIdTakesOldestJobNeedingWorkers) {
  auto a = SubmitJob(1);
  auto b = SubmitJob(1);
  auto r1 = manager_->Join(JoinReq("h", 0, ""), absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(r1->job_id(), a.job_id());
  auto r2 = manager_->Join(JoinReq("h", 1, ""), absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->job_id(), b.job_id());
  // No job needs workers: the call returns unassigned at its deadline.
  auto r3 = manager_->Join(JoinReq("h", 2, ""), absl::Now() + absl::Milliseconds(100));
  ASSERT_TRUE(r3.ok());
  EXPECT_FALSE(r3->assigned());
}

TEST_F(JobManagerTest, RecoverRestoresJobsAndMembers) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  v1::ReportCheckpointRequest ck;
  ck.set_job_id(job.job_id());
  ck.set_worker_id(r[0].worker_id());
  ck.mutable_checkpoint()->set_path("/ckpt/e1");
  ck.mutable_checkpoint()->set_epoch(1);
  ck.mutable_checkpoint()->set_generation(1);
  ASSERT_TRUE(manager_->ReportCheckpoint(ck).ok());
  SubmitJob(1);
  // "Restart": a new manager over the same store.
  Reset();
  ASSERT_TRUE(manager_->Recover().ok());
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(status.generation(), 1u);
  EXPECT_EQ(status.last_checkpoint().path(), "/ckpt/e1");
  EXPECT_EQ(status.workers_size(), 2);
  // The running workers carry on.
  EXPECT_EQ(Beat(r[0]).directive(), v1::DIRECTIVE_CONTINUE);
  EXPECT_EQ(Beat(r[1]).directive(), v1::DIRECTIVE_CONTINUE);
  // New ids continue after the highest one.
  EXPECT_EQ(SubmitJob(1).job_id(), "job-000003");
}

// After a restart a member is alive for the heartbeat timeout plus the restart grace (its
// reconnect backoff), then its silence counts as usual.
TEST_F(JobManagerTest, RestartGraceCoversTheTimeoutPlusTheReconnectBackoff) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  Reset();  // restart_grace default 3 s, heartbeat_timeout 10 s
  ASSERT_TRUE(manager_->Recover().ok());
  clock_.Advance(absl::Seconds(12));  // past the timeout, inside the grace
  manager_->Tick();
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RUNNING);
  Beat(r[0]);  // rank 0 reconnected; rank 1 stays silent
  clock_.Advance(absl::Seconds(1.5));  // 13.5 s: past timeout + grace
  manager_->Tick();
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_RECOVERING);
  EXPECT_TRUE(absl::StrContains(status.message(), "h/1/")) << status.message();
  EXPECT_FALSE(absl::StrContains(status.message(), "h/0/")) << status.message();
}

TEST_F(JobManagerTest, TickPersistFailureIsRetried) {
  auto job = SubmitJob(1);
  JoinAll(job.job_id(), {{"h", 0}});
  store_.set_fail_writes(true);
  clock_.Advance(absl::Seconds(11));
  manager_->Tick();
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RECOVERING);
  store_.set_fail_writes(false);
  manager_->Tick();
  Reset();
  ASSERT_TRUE(manager_->Recover().ok());
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RECOVERING);
}

TEST_F(JobManagerTest, WaitForUpdateWakesOnChange) {
  auto job = SubmitJob(1);
  auto first = manager_->WaitForUpdate(job.job_id(), 0, absl::Now());
  ASSERT_TRUE(first.ok());
  const uint64_t v = first->first;
  auto same = manager_->WaitForUpdate(job.job_id(), v, absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(same->first, v);
  auto waiter = std::async(std::launch::async, [&] {
    return manager_->WaitForUpdate(job.job_id(), v, absl::Now() + absl::Seconds(5));
  });
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_TRUE(manager_->Cancel(job.job_id(), "").ok());
  auto changed = waiter.get();
  ASSERT_TRUE(changed.ok());
  EXPECT_NE(changed->first, v);
  EXPECT_EQ(changed->second.state(), v1::JOB_STATE_CANCELLED);
}

TEST_F(JobManagerTest, ReportFailure) {
  auto job = SubmitJob(2);
  auto r = JoinAll(job.job_id(), {{"h", 0}, {"h", 1}});
  v1::ReportFailureRequest f;
  f.set_job_id(job.job_id());
  f.set_worker_id(r[1].worker_id());
  f.set_generation(1);
  f.set_message("allreduce: peer rank 0 timed out");
  ASSERT_TRUE(manager_->ReportFailure(f).ok());
  EXPECT_EQ(State(job.job_id()), v1::JOB_STATE_RECOVERING);
  f.set_fatal(true);
  f.set_message("corrupt JPEG /data/x.jpg");
  ASSERT_TRUE(manager_->ReportFailure(f).ok());
  auto status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.state(), v1::JOB_STATE_FAILED);
  EXPECT_TRUE(absl::StrContains(status.message(), "/data/x.jpg"));
}

TEST_F(JobManagerTest, EpochRecordsFormTheHistoryAndThePapersError) {
  auto job = SubmitJob(1);
  auto r = JoinAll(job.job_id(), {{"h", 0}});
  auto report = [&](uint32_t epoch, double top1, uint64_t generation = 1) {
    v1::ReportEpochRequest req;
    req.set_job_id(job.job_id());
    req.set_worker_id(r[0].worker_id());
    req.set_generation(generation);
    req.mutable_record()->set_epoch(epoch);
    req.mutable_record()->set_iteration(10 * epoch);
    req.mutable_record()->set_mean_loss(1.0 / epoch);
    if (top1 >= 0) {
      req.mutable_record()->mutable_evaluation()->set_examples(100);
      req.mutable_record()->mutable_evaluation()->set_top1_error(top1);
    }
    return manager_->ReportEpoch(req);
  };
  for (uint32_t e = 1; e <= 6; ++e) ASSERT_TRUE(report(e, 0.1 * (7 - e)).ok());  // 0.6 ... 0.1
  auto status = *manager_->Get(job.job_id());
  ASSERT_EQ(status.history_size(), 6);
  EXPECT_EQ(status.history(5).generation(), 1u);
  EXPECT_GT(status.history(5).time_unix_ms(), 0);
  EXPECT_EQ(status.last_evaluation().epoch(), 6u);
  EXPECT_NEAR(status.final_error().top1_error(), 0.3, 1e-12);  // median of epochs 2-6
  EXPECT_EQ(status.final_error().epochs(), 5u);
  // Persisted with the job.
  Reset();
  ASSERT_TRUE(manager_->Recover().ok());
  status = *manager_->Get(job.job_id());
  EXPECT_EQ(status.history_size(), 6);
  EXPECT_NEAR(status.final_error().top1_error(), 0.3, 1e-12);
  // A re-run epoch 4 drops 5 and 6; an evaluation reported on its own attaches to its epoch.
  ASSERT_TRUE(report(4, 0.5).ok());
  v1::ReportEvaluationRequest ev;
  ev.set_job_id(job.job_id());
  ev.set_worker_id(r[0].worker_id());
  ev.set_generation(1);
  ev.mutable_evaluation()->set_epoch(4);
  ev.mutable_evaluation()->set_examples(100);
  ev.mutable_evaluation()->set_top1_error(0.45);
  ASSERT_TRUE(manager_->ReportEvaluation(ev).ok());
  status = *manager_->Get(job.job_id());
  ASSERT_EQ(status.history_size(), 4);
  EXPECT_DOUBLE_EQ(status.history(3).mean_loss(), 0.25);
  EXPECT_DOUBLE_EQ(status.history(3).evaluation().top1_error(), 0.45);
  EXPECT_EQ(status.final_error().epochs(), 4u);
  EXPECT_NEAR(status.final_error().top1_error(), 0.475, 1e-12);  // 0.6 0.5 0.4 0.45: the middle two
  // Bad records are refused, naming the field; a stale generation is ABORTED.
  EXPECT_EQ(report(0, 0.1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(report(0, 0.1).message(), "record.epoch"));
  EXPECT_EQ(report(5, 1.5).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(report(5, 0.1, 7).code(), absl::StatusCode::kAborted);
  // A list of jobs leaves the history out; GetJob has it.
  for (const auto& j : manager_->List(true)) EXPECT_EQ(j.history_size(), 0);
}

}  // namespace
}  // namespace lmsgd::coordinator
