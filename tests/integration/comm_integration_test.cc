// The CPU gradient exchange with real processes and real UCX: every algorithm for k in
// {1,2,3,4,5,7,8}, exact integer sums and identical results on all ranks, broadcast, barrier,
// bucketed allreduce during a real backward, a killed or stalled rank failing the others within
// the timeout (naming it), and a re-formed generation after an abort.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/match.h"
#include "common/file_util.h"
#include "tests/integration/test_util.h"

namespace lmsgd {
namespace {

struct RankRun {
  int exit_code = -1;
  std::string log;
};

// Starts k comm_rank processes with the given flags and waits for all of them.
std::vector<RankRun> RunRanks(int k, const std::vector<std::string>& flags, absl::Duration timeout) {
  const std::string dir = testing::MakeTempDir("comm");
  std::vector<std::unique_ptr<testing::Subprocess>> procs;
  std::vector<RankRun> out(k);
  for (int r = 0; r < k; ++r) {
    std::vector<std::string> argv = {LMSGD_COMM_RANK_BIN, absl::StrCat("--rank=", r), absl::StrCat("--size=", k),
                                     "--store=" + dir + "/store"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    procs.push_back(std::make_unique<testing::Subprocess>());
    EXPECT_TRUE(procs.back()->Start(argv, absl::StrCat(dir, "/rank", r, ".log")).ok());
  }
  const absl::Time deadline = absl::Now() + timeout;
  for (int r = 0; r < k; ++r) {
    auto rc = procs[r]->Wait(std::max(deadline - absl::Now(), absl::Seconds(1)));
    out[r].exit_code = rc.ok() ? *rc : -1;
    auto log = ReadFileToString(absl::StrCat(dir, "/rank", r, ".log"));
    out[r].log = log.ok() ? *log : "";
  }
  return out;
}

std::string Hosts(int k) {  // two simulated hosts: ranks [0, k/2) on "a", the rest on "b"
  std::vector<std::string> h;
  for (int r = 0; r < k; ++r) h.push_back(r < k / 2 ? "a" : "b");
  return "--hosts=" + absl::StrJoin(h, ",");
}

// Checks that every rank succeeded and returns the distinct sets of "result ..." lines (CRCs of
// the results) they printed: one element when all ranks agree.
std::set<std::string> DistinctResults(const std::vector<RankRun>& runs, const std::string& context) {
  std::set<std::string> distinct;
  for (size_t r = 0; r < runs.size(); ++r) {
    EXPECT_EQ(runs[r].exit_code, 0) << context << " rank " << r << ":\n" << runs[r].log;
    EXPECT_NE(runs[r].log.find("ok\n"), std::string::npos) << context << " rank " << r;
    std::string results;
    for (absl::string_view line : absl::StrSplit(runs[r].log, '\n')) {
      if (absl::StartsWith(line, "result ")) absl::StrAppend(&results, line, "\n");
    }
    distinct.insert(results);
  }
  return distinct;
}

class AllreduceTest : public ::testing::TestWithParam<std::tuple<int, std::string>> {};

TEST_P(AllreduceTest, ExactSumIdenticalOnAllRanks) {
  const auto [k, algo] = GetParam();
  std::vector<std::string> flags = {"--mode=allreduce", "--algo=" + algo, "--counts=1,7,1023,1048576,25000000",
                                    "--timeout_s=120"};
  if (algo == "hier") flags.push_back(Hosts(k));
  auto runs = RunRanks(k, flags, absl::Seconds(300));
  EXPECT_EQ(DistinctResults(runs, absl::StrCat("k=", k, " ", algo)).size(), 1u) << "ranks disagree";
}

INSTANTIATE_TEST_SUITE_P(Worlds, AllreduceTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 5, 7, 8),
                                            ::testing::Values("ring", "hd", "hier", "shm", "auto")),
                         [](const auto& info) {
                           return absl::StrCat("k", std::get<0>(info.param), "_", std::get<1>(info.param));
                         });

// The bf16 wire (JobSpec gradient_exchange_dtype BF16): every algorithm's sum within bf16's bound
// of the float64 sum and bitwise the same on every rank; halving/doubling both by
// recursive doubling (small counts) and by halving (large; k = 7: three binary blocks, the
// middle one adding a hand-up it passes on), the shared-memory segment across several chunks.
class Bf16AllreduceTest : public ::testing::TestWithParam<std::tuple<int, std::string>> {};

TEST_P(Bf16AllreduceTest, WithinBf16BoundsOfTheFloat64SumAndIdenticalOnAllRanks) {
  const auto [k, algo] = GetParam();
  std::vector<std::string> flags = {"--mode=bf16", "--algo=" + algo, "--counts=1,7,1023,65537,3000000",
                                    "--timeout_s=120"};
  if (algo == "hier") flags.push_back(Hosts(k));
  auto runs = RunRanks(k, flags, absl::Seconds(300));
  const auto distinct = DistinctResults(runs, absl::StrCat("bf16 k=", k, " ", algo));
  EXPECT_EQ(distinct.size(), 1u) << "ranks disagree";
  // The sums went through bf16: most of the 3M are not the float32 rounding of the exact sum.
  const size_t at = runs[0].log.find("result count=3000000 ");
  ASSERT_NE(at, std::string::npos) << runs[0].log;
  const std::string line = runs[0].log.substr(at, runs[0].log.find('\n', at) - at);
  size_t inexact = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(line.find("inexact=") + 8), &inexact)) << line;
  EXPECT_GT(inexact, 1000000u) << line;
}

