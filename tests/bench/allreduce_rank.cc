// One rank of `lmsgd-bench allreduce` for lmsgd's algorithms and (when built with it) Gloo's:
// rendezvous through a FileStore directory, then for every size: 2 warm-up runs, then
// Iterations(bytes) timed runs between barriers (lmsgd's algorithms in interleaved blocks, in a
// new order every block);
// rank 0 prints one JSON line per (algorithm, size).
#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "tests/bench/allreduce_bench.h"
#include "worker/comm/algorithms/allreduce.h"
#include "worker/comm/algorithms/broadcast_barrier.h"
#include "worker/comm/algorithms/halving_doubling.h"
#include "worker/comm/algorithms/hierarchical.h"
#include "worker/comm/algorithms/ring.h"
#include "worker/comm/algorithms/shared_memory.h"
#include "worker/comm/bf16_wire.h"
#include "worker/comm/communicator.h"
#include "worker/comm/store.h"
#include "worker/comm/ucx_transport.h"

#ifdef LMSGD_HAVE_GLOO
#include <gloo/allreduce_halving_doubling.h>
#include <gloo/allreduce_ring.h>
#include <gloo/barrier_all_to_one.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#endif

namespace lmsgd::bench {

using Clock = std::chrono::steady_clock;

// Times `n` contenders at one size: 2 untimed runs of each, then `units` timed runs of each
// (`run(a)` once per run). They take turns in up to 10 blocks of runs, so a slow spell of this
// machine lands on all of them alike, not on whichever was running. Each block has a new order,
// the same on every rank (`rng` has the same seed everywhere), so none always follows the same
// one: what one leaves in UCX's receive buffers and the caches can change the next one's time.
// Each contender's share of a block sits between two `barrier(a)` calls. Contenders for which
// `included(a)` is false are skipped. Returns seconds per run, per contender.
absl::StatusOr<std::vector<double>> TimeInTurns(size_t n, int units, std::mt19937* rng,
                                                 const std::function<bool(size_t)>& included,
                                                 const std::function<absl::Status(size_t)>& run,
                                                 const std::function<absl::Status(size_t)>& barrier) {
  constexpr int kBlocks = 10;
  const int blocks = std::min(kBlocks, units), per_block = (units + blocks - 1) / blocks;
  for (size_t a = 0; a < n; ++a) {
    for (int w = 0; w < 2 && included(a); ++w) RETURN_IF_ERROR(run(a));
  }
  std::vector<size_t> order(n);
  for (size_t a = 0; a < n; ++a) order[a] = a;
  std::vector<double> seconds(n, 0.0);
  for (int b = 0; b < blocks; ++b) {
    std::shuffle(order.begin(), order.end(), *rng);
    for (size_t a : order) {
      if (!included(a)) continue;
      RETURN_IF_ERROR(barrier(a));
      const auto t0 = Clock::now();
      for (int i = 0; i < per_block; ++i) RETURN_IF_ERROR(run(a));
      RETURN_IF_ERROR(barrier(a));
      seconds[a] += std::chrono::duration<double>(Clock::now() - t0).count();
    }
  }
  for (double& x : seconds) x /= blocks * per_block;
  return seconds;
}

// An algorithm on the bf16 wire as the Communicator runs it (JobSpec gradient_exchange_dtype
// BF16) where its Run needs the wire named: the shared-memory one in its bf16 mode.
class Bf16Allreduce final : public comm::AllreduceAlgorithm {
 public:
  explicit Bf16Allreduce(std::function<absl::Status(float*, size_t, uint64_t, absl::Time)> run)
      : run_(std::move(run)) {}
  absl::Status Run(float* data, size_t count, uint64_t seq, absl::Time deadline) override {
    return run_(data, count, seq, deadline);
  }

