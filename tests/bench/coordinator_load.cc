// `lmsgd-bench coordinator-load`: one real coordinator process, N simulated workers (lightweight
// gRPC clients, not trainers) that join one job and heartbeat at 1 Hz each for a bounded time.
// Reports client-side RPC latency (p50/p99/max) and the coordinator's CPU and memory from /proc.
#include <signal.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/grpcpp.h"
#include "lmsgd/v1/coordinator.grpc.pb.h"

extern char** environ;

namespace lmsgd::bench {
namespace {

using Clock = std::chrono::steady_clock;

double CpuSeconds(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  std::getline(f, line);
  std::istringstream in(line.substr(line.rfind(')') + 2));
  std::string field;
  double utime = 0, stime = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) (void)absl::SimpleAtod(field, &utime);
    if (i == 15) (void)absl::SimpleAtod(field, &stime);
  }
  return (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double RssMb(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      double kb = 0;
      std::istringstream in(line.substr(6));
      in >> kb;
      return kb / 1024;
    }
  }
  return 0;
}

}  // namespace

int RunCoordinatorLoad(const std::string& coordinator_bin, int workers, int seconds, int threads) {
  namespace fs = std::filesystem;
  char tmpl[] = "/tmp/lmsgd_load_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string ready = dir + "/ready";
  std::vector<std::string> args = {coordinator_bin, "--listen=127.0.0.1:0", "--metrics_listen=",
                                   "--state_dir=" + dir + "/state", "--ready_file=" + ready,
                                   "--heartbeat_interval=1s", "--heartbeat_timeout=30s"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, (dir + "/coordinator.log").c_str(), O_WRONLY | O_CREAT, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = -1;
  if (posix_spawn(&pid, coordinator_bin.c_str(), &fa, nullptr, argv.data(), environ) != 0) {
    std::cerr << "cannot start " << coordinator_bin << "\n";
    return 1;
  }
  struct Stop {
    pid_t pid;
    ~Stop() {
      kill(pid, SIGTERM);
      waitpid(pid, nullptr, 0);
    }
  } stop{pid};
  std::string addr;
  for (int i = 0; i < 200 && addr.empty(); ++i) {
    std::ifstream f(ready);
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("grpc=", 0) == 0) addr = line.substr(5);
    }
    if (addr.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (addr.empty()) {
    std::cerr << "coordinator did not start (log: " << dir << "/coordinator.log)\n";
    return 1;
  }
  // A few channels shared by the simulated workers (as many clients on one host would).
  std::vector<std::unique_ptr<v1::Coordinator::Stub>> stubs;
  for (int i = 0; i < 8; ++i) {
    grpc::ChannelArguments ca;
    ca.SetInt("lmsgd_channel", i);  // distinct channels, not one shared subchannel
    stubs.push_back(v1::Coordinator::NewStub(grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), ca)));
  }
  v1::SubmitJobRequest sreq;
  sreq.mutable_spec()->set_name("load");
  sreq.mutable_spec()->mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
  sreq.mutable_spec()->set_world_size(static_cast<uint32_t>(workers));
  sreq.mutable_spec()->set_epochs(1);
  sreq.mutable_spec()->set_warmup_epochs(0.5);
  v1::SubmitJobResponse sresp;
  {
    grpc::ClientContext ctx;
    auto st = stubs[0]->SubmitJob(&ctx, sreq, &sresp);
    if (!st.ok()) {
      std::cerr << "submit: " << st.error_message() << "\n";
      return 1;
    }
  }
  struct Worker {
    std::string id;
    uint64_t generation = 0;
    int rank = -1;
  };
  std::vector<Worker> ws(workers);
  std::atomic<int> assigned{0};
  // Phase 1: every worker joins (short server-side waits, so one thread serves many workers).
  const auto join_start = Clock::now();
  {
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        auto* stub = stubs[t % stubs.size()].get();
        std::vector<int> mine;
        for (int w = t; w < workers; w += threads) mine.push_back(w);
        const auto give_up = Clock::now() + std::chrono::seconds(120);
        while (!mine.empty() && Clock::now() < give_up) {
          std::vector<int> left;
          for (int w : mine) {
            v1::JoinJobRequest r;
            r.mutable_identity()->set_host(absl::StrCat("host", w / 8));
            r.mutable_identity()->set_local_device(static_cast<uint32_t>(w % 8));
            r.mutable_identity()->set_incarnation(absl::StrCat("load-", w));
            r.mutable_identity()->set_build_version(LMSGD_VERSION);
            r.set_job_id(sresp.job_id());
            r.set_max_wait_s(0.05);
            v1::JoinJobResponse resp;
            grpc::ClientContext ctx;
            ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
            if (stub->JoinJob(&ctx, r, &resp).ok() && resp.assigned()) {
              ws[w] = {resp.worker_id(), resp.generation(), resp.rank()};
              assigned++;
            } else {
              left.push_back(w);
            }
          }
          mine.swap(left);
        }
      });
    }
    for (auto& t : ts) t.join();
  }
  const double join_s = std::chrono::duration<double>(Clock::now() - join_start).count();
  if (assigned.load() != workers) {
    std::cerr << "only " << assigned.load() << " of " << workers << " workers got a rank\n";
    return 1;
  }
  // Phase 2: heartbeats at 1 Hz per worker, spread evenly over the second.
  std::mutex mu;
  std::vector<double> latencies;
  std::atomic<int> errors{0};
  const double cpu0 = CpuSeconds(pid);
  const auto hb_start = Clock::now();
  const auto hb_end = hb_start + std::chrono::seconds(seconds);
  {
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        auto* stub = stubs[t % stubs.size()].get();
        std::vector<double> mine_lat;
        std::vector<int> mine;
        for (int w = t; w < workers; w += threads) mine.push_back(w);
        for (int round = 0;; ++round) {
          for (size_t i = 0; i < mine.size(); ++i) {
            const auto due = hb_start + std::chrono::microseconds(static_cast<int64_t>(
                                            1e6 * (round + (static_cast<double>(mine[i]) / workers))));
            if (due >= hb_end) goto done;
            std::this_thread::sleep_until(due);
            const Worker& w = ws[mine[i]];
            v1::HeartbeatRequest r;
            r.set_job_id(sresp.job_id());
            r.set_worker_id(w.id);
            r.set_generation(w.generation);
            r.set_rank(w.rank);
            r.mutable_progress()->set_iteration(static_cast<uint64_t>(round));
            v1::HeartbeatResponse resp;
            grpc::ClientContext ctx;
            ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
            const auto t0 = Clock::now();
            const bool ok = stub->Heartbeat(&ctx, r, &resp).ok() && resp.directive() == v1::DIRECTIVE_CONTINUE;
            mine_lat.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
            if (!ok) errors++;
          }
        }
      done:
        std::lock_guard<std::mutex> lock(mu);
        latencies.insert(latencies.end(), mine_lat.begin(), mine_lat.end());
      });
    }
    for (auto& t : ts) t.join();
  }
  const double wall = std::chrono::duration<double>(Clock::now() - hb_start).count();
  const double cpu = CpuSeconds(pid) - cpu0;
  const double rss = RssMb(pid);
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double p) { return latencies.empty() ? 0 : latencies[static_cast<size_t>(p * (latencies.size() - 1))]; };
  std::cout << absl::StrFormat(
      "coordinator load: %d simulated workers joined in %.1f s; %zu heartbeats in %.1f s (%.0f/s), %d not CONTINUE\n",
      workers, join_s, latencies.size(), wall, latencies.size() / wall, errors.load());
  std::cout << absl::StrFormat(
      "load_workers=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f coordinator_cpu_pct=%.1f coordinator_rss_mb=%.1f\n",
      workers, pct(0.5), pct(0.99), latencies.empty() ? 0 : latencies.back(), 100 * cpu / wall, rss);
  return errors.load() == 0 ? 0 : 1;
}

}  // namespace lmsgd::bench