INSTANTIATE_TEST_SUITE_P(Worlds, Bf16AllreduceTest,
                         ::testing::Combine(::testing::Values(2, 3, 4, 5, 7),
                                            ::testing::Values("ring", "hd", "hier", "shm", "auto")),
                         [](const auto& info) {
                           return absl::StrCat("k", std::get<0>(info.param), "_", std::get<1>(info.param));
                         });

// The matrix above takes recursive doubling for its small counts (up to
// kDefaultDoublingMaxBytes) and halving/doubling for the large ones. Here each at the sizes the
// other takes: binary blocks with fewer elements than pieces, the power-of-two path with its
// merged middle exchange (k = 4, 8; up to 64 KiB) down to one element, and recursive doubling (with the fold for
// non-powers of two) on messages far above its default limit.
TEST(CommTest, HalvingAndDoublingEachAtEverySize) {
  for (int k : {3, 4, 5, 7, 8}) {
    for (const std::string limit : {"0", "1000000000"}) {
      auto runs = RunRanks(k, {"--mode=allreduce", "--algo=hd", "--doubling_max_bytes=" + limit,
                               "--counts=1,7,1023,8193,1048576"},
                           absl::Seconds(120));
      const std::string context = absl::StrCat("k=", k, " limit ", limit);
      EXPECT_EQ(DistinctResults(runs, context).size(), 1u) << context << ": ranks disagree";
    }
  }
}

// The hierarchical allreduce with 3 and 4 simulated hosts of several ranks (host leaders by
// binary blocks and by the power-of-two path) and uneven hosts, its leaders' phase by
// halving/doubling at every size and by ring at every size.
TEST(CommTest, HierarchicalLeadersByHalvingDoublingAndByRing) {
  const std::vector<std::string> layouts = {"a,a,b,b,c,c", "a,a,b,b,c,c,d,d", "a,b,b,b,c"};
  for (const std::string& hosts : layouts) {
    const int k = static_cast<int>(std::count(hosts.begin(), hosts.end(), ',')) + 1;
    for (const std::string limit : {"0", "1000000000"}) {
      auto runs = RunRanks(k, {"--mode=allreduce", "--algo=hier", "--hosts=" + hosts, "--hd_max_bytes=" + limit,
                               "--counts=1,7,1023,8193,1048576"},
                           absl::Seconds(120));
      const std::string context = absl::StrCat("hosts ", hosts, " halving/doubling up to ", limit, " bytes");
      EXPECT_EQ(DistinctResults(runs, context).size(), 1u) << context << ": ranks disagree";
    }
  }
}

// Several lanes (the paper's c concurrent allreduces): every count's allreduce issued before any
// is waited for, so lanes run them at once, each algorithm; exact sums, identical ranks.
TEST(CommTest, LanesRunAllreducesConcurrently) {
  for (int k : {2, 3, 4}) {
    for (const std::string algo : {"auto", "ring", "hd", "shm", "hier"}) {
      std::vector<std::string> flags = {"--mode=allreduce", "--algo=" + algo, "--lanes=3", "--in_flight",
                                        "--counts=1,7,1023,8193,100000,1048576,5,16384,262145"};
      if (algo == "hier") flags.push_back(Hosts(k));
      const std::string context = absl::StrCat("k=", k, " ", algo, " 3 lanes");
      auto runs = RunRanks(k, flags, absl::Seconds(120));
      EXPECT_EQ(DistinctResults(runs, context).size(), 1u) << context << ": ranks disagree";
    }
  }
}