 private:
  std::function<absl::Status(float*, size_t, uint64_t, absl::Time)> run_;
};

// `wire`: "shm" (UCX's choice on one host: shared memory) or "tcp" (UCX_TLS=tcp: the wire between
// hosts, where ring and halving/doubling are what AUTO picks from: on loopback, or with
// `opt.separate_hosts` over the link between network namespaces that lmsgd-bench --link set up,
// with UCX configured as for ranks on different hosts). Rows are reported as impl "lmsgd" and
// "lmsgd-tcp"; the shared-memory algorithm, which does not use the wire, runs only in the first.
int RunLmsgdRank(int rank, int k, const std::string& store_dir, size_t min_bytes, size_t max_bytes,
                 const std::string& wire, const RankOptions& opt) {
  // Checked before the rendezvous, so that every rank refuses a misspelt row at once.
  static const char* const kRows[] = {"ring", "halving_doubling", "hd_halving_only", "ring_bf16",
                                      "halving_doubling_bf16", "shared_memory", "shared_memory_bf16"};
  for (const std::string& name : opt.algos) {
    if (std::find(std::begin(kRows), std::end(kRows), name) == std::end(kRows)) {
      std::cerr << "lmsgd-bench: --algos: no row '" << name << "' (rows: " << absl::StrJoin(kRows, ", ") << ")\n";
      return 2;
    }
  }
  if (wire == "tcp") setenv("UCX_TLS", "tcp", 1);
  comm::SetUcxEnvironmentDefaults();
  const std::string impl = wire == "tcp" ? "lmsgd-tcp" : "lmsgd";
  comm::FileStore store(store_dir);
  auto t = comm::UcxTransport::Create(rank, k, &store, "bench", absl::Now() + absl::Seconds(60),
                                      /*single_host=*/!opt.separate_hosts);
  if (!t.ok()) {
    std::cerr << "rank " << rank << ": " << t.status() << "\n";
    return 1;
  }
  comm::RingAllreduce ring(t->get());
  comm::HalvingDoublingAllreduce hd(t->get());
  // Halving/doubling without the recursive-doubling switch for short messages, up to 256 KiB:
  // shows where the switch pays (HalvingDoublingAllreduce::kDefaultDoublingMaxBytes).
  comm::HalvingDoublingAllreduce halving_only(t->get(), /*doubling_max_bytes=*/0);
  uint64_t seq = 1;
  // Every collective has its own deadline: a peer that fails ends the run within a minute.
  auto deadline = [] { return absl::Now() + absl::Seconds(60); };
  comm::Bf16WireTransport bf16_wire(t->get());
  comm::RingAllreduce bf16_ring_inner(&bf16_wire);
  comm::HalvingDoublingAllreduce bf16_hd_inner(&bf16_wire, comm::HalvingDoublingAllreduce::kDefaultDoublingMaxBytes,
                                               comm::WireDtype::kBf16);
  std::vector<std::pair<const char*, comm::AllreduceAlgorithm*>> algos = {
      {"ring", &ring}, {"halving_doubling", &hd}, {"hd_halving_only", &halving_only},
      {"ring_bf16", &bf16_ring_inner}, {"halving_doubling_bf16", &bf16_hd_inner}};
  absl::StatusOr<std::unique_ptr<comm::SharedMemoryAllreduce>> shm = absl::UnimplementedError("not on this wire");
  if (wire != "tcp") {
    shm = comm::SharedMemoryAllreduce::Create(t->get(), seq++, deadline());
    if (!shm.ok()) std::cerr << "rank " << rank << ": no shared-memory allreduce: " << shm.status() << "\n";
  }
  Bf16Allreduce bf16_shm([&](float* d, size_t n, uint64_t q, absl::Time dl) {
    return (*shm)->Run(d, n, q, dl, comm::WireDtype::kBf16);
  });
  if (shm.ok()) {
    algos.push_back({"shared_memory", shm->get()});
    algos.push_back({"shared_memory_bf16", &bf16_shm});
  }
  if (!opt.algos.empty()) {
    std::erase_if(algos, [&](const auto& a) { return !opt.algos.count(a.first); });
  }
  // Per size, the algorithms take turns (TimeInTurns); halving/doubling without its
  // recursive-doubling switch only up to 256 KiB.
  std::mt19937 rng(12345);
  std::vector<std::vector<std::string>> lines(algos.size());
  for (size_t bytes : Sizes(min_bytes, max_bytes)) {
    std::vector<float> buf(bytes / 4, 1.0f);
    auto included = [&](size_t a) { return !(algos[a].second == &halving_only && bytes > (256u << 10)); };
    auto seconds = TimeInTurns(
        algos.size(), Iterations(bytes), &rng, included,
        [&](size_t a) { return algos[a].second->Run(buf.data(), buf.size(), seq++, deadline()); },
        [&](size_t) { return comm::Barrier(t->get(), seq++, deadline()); });
    if (!seconds.ok()) {
      std::cerr << "rank " << rank << ": " << seconds.status() << "\n";
      return 1;
    }
    for (size_t a = 0; a < algos.size(); ++a) {
      if (included(a)) lines[a].push_back(ResultLine(impl, algos[a].first, k, bytes, (*seconds)[a]));
    }
  }
  if (rank == 0) {
    for (const auto& per_algo : lines) {
      for (const auto& l : per_algo) std::cout << l << std::endl;
    }
  }
  return 0;
}

// The paper's c concurrent allreduces: the Communicator (AUTO) with c = 1, 2 and 4 lanes, each
// timed on blocks of kInFlight allreduces issued at once on separate buffers (a backward pass's
// buckets) and then waited for; reported as time per allreduce, impl "lmsgd-lanes" (shared
// memory: AUTO takes the shared-memory algorithm) or "lmsgd-tcp-lanes", algo "auto_c<c>". The
// communicators take turns per size in blocks, in a new random order each block.
int RunLanesRank(int rank, int k, const std::string& store_dir, size_t min_bytes, size_t max_bytes,
                 const std::string& wire) {
  if (wire == "tcp") setenv("UCX_TLS", "tcp", 1);
  comm::SetUcxEnvironmentDefaults();
  const std::string impl = wire == "tcp" ? "lmsgd-tcp-lanes" : "lmsgd-lanes";
  constexpr int kInFlight = 4;
  const std::vector<int> lane_counts = {1, 2, 4};
  comm::FileStore store(store_dir);
  auto deadline = [] { return absl::Now() + absl::Seconds(60); };
  std::vector<std::unique_ptr<comm::Communicator>> comms;
  for (int c : lane_counts) {
    std::vector<std::unique_ptr<comm::Transport>> lanes;
    for (int l = 0; l < c; ++l) {
      auto t = comm::UcxTransport::Create(rank, k, &store, absl::StrCat("lanes", c), deadline(), /*single_host=*/true,
                                          "", l);
      if (!t.ok()) {
        std::cerr << "rank " << rank << ": " << t.status() << "\n";
        return 1;
      }
      lanes.push_back(std::move(*t));
    }
    auto cm = comm::Communicator::Create(std::move(lanes), comm::CommunicatorOptions{});
    if (!cm.ok()) {
      std::cerr << "rank " << rank << ": " << cm.status() << "\n";
      return 1;
    }
    comms.push_back(std::move(*cm));
  }
  // kInFlight allreduces at once, then all waited for.
  auto batch = [&](comm::Communicator* cm, std::vector<std::vector<float>>& bufs) -> absl::Status {
    std::vector<std::shared_ptr<comm::Work>> works;
    for (auto& b : bufs) works.push_back(cm->AllreduceAsync(b.data(), b.size()));
    absl::Status result;
    for (auto& w : works) {
      if (auto st = w->Wait(deadline()); result.ok() && !st.ok()) result = st;
    }
    return result;
  };
  std::mt19937 rng(12345);
  std::vector<std::vector<std::string>> lines(comms.size());
  for (size_t bytes : Sizes(min_bytes, max_bytes)) {
    std::vector<std::vector<float>> bufs(kInFlight, std::vector<float>(bytes / 4, 1.0f));
    auto seconds = TimeInTurns(
        comms.size(), std::max(1, Iterations(bytes) / kInFlight), &rng, [](size_t) { return true; },
        [&](size_t a) { return batch(comms[a].get(), bufs); },
        [&](size_t a) { return comms[a]->BarrierAsync()->Wait(deadline()); });
    if (!seconds.ok()) {
      std::cerr << "rank " << rank << ": " << seconds.status() << "\n";
      return 1;
    }
    for (size_t a = 0; a < comms.size(); ++a) {
      lines[a].push_back(
          ResultLine(impl, absl::StrCat("auto_c", lane_counts[a]), k, bytes, (*seconds)[a] / kInFlight));
    }
  }
  if (rank == 0) {
    for (const auto& per : lines) {
      for (const auto& l : per) std::cout << l << std::endl;
    }
  }
  return 0;
}

#ifdef LMSGD_HAVE_GLOO
int RunGlooRankOrThrow(int rank, int k, const std::string& store_dir, size_t min_bytes, size_t max_bytes) {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto dev = gloo::transport::tcp::CreateDevice(attr);
  gloo::rendezvous::FileStore file_store(store_dir);
  gloo::rendezvous::PrefixStore prefix("gloo", file_store);
  // Gloo's own deadline on every operation (its default is 30 s): a stalled peer ends the run
  // with an error instead of holding the benchmark.
  auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, k);
  ctx->setTimeout(std::chrono::seconds(20));
  ctx->connectFullMesh(prefix, dev);
  for (const std::string name : {"ring", "halving_doubling"}) {
    for (size_t bytes : Sizes(min_bytes, max_bytes)) {
      std::vector<float> buf(bytes / 4, 1.0f);
      std::unique_ptr<gloo::Algorithm> algo;
      if (name == "ring") {
        algo = std::make_unique<gloo::AllreduceRing<float>>(ctx, std::vector<float*>{buf.data()},
                                                            static_cast<int>(buf.size()));
      } else {
        algo = std::make_unique<gloo::AllreduceHalvingDoubling<float>>(ctx, std::vector<float*>{buf.data()},
                                                                       static_cast<int>(buf.size()));
      }
      gloo::BarrierAllToOne barrier(ctx);
      const int iters = Iterations(bytes);
      for (int w = 0; w < 2; ++w) algo->run();
      barrier.run();
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) algo->run();
      barrier.run();
      const double s = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
      if (rank == 0) std::cout << ResultLine("gloo", name, k, bytes, s) << std::endl;
    }
  }
  return 0;
}

