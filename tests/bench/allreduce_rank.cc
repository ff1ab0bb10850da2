// One rank of `lmsgd-bench allreduce` for lmsgd's algorithms and (when built with it) Gloo's:
// rendezvous through a FileStore directory, then for every size: 2 warm-up runs, barrier,
// Iterations(bytes) timed runs, barrier; rank 0 prints one JSON line per (algorithm, size).
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/bench/allreduce_bench.h"
#include "worker/comm/algorithms.h"
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

int RunLmsgdRank(int rank, int k, const std::string& store_dir, size_t min_bytes, size_t max_bytes) {
  comm::FileStore store(store_dir);
  auto t = comm::UcxTransport::Create(rank, k, &store, "bench", absl::Now() + absl::Seconds(60), /*single_host=*/true);
  if (!t.ok()) {
    std::cerr << "rank " << rank << ": " << t.status() << "\n";
    return 1;
  }
  comm::RingAllreduce ring(t->get());
  comm::HalvingDoublingAllreduce hd(t->get());
  uint64_t seq = 1;
  const absl::Time deadline = absl::Now() + absl::Hours(1);
  auto shm = comm::SharedMemoryAllreduce::Create(t->get(), seq++, deadline);
  if (!shm.ok()) std::cerr << "rank " << rank << ": no shared-memory allreduce: " << shm.status() << "\n";
  std::vector<std::pair<const char*, comm::AllreduceAlgorithm*>> algos = {{"ring", &ring}, {"halving_doubling", &hd}};
  if (shm.ok()) algos.push_back({"shared_memory", shm->get()});
  for (auto [name, algo] : algos) {
    for (size_t bytes : Sizes(min_bytes, max_bytes)) {
      std::vector<float> buf(bytes / 4, 1.0f);
      const int iters = Iterations(bytes);
      for (int w = 0; w < 2; ++w) {
        if (auto st = algo->Run(buf.data(), buf.size(), seq++, deadline); !st.ok()) {
          std::cerr << st << "\n";
          return 1;
        }
      }
      if (auto st = comm::Barrier(t->get(), seq++, deadline); !st.ok()) return 1;
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) {
        if (auto st = algo->Run(buf.data(), buf.size(), seq++, deadline); !st.ok()) {
          std::cerr << st << "\n";
          return 1;
        }
      }
      if (auto st = comm::Barrier(t->get(), seq++, deadline); !st.ok()) return 1;
      const double s = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
      if (rank == 0) std::cout << ResultLine("lmsgd", name, k, bytes, s) << std::endl;
    }
  }
  return 0;
}

#ifdef LMSGD_HAVE_GLOO
int RunGlooRank(int rank, int k, const std::string& store_dir, size_t min_bytes, size_t max_bytes) {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto dev = gloo::transport::tcp::CreateDevice(attr);
  gloo::rendezvous::FileStore file_store(store_dir);
  gloo::rendezvous::PrefixStore prefix("gloo", file_store);
  auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, k);
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
#endif

bool HaveGloo() {
#ifdef LMSGD_HAVE_GLOO
  return true;
#else
  return false;
#endif
}

int RunAllreduceRank(const std::string& impl, int rank, int k, const std::string& store_dir, size_t min_bytes,
                     size_t max_bytes) {
  if (impl == "lmsgd") return RunLmsgdRank(rank, k, store_dir, min_bytes, max_bytes);
#ifdef LMSGD_HAVE_GLOO
  if (impl == "gloo") return RunGlooRank(rank, k, store_dir, min_bytes, max_bytes);
#endif
  std::cerr << "unknown or unavailable --impl=" << impl << "\n";
  return 2;
}

}  // namespace lmsgd::bench