// Over UCX's TCP transport (the wire between hosts) instead of shared memory: the transport's
// receive-and-add then unpacks TCP's fragments (and stages messages above its fused limit), and
// the bf16 wire packs and unpacks them. With a 1 KiB rendezvous threshold (on TCP and on shared
// memory) it does so for rendezvous data too.
TEST(CommTest, RingAndHalvingDoublingOverTcpAndByRendezvous) {
  struct Wire {
    int k;
    std::vector<std::string> flags;
  };
  const std::vector<Wire> wires = {{3, {"--ucx_tls=tcp"}},
                                   {4, {"--ucx_tls=tcp"}},
                                   {4, {"--ucx_tls=tcp", "--ucx_rndv_thresh=1024"}},
                                   {4, {"--ucx_rndv_thresh=1024"}}};
  for (const Wire& w : wires) {
    for (const std::string mode : {"allreduce", "bf16"}) {
      for (const std::string algo : {"ring", "hd"}) {
        std::vector<std::string> flags = {"--mode=" + mode, "--algo=" + algo, "--doubling_max_bytes=0",
                                          "--counts=1,7,1023,8193,100000,1048576"};
        flags.insert(flags.end(), w.flags.begin(), w.flags.end());
        const std::string context = absl::StrCat("k=", w.k, " ", mode, " ", algo, " ", absl::StrJoin(w.flags, " "));
        auto runs = RunRanks(w.k, flags, absl::Seconds(120));
        EXPECT_EQ(DistinctResults(runs, context).size(), 1u) << context << ": ranks disagree";
      }
    }
  }
}

TEST(CommTest, BroadcastAndBarrier) {
  for (int k : {1, 3, 4}) {
    auto b = RunRanks(k, {"--mode=broadcast", "--counts=1,1000,300000"}, absl::Seconds(60));
    for (int r = 0; r < k; ++r) EXPECT_EQ(b[r].exit_code, 0) << "k=" << k << " rank " << r << ":\n" << b[r].log;
    auto bar = RunRanks(k, {"--mode=barrier"}, absl::Seconds(60));
    for (int r = 0; r < k; ++r) EXPECT_EQ(bar[r].exit_code, 0) << "k=" << k << " rank " << r << ":\n" << bar[r].log;
  }
}

TEST(CommTest, BucketedAllreduceDuringBackwardEqualsOneAllreduceAfterIt) {
  for (int k : {2, 3}) {
    for (const std::string lanes : {"1", "3"}) {  // 3: several buckets in flight at once
      auto runs = RunRanks(k, {"--mode=bucketed", "--lanes=" + lanes}, absl::Seconds(120));
      std::set<std::string> crcs;
      for (int r = 0; r < k; ++r) {
        ASSERT_EQ(runs[r].exit_code, 0) << "rank " << r << " lanes " << lanes << ":\n" << runs[r].log;
        auto pos = runs[r].log.find("crc=");
        ASSERT_NE(pos, std::string::npos);
        crcs.insert(runs[r].log.substr(pos, runs[r].log.find('\n', pos) - pos));
        EXPECT_NE(runs[r].log.find("buckets="), std::string::npos);
      }
      EXPECT_EQ(crcs.size(), 1u) << "ranks hold different weights after the step (lanes " << lanes << ")";
    }
  }
}

TEST(CommTest, AKilledRankFailsTheOthersWithinTheTimeoutNamingIt) {
  const absl::Time start = absl::Now();
  auto runs = RunRanks(3, {"--mode=die", "--victim=1", "--timeout_s=5"}, absl::Seconds(60));
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  EXPECT_EQ(runs[1].exit_code, 9);
  // Rank 2 receives from rank 1 in the ring and must name it; rank 0 may instead time out on
  // rank 2, which stopped after its own failure (one hop of visibility, see the stall test).
  EXPECT_NE(runs[2].log.find("rank 1"), std::string::npos) << runs[2].log;
  for (int r : {0, 2}) EXPECT_EQ(runs[r].exit_code, 3) << runs[r].log;
}

// Shared memory: a rank that dies is seen by the others well before the deadline (its process
// is gone), and they name it.
TEST(CommTest, AKilledRankOnSharedMemoryIsSeenBeforeTheDeadline) {
  const absl::Time start = absl::Now();
  auto runs = RunRanks(3, {"--mode=die", "--victim=1", "--timeout_s=20", "--algo=shm"}, absl::Seconds(90));
  EXPECT_LT(absl::Now() - start, absl::Seconds(15)) << "survivors waited for the 20 s deadline";
  EXPECT_EQ(runs[1].exit_code, 9);
  for (int r : {0, 2}) {
    EXPECT_EQ(runs[r].exit_code, 3) << runs[r].log;
    EXPECT_NE(runs[r].log.find("rank 1 (pid"), std::string::npos) << runs[r].log;
    EXPECT_NE(runs[r].log.find("exited"), std::string::npos) << runs[r].log;
  }
}

