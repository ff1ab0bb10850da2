// comm_rank: one rank of a multi-process communicator test (real processes, real UCX).
//
//   comm_rank --rank=R --size=K --store=DIR --mode=MODE [--algo=ring|hd|hier] [--hosts=a,a,b]
//             [--counts=1,7,1023] [--timeout_s=10] [--victim=V] [--prefix=gen1]
//             [--doubling_max_bytes=N] (halving/doubling: recursive doubling up to N bytes)
//             [--hd_max_bytes=N] (auto and the hierarchical leaders: halving/doubling up to N bytes)
//             [--lanes=C] (the communicator's lanes: up to C collectives at once)
//             [--in_flight] (allreduce: issue every count's allreduce before waiting for any)
//             [--ucx_tls=tcp] (UCX_TLS for the transport: e.g. the TCP wire ranks on different hosts use)
//             [--ucx_rndv_thresh=N] (UCX_RNDV_THRESH: messages above N bytes go by rendezvous)
//
// Modes: allreduce (integer-valued data, checked exact; prints a CRC of each result so the test
// can compare ranks), bf16 (the same over the bf16 wire: non-integer data checked against the
// float64 sum within bf16's bound, a CRC per result), broadcast, barrier, bucketed (a ResNet-8 training step with gradient
// buckets allreduced during backward vs. one allreduce after it), die (rank V exits abruptly
// at the second collective; the others must fail naming it), stall (rank V stops responding),
// regen (a K-rank generation is aborted, then ranks 0..K-2 form a new one and allreduce).
// Exit 0: all checks passed; 3: the collective failed as expected (message printed); 1: wrong.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/comm/bucketer.h"
#include "worker/comm/communicator.h"
#include "worker/comm/ucx_transport.h"
#include "worker/train/cpu_trainer.h"

namespace lmsgd::comm {
namespace {

std::map<std::string, std::string> ParseArgs(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) != 0) continue;
    auto eq = s.find('=');
    a[s.substr(2, eq - 2)] = eq == std::string::npos ? "1" : s.substr(eq + 1);
  }
  return a;
}

int Fail(const std::string& msg) {
  std::cout << "FAIL: " << msg << std::endl;
  return 1;
}

absl::StatusOr<std::unique_ptr<Communicator>> Connect(int rank, int size, Store* store, const std::string& prefix,
                                                      Algorithm algo, const std::vector<std::string>& hosts,
                                                      double timeout_s, size_t doubling_max_bytes,
                                                      size_t hd_max_bytes, int lanes) {
  std::vector<std::unique_ptr<Transport>> transports;
  for (int lane = 0; lane < lanes; ++lane) {
    auto t = UcxTransport::Create(rank, size, store, prefix, absl::Now() + absl::Seconds(30), /*single_host=*/true,
                                  "", lane);
    if (!t.ok()) return t.status();
    transports.push_back(std::move(*t));
  }
  CommunicatorOptions o;
  o.algorithm = algo;
  o.host_of_rank = hosts;
  o.collective_timeout = absl::Seconds(timeout_s);
  o.recursive_doubling_max_bytes = doubling_max_bytes;
  o.halving_doubling_max_bytes = hd_max_bytes;
  return Communicator::Create(std::move(transports), o);
}

