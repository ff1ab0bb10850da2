// Integration tests over real gRPC on loopback against a real lmsgd-coordinator process:
// simulated workers (the worker's CoordinatorClient, no training), lmsgdctl as a subprocess,
// /metrics over HTTP, kill -9 and restart, bearer token and TLS.
#include <gtest/gtest.h>

#include <set>
#include <signal.h>

#include <future>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/history.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "lmsgd/v1/coordinator.grpc.pb.h"
#include "tests/integration/test_util.h"
#include "worker/comm/communicator.h"
#include "worker/comm/ucx_transport.h"
#include "worker/session/coordinator_client.h"
#include "worker/session/coordinator_store.h"

namespace lmsgd {
namespace {

using testing::CoordinatorProcess;
using testing::MakeTempDir;
using testing::RunCommand;

v1::JobSpec SmallSpec(uint32_t world_size) {
  v1::JobSpec s;
  s.set_name("it");
  s.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
  s.mutable_dataset()->set_train_examples(6400);
  s.set_world_size(world_size);
  s.set_epochs(2);
  s.set_warmup_epochs(1);
  return s;
}

std::unique_ptr<v1::Coordinator::Stub> Stub(const std::string& addr) {
  return v1::Coordinator::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
}

std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token = "") {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
  return c;
}

std::string Submit(const std::string& addr, const v1::JobSpec& spec) {
  v1::SubmitJobRequest req;
  *req.mutable_spec() = spec;
  v1::SubmitJobResponse resp;
  auto ctx = Ctx();
  grpc::Status st = Stub(addr)->SubmitJob(ctx.get(), req, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return resp.job_id();
}

v1::JobStatus GetJob(const std::string& addr, const std::string& id) {
  v1::GetJobRequest req;
  req.set_job_id(id);
  v1::JobStatus resp;
  auto ctx = Ctx();
  grpc::Status st = Stub(addr)->GetJob(ctx.get(), req, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return resp;
}

std::unique_ptr<session::CoordinatorClient> Client(const std::string& addr) {
  session::CoordinatorClientOptions o;
  o.address = addr;
  return *session::CoordinatorClient::Create(o);
}

v1::WorkerIdentity Identity(const std::string& host, uint32_t dev) {
  v1::WorkerIdentity id;
  id.set_host(host);
  id.set_local_device(dev);
  id.set_incarnation(absl::StrCat("inc", dev, "-", ::getpid()));
  id.set_build_version(LMSGD_VERSION);
  return id;
}

// Joins `n` simulated workers concurrently: worker i is (hosts[i], devices[i]).
std::vector<v1::JoinJobResponse> JoinWorkers(const std::string& addr, const std::string& job,
                                             const std::vector<std::pair<std::string, uint32_t>>& who) {
  std::vector<std::future<absl::StatusOr<v1::JoinJobResponse>>> fs;
  for (const auto& [h, d] : who) {
    fs.push_back(std::async(std::launch::async, [addr, job, h = h, d = d] {
      return Client(addr)->Join(Identity(h, d), job, absl::Now() + absl::Seconds(20));
    }));
  }
  std::vector<v1::JoinJobResponse> out;
  for (auto& f : fs) {
    auto r = f.get();
    EXPECT_TRUE(r.ok()) << r.status();
    out.push_back(r.ok() ? *r : v1::JoinJobResponse());
  }
  return out;
}

v1::HeartbeatRequest Beat(const v1::JoinJobResponse& j, uint64_t iter = 0, bool completed = false) {
  v1::HeartbeatRequest r;
  r.set_job_id(j.job_id());
  r.set_worker_id(j.worker_id());
  r.set_generation(j.generation());
  r.set_rank(j.rank());
  r.mutable_progress()->set_iteration(iter);
  r.mutable_progress()->set_epoch(static_cast<uint32_t>(iter / 25));
  r.mutable_progress()->set_lr(0.1);
  r.mutable_progress()->set_loss(2.5);
  r.set_completed(completed);
  return r;
}

// Value of the sample `name{labels}` in Prometheus text format; NaN if absent.
double MetricValue(const std::string& text, const std::string& sample) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, sample + " ")) {
      double v;
      if (absl::SimpleAtod(line.substr(sample.size() + 1), &v)) return v;
    }
  }
  return std::nan("");
}