// Gloo reports failures (a timeout, a peer gone) by exceptions: they stop here, as an error
// naming Gloo and the rank, not as std::terminate.
int RunGlooRank(int rank, int k, const std::string& store_dir, size_t min_bytes, size_t max_bytes) {
  try {
    return RunGlooRankOrThrow(rank, k, store_dir, min_bytes, max_bytes);
  } catch (const std::exception& e) {
    std::cerr << "lmsgd-bench: gloo rank " << rank << " of " << k << " failed: " << e.what() << "\n";
    return 1;
  }
}
#endif

bool HaveGloo() {
#ifdef LMSGD_HAVE_GLOO
  return true;
#else
  return false;
#endif
}

int RunAllreduceRank(const std::string& impl, int rank, int k, const std::string& store_dir, size_t min_bytes,
                     size_t max_bytes, const RankOptions& opt) {
  if (impl == "lmsgd") return RunLmsgdRank(rank, k, store_dir, min_bytes, max_bytes, "shm", opt);
  if (impl == "lmsgd-tcp") return RunLmsgdRank(rank, k, store_dir, min_bytes, max_bytes, "tcp", opt);
  if (impl == "lmsgd-lanes") return RunLanesRank(rank, k, store_dir, min_bytes, max_bytes, "shm");
  if (impl == "lmsgd-tcp-lanes") return RunLanesRank(rank, k, store_dir, min_bytes, max_bytes, "tcp");
#ifdef LMSGD_HAVE_GLOO
  if (impl == "gloo") return RunGlooRank(rank, k, store_dir, min_bytes, max_bytes);
#endif
  std::cerr << "unknown or unavailable --impl=" << impl << "\n";
  return 2;
}

}  // namespace lmsgd::bench