// A stalled rank: every survivor fails with DEADLINE_EXCEEDED within about the timeout; the
// survivors that talk to it directly name it (a survivor waiting on another survivor that is
// itself stuck names that survivor: timeouts cannot see further than one hop).
TEST(CommTest, AStalledRankTimesOutTheOthersNamingIt) {
  for (const std::string algo : {"ring", "hd", "shm"}) {
    const absl::Time start = absl::Now();
    auto runs = RunRanks(3, {"--mode=stall", "--victim=2", "--timeout_s=3", "--algo=" + algo}, absl::Seconds(60));
    EXPECT_LT(absl::Now() - start, absl::Seconds(25));
    int named = 0, named_live = 0;
    for (int r : {0, 1}) {
      const std::string& log = runs[r].log;
      EXPECT_EQ(runs[r].exit_code, 3) << algo << " rank " << r << ":\n" << log;
      EXPECT_NE(log.find("DEADLINE_EXCEEDED"), std::string::npos) << log;
      named += log.find("timed out waiting for rank 2") != std::string::npos;
      // The flight recorder: the first collective succeeded, the second is the stuck one; a wait
      // shorter than the timeout sees it running (and, over a transport, whom it waits for).
      EXPECT_NE(log.find("completed=1"), std::string::npos) << log;
      EXPECT_NE(log.find(absl::StrCat("flight recorder of rank ", r)), std::string::npos) << log;
      EXPECT_NE(log.find("#1 allreduce of 65536 floats (262.1 KB)"), std::string::npos) << log;
      EXPECT_NE(log.find("#2 allreduce of 65536 floats (262.1 KB)"), std::string::npos) << log;
      EXPECT_NE(log.find(": FAILED after"), std::string::npos) << log;
      const size_t early = log.find("early wait: DEADLINE_EXCEEDED: waiting for #2 allreduce");
      EXPECT_NE(early, std::string::npos) << log;
      if (early != std::string::npos) {
        const std::string line = log.substr(early, log.find('\n', early) - early);
        // Running since the communication thread took it up, a hand-off after the 1 s wait began:
        // a little under 1 s on a loaded machine, never more than the wait plus the print.
        const size_t at = line.find(": running ");
        ASSERT_NE(at, std::string::npos) << line;
        const double running = std::strtod(line.c_str() + at + 10, nullptr);
        EXPECT_GT(running, 0.8) << line;
        EXPECT_LT(running, 1.5) << line;
        named_live += absl::StrContains(line, "waiting for rank 2");
      }
    }
    EXPECT_GE(named, 1) << algo;
    if (algo != "shm") {
      EXPECT_GE(named_live, 1) << algo << ": the live record names the stalled rank";
    }
  }
}

// With c lanes (the paper's c allreduces in flight; JobSpec concurrent_allreduces): c
// collectives fail together when a rank dies or stalls, within the timeout, all with the first
// failure's error (naming the rank).
TEST(CommTest, CollectivesInFlightOnEveryLaneFailTogether) {
  for (const std::string mode : {"die", "stall"}) {
    for (const std::string algo : {"ring", "shm"}) {
      const absl::Time start = absl::Now();
      auto runs = RunRanks(3, {"--mode=" + mode, "--victim=1", "--timeout_s=4", "--algo=" + algo, "--lanes=3"},
                           absl::Seconds(60));
      const std::string context = mode + " " + algo;
      EXPECT_LT(absl::Now() - start, absl::Seconds(30)) << context;
      EXPECT_EQ(runs[1].exit_code, mode == "die" ? 9 : 0) << context;
      int named = 0;
      for (int r : {0, 2}) {
        EXPECT_EQ(runs[r].exit_code, 3) << context << " rank " << r << ":\n" << runs[r].log;
        EXPECT_EQ(runs[r].log.find("failed differently"), std::string::npos) << runs[r].log;
        named += runs[r].log.find("rank 1") != std::string::npos;
      }
      EXPECT_GE(named, 1) << context;
    }
  }
}

TEST(CommTest, ANewGenerationWithFewerRanksWorksAfterAnAbort) {
  for (const std::string lanes : {"1", "3"}) {
    auto runs = RunRanks(3, {"--mode=regen", "--lanes=" + lanes}, absl::Seconds(60));
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(runs[r].exit_code, 0) << "rank " << r << " lanes " << lanes << ":\n" << runs[r].log;
    }
  }
}

}  // namespace
}  // namespace lmsgd