TEST(CoordinatorIntegrationTest, SubmitJoinBootstrapHeartbeatFinish) {
  CoordinatorProcess coord(MakeTempDir("lmsgd_it_full"));
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  const std::string job = Submit(addr, SmallSpec(3));
  ASSERT_FALSE(job.empty());
  EXPECT_EQ(GetJob(addr, job).state(), v1::JOB_STATE_PENDING);

  auto w = JoinWorkers(addr, job, {{"node-b", 0}, {"node-a", 1}, {"node-a", 0}});
  // Ranks contiguous per host: node-a gets 0,1 and node-b 2.
  EXPECT_EQ(w[2].rank(), 0);
  EXPECT_EQ(w[1].rank(), 1);
  EXPECT_EQ(w[0].rank(), 2);
  EXPECT_EQ(w[0].local_rank(), 0);
  EXPECT_EQ(w[1].local_rank(), 1);
  for (const auto& r : w) {
    EXPECT_EQ(r.world_size(), 3);
    EXPECT_EQ(r.generation(), 1u);
    EXPECT_EQ(r.schedule().global_batch(), 96u);
    EXPECT_EQ(r.schedule().iterations_per_epoch(), 6400u / 96);
  }
  // Bootstrap: every rank publishes an address, rank 0 a NCCL-style unique id; all read all.
  std::vector<std::future<absl::StatusOr<std::vector<std::string>>>> gets;
  for (const auto& r : w) {
    gets.push_back(std::async(std::launch::async, [addr, r] {
      auto c = Client(addr);
      auto st = c->PublishBootstrap(r.job_id(), r.generation(), r.rank(), "ucx_address",
                                    absl::StrCat("addr-of-rank-", r.rank()));
      if (!st.ok()) return absl::StatusOr<std::vector<std::string>>(st);
      return c->GetBootstrap(r.job_id(), r.generation(), "ucx_address", absl::Seconds(10));
    }));
  }
  for (auto& g : gets) {
    auto v = g.get();
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_EQ(v->size(), 3u);
    for (int r = 0; r < 3; ++r) EXPECT_EQ((*v)[r], absl::StrCat("addr-of-rank-", r));
  }
  auto c = Client(addr);
  ASSERT_TRUE(c->PublishBootstrap(job, 1, 0, "nccl_unique_id", std::string(128, 'x')).ok());
  // Heartbeats with progress, then rank 0 completes.
  for (uint64_t it = 1; it <= 3; ++it) {
    for (const auto& r : w) {
      auto resp = c->Heartbeat(Beat(r, it));
      ASSERT_TRUE(resp.ok()) << resp.status();
      EXPECT_EQ(resp->directive(), v1::DIRECTIVE_CONTINUE);
    }
  }
  auto status = GetJob(addr, job);
  EXPECT_EQ(status.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(status.progress().iteration(), 3u);
  const v1::JoinJobResponse& rank0 = w[2];
  v1::ReportEvaluationRequest ev;
  ev.set_job_id(job);
  ev.set_worker_id(rank0.worker_id());
  ev.set_generation(1);
  ev.mutable_evaluation()->set_epoch(2);
  ev.mutable_evaluation()->set_top1_error(0.25);
  ev.mutable_evaluation()->set_top5_error(0.05);
  ASSERT_TRUE(c->ReportEvaluation(ev).ok());
  auto done = c->Heartbeat(Beat(rank0, 133, true));
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->directive(), v1::DIRECTIVE_STOP);
  status = GetJob(addr, job);
  EXPECT_EQ(status.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_DOUBLE_EQ(status.last_evaluation().top1_error(), 0.25);
  EXPECT_EQ(c->Heartbeat(Beat(w[0], 133))->directive(), v1::DIRECTIVE_STOP);
  auto rc = coord.Terminate();
  ASSERT_TRUE(rc.ok());
  EXPECT_EQ(*rc, 0) << coord.Log();
}

// The gradient exchange bootstraps through the coordinator: each rank publishes its UCX address
// for (job, generation), fetches the others', connects, and an allreduce works.
TEST(CoordinatorIntegrationTest, UcxCommunicatorBootstrapsThroughTheCoordinator) {
  testing::CoordinatorProcess coord(testing::MakeTempDir("coord_ucx"));
  ASSERT_TRUE(coord.Start().ok());
  v1::JobSpec spec = SmallSpec(2);
  const std::string job = Submit(coord.grpc_address(), spec);
  auto joined = JoinWorkers(coord.grpc_address(), job, {{"h1", 0}, {"h1", 1}});
  ASSERT_EQ(joined.size(), 2u);
  std::vector<std::future<absl::Status>> fs;
  for (const auto& j : joined) {
    fs.push_back(std::async(std::launch::async, [&coord, j]() -> absl::Status {
      auto client = Client(coord.grpc_address());
      session::CoordinatorStore store(client.get(), j.job_id(), j.generation(), j.rank());
      auto t = comm::UcxTransport::Create(j.rank(), 2, &store, "gen", absl::Now() + absl::Seconds(20));
      if (!t.ok()) return t.status();
      auto c = comm::Communicator::Create(std::move(*t), {});
      if (!c.ok()) return c.status();
      std::vector<float> v(1000, static_cast<float>(j.rank() + 1));
      if (auto st = (*c)->AllreduceAsync(v.data(), v.size())->Wait(absl::Now() + absl::Seconds(20)); !st.ok()) {
        return st;
      }
      for (float x : v) {
        if (x != 3.0f) return absl::InternalError(absl::StrCat("sum ", x));
      }
      return absl::OkStatus();
    }));
  }
  for (auto& f : fs) EXPECT_TRUE(f.get().ok());
}

TEST(CoordinatorIntegrationTest, SilentWorkerDetectedWithinTimeout) {
  CoordinatorProcess coord(MakeTempDir("lmsgd_it_silent"),
                           {"--heartbeat_timeout=1s", "--heartbeat_interval=200ms"});
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  const std::string job = Submit(addr, SmallSpec(2));
  auto w = JoinWorkers(addr, job, {{"h", 0}, {"h", 1}});
  auto c = Client(addr);
  // Rank 0 keeps heartbeating; rank 1 goes silent.
  const absl::Time start = absl::Now();
  v1::Directive directive = v1::DIRECTIVE_CONTINUE;
  while (absl::Now() - start < absl::Seconds(5)) {
    auto r = c->Heartbeat(Beat(w[0]));
    ASSERT_TRUE(r.ok()) << r.status();
    directive = r->directive();
    if (directive != v1::DIRECTIVE_CONTINUE) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  const absl::Duration detected_after = absl::Now() - start;
  EXPECT_EQ(directive, v1::DIRECTIVE_ABORT_AND_REJOIN);
  // Timeout 1 s + one 200 ms tick + slack.
  EXPECT_LT(detected_after, absl::Seconds(2.5)) << absl::FormatDuration(detected_after);
  auto status = GetJob(addr, job);
  EXPECT_EQ(status.state(), v1::JOB_STATE_RECOVERING);
  EXPECT_TRUE(absl::StrContains(status.message(), "silent")) << status.message();
  EXPECT_TRUE(absl::StrContains(status.message(), w[1].worker_id())) << status.message();
  auto metrics = testing::HttpGet(coord.metrics_address(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_EQ(MetricValue(*metrics, absl::StrCat("lmsgd_coordinator_heartbeats_missed_total{job=\"", job, "\"}")), 1);
  EXPECT_EQ(MetricValue(*metrics, "lmsgd_coordinator_jobs{state=\"recovering\"}"), 1);
}

TEST(CoordinatorIntegrationTest, KillNineAndRestartKeepsEveryJob) {
  const std::string dir = MakeTempDir("lmsgd_it_restart");
  CoordinatorProcess coord(dir);
  ASSERT_TRUE(coord.Start().ok());
  std::string addr = coord.grpc_address();
  const std::string pending = Submit(addr, SmallSpec(4));
  const std::string running = Submit(addr, SmallSpec(2));
  const std::string cancelled = Submit(addr, SmallSpec(1));
  {
    v1::CancelJobRequest req;
    req.set_job_id(cancelled);
    v1::JobStatus resp;
    auto ctx = Ctx();
    ASSERT_TRUE(Stub(addr)->CancelJob(ctx.get(), req, &resp).ok());
  }
  auto w = JoinWorkers(addr, running, {{"h", 0}, {"h", 1}});
  auto c = Client(addr);
  v1::ReportCheckpointRequest ck;
  ck.set_job_id(running);
  ck.set_worker_id(w[0].worker_id());
  ck.mutable_checkpoint()->set_path("/ckpt/epoch-1");
  ck.mutable_checkpoint()->set_epoch(1);
  ck.mutable_checkpoint()->set_generation(1);
  ASSERT_TRUE(c->ReportCheckpoint(ck).ok());
  for (uint32_t e = 1; e <= 2; ++e) {  // the history: two epochs, the second evaluated
    v1::ReportEpochRequest ep;
    ep.set_job_id(running);
    ep.set_worker_id(w[0].worker_id());
    ep.set_generation(1);
    ep.mutable_record()->set_epoch(e);
    ep.mutable_record()->set_iteration(25 * e);
    ep.mutable_record()->set_mean_loss(2.0 / e);
    if (e == 2) {
      ep.mutable_record()->mutable_evaluation()->set_examples(500);
      ep.mutable_record()->mutable_evaluation()->set_top1_error(0.375);
    }
    ASSERT_TRUE(c->ReportEpoch(ep).ok());
  }

  coord.Kill9();
  ASSERT_TRUE(coord.Start().ok()) << coord.Log();
  addr = coord.grpc_address();
  EXPECT_EQ(GetJob(addr, pending).state(), v1::JOB_STATE_PENDING);
  EXPECT_EQ(GetJob(addr, cancelled).state(), v1::JOB_STATE_CANCELLED);
  auto status = GetJob(addr, running);
  EXPECT_EQ(status.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(status.generation(), 1u);
  EXPECT_EQ(status.last_checkpoint().path(), "/ckpt/epoch-1");
  ASSERT_EQ(status.history_size(), 2);
  EXPECT_DOUBLE_EQ(status.history(0).mean_loss(), 2.0);
  EXPECT_FALSE(status.history(0).has_evaluation());
  EXPECT_DOUBLE_EQ(status.history(1).evaluation().top1_error(), 0.375);
  EXPECT_DOUBLE_EQ(status.final_error().top1_error(), 0.375);
  EXPECT_EQ(status.final_error().epochs(), 1u);
  {  // lmsgdctl history prints it, as CSV that parses back
    auto r = RunCommand({LMSGD_CTL_BIN, "--coordinator=" + addr, "--output=csv", "history", running});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto back = ParseHistoryCsv(r.out, "lmsgdctl history");
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << r.out;
    ASSERT_EQ(back->size(), 2u);
    EXPECT_DOUBLE_EQ((*back)[1].evaluation().top1_error(), 0.375);
    auto table = RunCommand({LMSGD_CTL_BIN, "--coordinator=" + addr, "history", running});
    ASSERT_EQ(table.exit_code, 0) << table.err;
    EXPECT_TRUE(absl::StrContains(table.out, "37.50%")) << table.out;
    auto st = RunCommand({LMSGD_CTL_BIN, "--coordinator=" + addr, "status", running});
    EXPECT_TRUE(absl::StrContains(st.out, "37.50% top-1")) << st.out;
    EXPECT_TRUE(absl::StrContains(st.out, "median of the final 1 evaluated epoch")) << st.out;
  }
  // The workers reach the restarted coordinator and carry on in their generation.
  auto c2 = Client(addr);
  for (const auto& r : w) {
    auto resp = c2->Heartbeat(Beat(r, 5));
    ASSERT_TRUE(resp.ok()) << resp.status();
    EXPECT_EQ(resp->directive(), v1::DIRECTIVE_CONTINUE);
  }
  // New job ids do not reuse old ones.
  const std::string next = Submit(addr, SmallSpec(1));
  EXPECT_GT(next, cancelled);
}

// One coordinator per address and per state directory: a second one on the same address, or on
// the same state directory, exits at once saying why; a kill -9 leaves no lock behind.
TEST(CoordinatorIntegrationTest, SecondCoordinatorOnTheSameAddressOrStateDirIsRefused) {
  const std::string dir = MakeTempDir("lmsgd_it_one");
  CoordinatorProcess first(dir);
  ASSERT_TRUE(first.Start().ok()) << first.Log();
  const std::string addr = first.grpc_address();
  const std::string job = Submit(addr, SmallSpec(1));
  auto same_address = RunCommand({LMSGD_COORDINATOR_BIN, "--listen=" + addr, "--state_dir=" + dir + "/other"},
                                 absl::Seconds(20));
  EXPECT_NE(same_address.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(same_address.err + same_address.out, "cannot listen on " + addr))
      << same_address.err << same_address.out;
  auto same_dir = RunCommand({LMSGD_COORDINATOR_BIN, "--listen=127.0.0.1:0", "--state_dir=" + dir + "/state"},
                             absl::Seconds(20));
  EXPECT_NE(same_dir.exit_code, 0);
  const std::string said = same_dir.err + same_dir.out;
  EXPECT_TRUE(absl::StrContains(said, "state directory " + dir + "/state is in use")) << said;
  EXPECT_TRUE(absl::StrContains(said, "pid ")) << said;
  // Every submit still reaches the one coordinator: ids are not handed out twice.
  std::set<std::string> ids = {job};
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(ids.insert(Submit(addr, SmallSpec(1))).second);
  first.Kill9();
  ASSERT_TRUE(first.Start().ok()) << first.Log();
  EXPECT_EQ(GetJob(first.grpc_address(), job).job_id(), job);
}

TEST(CoordinatorIntegrationTest, BearerTokenRequiredForSubmitAndCancel) {
  const std::string dir = MakeTempDir("lmsgd_it_token");
  ASSERT_TRUE(WriteFileAtomically(dir + "/token", "s3cret-token\n").ok());
  CoordinatorProcess coord(dir, {absl::StrCat("--auth_token_file=", dir, "/token")});
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  v1::SubmitJobRequest req;
  *req.mutable_spec() = SmallSpec(1);
  v1::SubmitJobResponse resp;
  auto ctx = Ctx();
  grpc::Status st = Stub(addr)->SubmitJob(ctx.get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  ctx = Ctx("wrong");
  EXPECT_EQ(Stub(addr)->SubmitJob(ctx.get(), req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  ctx = Ctx("s3cret-token");
  ASSERT_TRUE(Stub(addr)->SubmitJob(ctx.get(), req, &resp).ok());
  // Reads need no token; lmsgdctl passes one from a file.
  EXPECT_EQ(GetJob(addr, resp.job_id()).state(), v1::JOB_STATE_PENDING);
  auto denied = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "cancel", resp.job_id()});
  EXPECT_EQ(denied.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(denied.err, "token")) << denied.err;
  auto ok = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "--token_file", dir + "/token", "cancel", resp.job_id()});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_TRUE(absl::StrContains(ok.out, "cancelled")) << ok.out;
}

// Certificates made with the openssl command line for this test: a CA, a server cert for
// 127.0.0.1 and a client cert, both signed by the CA.
bool MakeCerts(const std::string& d) {
  const std::string script = absl::StrCat(
      "set -e; cd ", d, ";",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=lmsgd-test-ca -keyout ca.key -out ca.pem 2>/dev/null;",
      "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext;",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null;",
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.pem 2>/dev/null;",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=lmsgd-worker -keyout client.key -out client.csr 2>/dev/null;",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out client.pem 2>/dev/null");
  return RunCommand({"/bin/sh", "-c", script}).exit_code == 0;
}

TEST(CoordinatorIntegrationTest, MutualTls) {
  const std::string d = MakeTempDir("lmsgd_it_tls");
  if (RunCommand({"/bin/sh", "-c", "command -v openssl"}).exit_code != 0) {
    GTEST_SKIP() << "openssl command not installed (deploy/setup.sh installs it)";
  }
  ASSERT_TRUE(MakeCerts(d));
  CoordinatorProcess coord(d, {absl::StrCat("--tls_cert=", d, "/server.pem"), absl::StrCat("--tls_key=", d, "/server.key"),
                               absl::StrCat("--tls_client_ca=", d, "/ca.pem")});
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  // Plaintext client: refused.
  auto plain = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "--timeout", "3", "list"});
  EXPECT_EQ(plain.exit_code, 1);
  // TLS without a client certificate: refused by mutual TLS.
  auto no_cert = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "--timeout", "3", "--tls_ca", d + "/ca.pem", "list"});
  EXPECT_EQ(no_cert.exit_code, 1) << no_cert.out;
  // With the client certificate: accepted.
  auto ok = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "--tls_ca", d + "/ca.pem", "--tls_cert",
                        d + "/client.pem", "--tls_key", d + "/client.key", "list"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_TRUE(absl::StrContains(ok.out, "(no jobs)")) << ok.out;
  // The worker client too.
  session::CoordinatorClientOptions o;
  o.address = addr;
  o.tls.ca = d + "/ca.pem";
  o.tls.cert = d + "/client.pem";
  o.tls.key = d + "/client.key";
  auto wc = session::CoordinatorClient::Create(o);
  ASSERT_TRUE(wc.ok());
  v1::HeartbeatRequest hb;
  hb.set_job_id("job-000404");
  auto r = (*wc)->Heartbeat(hb);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
}

TEST(CoordinatorIntegrationTest, MetricsScrapedAndParsed) {
  CoordinatorProcess coord(MakeTempDir("lmsgd_it_metrics"));
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  const std::string a = Submit(addr, SmallSpec(2));
  Submit(addr, SmallSpec(3));
  auto w = JoinWorkers(addr, a, {{"h", 0}, {"h", 1}});
  auto c = Client(addr);
  auto hb = Beat(w[0], 42);
  hb.mutable_progress()->set_lr(0.37);
  ASSERT_TRUE(c->Heartbeat(hb).ok());
  auto text = testing::HttpGet(coord.metrics_address(), "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  const std::string j = absl::StrCat("{job=\"", a, "\"}");
  EXPECT_EQ(MetricValue(*text, "lmsgd_coordinator_jobs{state=\"running\"}"), 1) << *text;
  EXPECT_EQ(MetricValue(*text, "lmsgd_coordinator_jobs{state=\"pending\"}"), 1);
  EXPECT_EQ(MetricValue(*text, "lmsgd_coordinator_workers_alive" + j), 2);
  EXPECT_EQ(MetricValue(*text, "lmsgd_coordinator_job_generation" + j), 1);
  EXPECT_EQ(MetricValue(*text, "lmsgd_coordinator_job_iteration" + j), 42);
  EXPECT_DOUBLE_EQ(MetricValue(*text, "lmsgd_coordinator_job_learning_rate" + j), 0.37);
  EXPECT_EQ(MetricValue(*text, "lmsgd_coordinator_rpcs_total{code=\"OK\",method=\"SubmitJob\"}"), 2);
  EXPECT_GE(MetricValue(*text, "lmsgd_coordinator_rpc_latency_seconds_count{method=\"JoinJob\"}"), 2);
}

TEST(CoordinatorIntegrationTest, HealthAndReflection) {
  CoordinatorProcess coord(MakeTempDir("lmsgd_it_health"));
  ASSERT_TRUE(coord.Start().ok());
  auto channel = grpc::CreateChannel(coord.grpc_address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  // grpc.health.v1.Health/Check with an empty request: SERVING is field 1 = 1 (bytes 08 01).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::ByteBuffer req_buf, resp_buf;
    grpc::Slice empty("", 0);
    req_buf = grpc::ByteBuffer(&empty, 1);
    std::promise<grpc::Status> done;
    generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req_buf, &resp_buf,
                      [&](grpc::Status s) { done.set_value(s); });
    grpc::Status st = done.get_future().get();
    ASSERT_TRUE(st.ok()) << st.error_message();
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(resp_buf.Dump(&slices).ok());
    std::string bytes;
    for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    EXPECT_EQ(bytes, std::string("\x08\x01", 2));
  }
  // Server reflection lists the Coordinator service (list_services is field 7).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::CompletionQueue cq;
    auto call = generic.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
    void* tag;
    bool ok;
    call->StartCall(reinterpret_cast<void*>(1));
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    grpc::Slice req_slice(std::string("\x3a\x00", 2));
    grpc::ByteBuffer req(&req_slice, 1);
    call->WriteLast(req, grpc::WriteOptions(), reinterpret_cast<void*>(2));
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    grpc::ByteBuffer resp;
    call->Read(&resp, reinterpret_cast<void*>(3));
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(resp.Dump(&slices).ok());
    std::string bytes;
    for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    EXPECT_TRUE(absl::StrContains(bytes, "lmsgd.v1.Coordinator")) << bytes;
    grpc::Status fin;
    call->Finish(&fin, reinterpret_cast<void*>(4));
    cq.Next(&tag, &ok);
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  }
}