int Run(int argc, char** argv) {
  auto a = ParseArgs(argc, argv);
  int rank = 0, size = 1, victim = -1;
  double timeout_s = 10;
  (void)absl::SimpleAtoi(a["rank"], &rank);
  (void)absl::SimpleAtoi(a["size"], &size);
  if (a.count("victim")) (void)absl::SimpleAtoi(a["victim"], &victim);
  if (a.count("timeout_s")) (void)absl::SimpleAtod(a["timeout_s"], &timeout_s);
  size_t doubling_max_bytes = HalvingDoublingAllreduce::kDefaultDoublingMaxBytes;
  if (a.count("doubling_max_bytes")) (void)absl::SimpleAtoi(a["doubling_max_bytes"], &doubling_max_bytes);
  size_t hd_max_bytes = kHalvingDoublingMaxBytes;
  if (a.count("hd_max_bytes")) (void)absl::SimpleAtoi(a["hd_max_bytes"], &hd_max_bytes);
  int lanes = 1;
  if (a.count("lanes")) (void)absl::SimpleAtoi(a["lanes"], &lanes);
  const std::string mode = a["mode"];
  Algorithm algo = Algorithm::kRing;
  if (a["algo"] == "auto") algo = Algorithm::kAuto;
  if (a["algo"] == "hd") algo = Algorithm::kHalvingDoubling;
  if (a["algo"] == "hier") algo = Algorithm::kHierarchical;
  if (a["algo"] == "shm") algo = Algorithm::kSharedMemory;
  std::vector<std::string> hosts;
  if (!a["hosts"].empty()) hosts = absl::StrSplit(a["hosts"], ',');
  std::vector<size_t> counts;
  for (absl::string_view c : absl::StrSplit(a["counts"], ',', absl::SkipEmpty())) {
    size_t n = 0;
    if (!absl::SimpleAtoi(c, &n)) return Fail(absl::StrCat("bad count '", c, "'"));
    counts.push_back(n);
  }
  if (a.count("ucx_tls")) setenv("UCX_TLS", a["ucx_tls"].c_str(), 1);
  if (a.count("ucx_rndv_thresh")) setenv("UCX_RNDV_THRESH", a["ucx_rndv_thresh"].c_str(), 1);
  FileStore store(a["store"]);
  const std::string prefix = a.count("prefix") ? a["prefix"] : "gen1";
  auto comm = Connect(rank, size, &store, prefix, algo, hosts, timeout_s, doubling_max_bytes, hd_max_bytes, lanes);
  if (!comm.ok()) return Fail(absl::StrCat("connect: ", comm.status().ToString()));
  const absl::Time far = absl::Now() + absl::Seconds(timeout_s * 3 + 30);

  if (mode == "allreduce") {
    const double s = size * (size + 1) / 2.0;
    // --in_flight: every allreduce issued before the first is waited for (the lanes run them
    // concurrently); otherwise one at a time.
    const bool in_flight = a.count("in_flight") > 0;
    std::vector<std::vector<float>> data(counts.size());
    std::vector<std::shared_ptr<Work>> works(counts.size());
    for (size_t c = 0; c < counts.size(); ++c) {
      const size_t n = counts[c];
      std::vector<float>& d = data[c];
      d.resize(n);
      for (size_t i = 0; i < n; ++i) d[i] = static_cast<float>((rank + 1) * static_cast<int>(i % 13 + 1));
      works[c] = (*comm)->AllreduceAsync(d.data(), n);
      if (!in_flight) {
        if (auto st = works[c]->Wait(far); !st.ok()) return Fail(st.ToString());
      }
    }
    for (size_t c = 0; c < counts.size(); ++c) {
      const size_t n = counts[c];
      const std::vector<float>& d = data[c];
      if (auto st = works[c]->Wait(far); !st.ok()) return Fail(st.ToString());
      for (size_t i = 0; i < n; ++i) {
        if (d[i] != static_cast<float>(s * static_cast<double>(i % 13 + 1))) {
          return Fail(absl::StrCat("count ", n, " element ", i, " = ", d[i], " want ", s * (i % 13 + 1)));
        }
      }
      std::cout << "result count=" << n << " crc="
                << Crc32(absl::string_view(reinterpret_cast<const char*>(d.data()), n * sizeof(float))) << std::endl;
    }
  } else if (mode == "bf16") {
    // Non-integer data with mixed signs and magnitudes; every rank can make every rank's, so each
    // checks its result against the float64 sum within bf16's bound: at most k roundings of a
    // partial sum (one per hop, and the last), each within 2^-8 of it, and |partial| <= sum |x|.
    auto value = [](int r, size_t i) {
      const double x = std::sin(0.37 * static_cast<double>(i) + 1.3 * r) * std::pow(2.0, static_cast<int>(i % 7) - 3);
      return static_cast<float>(x);
    };
    for (size_t n : counts) {
      std::vector<float> d(n);
      for (size_t i = 0; i < n; ++i) d[i] = value(rank, i);
      if (auto st = (*comm)->AllreduceAsync(d.data(), n, WireDtype::kBf16)->Wait(far); !st.ok()) {
        return Fail(st.ToString());
      }
      double worst = 0;
      size_t inexact = 0;
      for (size_t i = 0; i < n; ++i) {
        double ref = 0, mag = 0;
        for (int q = 0; q < size; ++q) {
          ref += value(q, i);
          mag += std::abs(value(q, i));
        }
        const double bound = size * (std::ldexp(1.0, -8) + std::ldexp(1.0, -23)) * mag;
        const double err = std::abs(static_cast<double>(d[i]) - ref);
        if (err > bound) {
          return Fail(absl::StrCat("count ", n, " element ", i, " = ", d[i], ", float64 sum ", ref, ": error ", err,
                                   " above the bf16 bound ", bound));
        }
        // Every algorithm ends with the result rounded to bf16, as every rank receives it.
        uint32_t bits;
        std::memcpy(&bits, &d[i], sizeof(bits));
        if ((bits & 0xffffu) != 0) {
          return Fail(absl::StrCat("count ", n, " element ", i, " = ", d[i], " is not a bf16 value"));
        }
        worst = std::max(worst, bound > 0 ? err / bound : 0.0);
        inexact += static_cast<float>(ref) != d[i];
      }
      std::cout << "result count=" << n << " crc="
                << Crc32(absl::string_view(reinterpret_cast<const char*>(d.data()), n * sizeof(float)))
                << " worst_error_over_bound=" << worst << " inexact=" << inexact << std::endl;
    }
  } else if (mode == "broadcast") {
    for (size_t n : counts) {
      const int root = size - 1;
      std::vector<float> d(n, rank == root ? 0.0f : -1.0f);
      if (rank == root) {
        for (size_t i = 0; i < n; ++i) d[i] = static_cast<float>(i % 1000) + 0.5f;
      }
      auto st = (*comm)->BroadcastAsync(d.data(), n, root)->Wait(far);
      if (!st.ok()) return Fail(st.ToString());
      for (size_t i = 0; i < n; ++i) {
        if (d[i] != static_cast<float>(i % 1000) + 0.5f) return Fail(absl::StrCat("broadcast element ", i, " = ", d[i]));
      }
    }
  } else if (mode == "barrier") {
    // The last rank arrives 300 ms late at each barrier: nobody may leave before it arrives.
    for (int i = 0; i < 3; ++i) {
      if (auto st = (*comm)->BarrierAsync()->Wait(far); !st.ok()) return Fail(st.ToString());  // aligned
      if (rank == size - 1) absl::SleepFor(absl::Milliseconds(300));
      const absl::Time start = absl::Now();
      if (auto st = (*comm)->BarrierAsync()->Wait(far); !st.ok()) return Fail(st.ToString());
      const absl::Duration waited = absl::Now() - start;
      if (rank != size - 1 && waited < absl::Milliseconds(250)) {
        return Fail(absl::StrCat("left barrier ", i, " after ", absl::FormatDuration(waited),
                                 ", before the late rank arrived"));
      }
    }
  } else if (mode == "bucketed") {
    backend::onednn::SetNumThreads(1);
    train::TrainerConfig c;
    c.arch = model::Arch::kResNet8;
    c.in_channels = 1;
    c.num_classes = 10;
    c.height = c.width = 8;
    c.per_worker_batch = 4;
    c.bn_group = 4;
    c.world_size = static_cast<uint32_t>(size);
    c.zero_init_last_bn_gamma = false;
    c.schedule.global_batch = 4u * size;
    auto overlapped = train::CpuTrainer::Create(c);
    auto after = train::CpuTrainer::Create(c);
    if (!overlapped.ok() || !after.ok()) return Fail("trainer");
    std::vector<float> x(4 * 64);
    std::vector<int32_t> y(4);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i + 101 * rank));
    for (int i = 0; i < 4; ++i) y[i] = (i + 3 * rank) % 10;
    // 4 KiB buckets, 1 KiB first bucket: many buckets, started during backward.
    train::PeerGroup peers;
    peers.rank = static_cast<uint32_t>(rank);
    peers.world_size = static_cast<uint32_t>(size);
    peers.communicator = comm->get();
    peers.bucket_bytes = 4 << 10;
    peers.first_bucket_bytes = 1 << 10;
    peers.collective_timeout = absl::Seconds(timeout_s * 3);
    if (auto st = (*overlapped)->ConnectPeers(peers); !st.ok()) return Fail(st.ToString());
    auto s1 = (*overlapped)->Step(0, x.data(), y.data());
    if (!s1.ok()) return Fail(s1.status().ToString());
    // Reference: the whole gradient array in one allreduce after backward.
    struct AllAtOnce final : train::GradientExchange {
      Communicator* comm;
      model::ParamStore* store;
      absl::Time deadline;
      void GradReady(size_t) override {}
      absl::Status Finish() override {
        return comm->AllreduceAsync(store->grads().data(), store->grads().size())->Wait(deadline);
      }
      uint64_t bytes_reduced() const override { return store->grads().size() * sizeof(float); }
      std::string Describe() const override { return "one allreduce after backward"; }
    };
    auto whole = std::make_unique<AllAtOnce>();
    whole->comm = comm->get();
    whole->store = &(*after)->store();
    whole->deadline = far;
    (*after)->UseGradientExchange(std::move(whole));
    auto s2 = (*after)->Step(0, x.data(), y.data());
    if (!s2.ok()) return Fail(s2.status().ToString());
    const auto& p1 = (*overlapped)->store().params();
    const auto& p2 = (*after)->store().params();
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < p1.size(); ++i) {
      max_diff = std::max(max_diff, static_cast<double>(std::abs(p1[i] - p2[i])));
      max_abs = std::max(max_abs, static_cast<double>(std::abs(p2[i])));
    }
    if (max_diff > 1e-6 * max_abs) return Fail(absl::StrCat("bucketed vs whole: max diff ", max_diff));
    std::cout << "buckets=(" << (*overlapped)->DescribeExchange() << ") bytes=" << (*overlapped)->bytes_reduced()
              << " crc=" << Crc32(absl::string_view(reinterpret_cast<const char*>(p1.data()), p1.size() * 4)) << std::endl;
  } else if (mode == "die" || mode == "stall") {
    std::vector<float> d(1 << 16, 1.0f);
    if (auto st = (*comm)->AllreduceAsync(d.data(), d.size())->Wait(far); !st.ok()) return Fail(st.ToString());
    if (rank == victim) {
      if (mode == "die") {
        // Let the peers finish the first collective (our last sends are in flight), then vanish.
        std::this_thread::sleep_for(std::chrono::seconds(1));
        _exit(9);
      }
      std::this_thread::sleep_for(std::chrono::seconds(static_cast<int>(timeout_s * 2 + 2)));
      return 0;
    }
    const absl::Time start = absl::Now();
    // One collective in flight on every lane: all of them fail, with the same (first) error.
    std::vector<std::vector<float>> bufs(lanes, d);
    std::vector<std::shared_ptr<Work>> works;
    for (auto& b : bufs) works.push_back((*comm)->AllreduceAsync(b.data(), b.size()));
    if (mode == "stall") {
      // A wait shorter than the collective's timeout names the collective's live state.
      auto early = works[0]->Wait(absl::Now() + absl::Seconds(1));
      std::cout << "early wait: " << early.ToString() << std::endl;
    }
    auto st = works[0]->Wait(far);
    if (st.ok()) return Fail("the collective succeeded although a rank was gone");
    for (size_t w = 1; w < works.size(); ++w) {
      auto other = works[w]->Wait(far);
      if (other != st) return Fail(absl::StrCat("collective ", w, " failed differently: ", other.ToString()));
    }
    std::cout << "error after " << absl::ToDoubleSeconds(absl::Now() - start) << " s: " << st.ToString() << std::endl;
    std::cout << "completed=" << (*comm)->completed() << std::endl;
    // Broken for good: the next collective fails at once with the same error.
    auto again = (*comm)->AllreduceAsync(d.data(), d.size())->Wait(absl::Now() + absl::Seconds(5));
    if (again.ok()) return Fail("a broken communicator accepted another collective");
    return 3;
  } else if (mode == "regen") {
    std::vector<float> d(1000, 1.0f);
    if (auto st = (*comm)->AllreduceAsync(d.data(), d.size())->Wait(far); !st.ok()) return Fail(st.ToString());
    (*comm)->Abort();
    if ((*comm)->AllreduceAsync(d.data(), d.size())->Wait(far).code() != absl::StatusCode::kAborted) {
      return Fail("an aborted communicator ran a collective");
    }
    comm->reset();
    if (rank == size - 1) return 0;  // leaves; the others re-form with k - 1
    auto next =
        Connect(rank, size - 1, &store, "gen2", algo, {}, timeout_s, doubling_max_bytes, hd_max_bytes, lanes);
    if (!next.ok()) return Fail(absl::StrCat("gen2 connect: ", next.status().ToString()));
    std::vector<float> e(777);
    for (size_t i = 0; i < e.size(); ++i) e[i] = static_cast<float>(rank + 1);
    if (auto st = (*next)->AllreduceAsync(e.data(), e.size())->Wait(far); !st.ok()) return Fail(st.ToString());
    const float want = static_cast<float>((size - 1) * size / 2);
    for (float v : e) {
      if (v != want) return Fail(absl::StrCat("gen2 sum ", v, " want ", want));
    }
  } else {
    return Fail("unknown --mode=" + mode);
  }
  std::cout << "ok" << std::endl;
  return 0;
}

}  // namespace
}  // namespace lmsgd::comm

int main(int argc, char** argv) {
  lmsgd::comm::SetUcxEnvironmentDefaults();
  return lmsgd::comm::Run(argc, argv);
}