TEST(CoordinatorIntegrationTest, LmsgdctlEndToEnd) {
  CoordinatorProcess coord(MakeTempDir("lmsgd_it_ctl"));
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  const std::string job_file = std::string(LMSGD_SOURCE_DIR) + "/deploy/jobs/fashion_mnist_resnet20.textproto";
  auto sub = RunCommand({LMSGD_CTL_BIN, "submit", job_file}, absl::Seconds(30), {{"LMSGD_COORDINATOR", addr}});
  ASSERT_EQ(sub.exit_code, 0) << sub.err;
  std::string id(absl::StripAsciiWhitespace(sub.out));
  EXPECT_TRUE(absl::StartsWith(id, "job-")) << id;

  auto status = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "status", id, "--output", "json"});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  v1::JobStatus parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(status.out, &parsed).ok()) << status.out;
  EXPECT_EQ(parsed.job_id(), id);
  EXPECT_EQ(parsed.state(), v1::JOB_STATE_PENDING);
  EXPECT_EQ(parsed.spec().name(), "fashion-mnist-resnet20");
  EXPECT_NEAR(parsed.schedule().peak_lr(), 0.2, 1e-12);

  auto list = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "--output=json", "list"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(list.out, &jobs).ok()) << list.out;
  ASSERT_EQ(jobs.jobs_size(), 1);
  auto table = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "list"});
  EXPECT_TRUE(absl::StrContains(table.out, id)) << table.out;
  EXPECT_TRUE(absl::StrContains(table.out, "pending")) << table.out;

  // watch follows the job until it ends (here: cancelled from another client), exit code 3.
  testing::Subprocess watch;
  const std::string watch_log = coord.log_path() + ".watch";
  ASSERT_TRUE(watch.Start({LMSGD_CTL_BIN, "--coordinator", addr, "watch", id}, watch_log).ok());
  absl::SleepFor(absl::Milliseconds(500));
  auto cancel = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "cancel", id, "--reason", "test over"});
  EXPECT_EQ(cancel.exit_code, 0) << cancel.err;
  auto rc = watch.Wait(absl::Seconds(10));
  ASSERT_TRUE(rc.ok()) << rc.status();
  EXPECT_EQ(*rc, 3);
  std::string watched = ReadFileToString(watch_log).value_or("");
  EXPECT_TRUE(absl::StrContains(watched, "pending")) << watched;
  EXPECT_TRUE(absl::StrContains(watched, "cancelled: test over")) << watched;

  // Errors: unknown job, unreachable coordinator.
  auto unknown = RunCommand({LMSGD_CTL_BIN, "--coordinator", addr, "status", "job-999999"});
  EXPECT_EQ(unknown.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(unknown.err, "no job 'job-999999'")) << unknown.err;
  auto down = RunCommand({LMSGD_CTL_BIN, "--coordinator", "127.0.0.1:1", "--timeout", "2", "list"});
  EXPECT_EQ(down.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(down.err, "cannot reach coordinator at 127.0.0.1:1")) << down.err;
}

TEST(CoordinatorIntegrationTest, OversizedAndGarbageRequestsDoNotCrash) {
  CoordinatorProcess coord(MakeTempDir("lmsgd_it_fuzzish"), {"--max_message_bytes=65536"});
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  v1::SubmitJobRequest big;
  *big.mutable_spec() = SmallSpec(1);
  big.mutable_spec()->set_name(std::string(100000, 'n'));
  v1::SubmitJobResponse resp;
  auto ctx = Ctx();
  EXPECT_EQ(Stub(addr)->SubmitJob(ctx.get(), big, &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // Raw garbage bytes as a SubmitJob request.
  grpc::GenericStub generic(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext gctx;
  gctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice junk(std::string("\xff\xff\xff\xff\x0f\x12\x99garbage", 14));
  grpc::ByteBuffer req(&junk, 1), out;
  std::promise<grpc::Status> done;
  generic.UnaryCall(&gctx, "/lmsgd.v1.Coordinator/SubmitJob", grpc::StubOptions(), &req, &out,
                    [&](grpc::Status s) { done.set_value(s); });
  EXPECT_FALSE(done.get_future().get().ok());
  // Invalid spec: INVALID_ARGUMENT naming the fields.
  v1::SubmitJobRequest bad;
  bad.mutable_spec()->set_world_size(0);
  bad.mutable_spec()->set_per_worker_batch(3);
  bad.mutable_spec()->set_bn_group_size(2);
  ctx = Ctx();
  grpc::Status st = Stub(addr)->SubmitJob(ctx.get(), bad, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "dataset.kind")) << st.error_message();
  EXPECT_TRUE(absl::StrContains(st.error_message(), "bn_group_size")) << st.error_message();
  // Still alive and serving.
  EXPECT_FALSE(Submit(addr, SmallSpec(1)).empty());
}

}  // namespace
}  // namespace lmsgd
