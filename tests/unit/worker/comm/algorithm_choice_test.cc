// Which allreduce runs where: AUTO's choice (ChooseAlgorithm) and the hierarchical allreduce's
// choice among host leaders (the paper's inter-server phase: halving/doubling for small
// messages, ring for large), seen through the operations it hands a recording transport.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "worker/comm/algorithms/allreduce.h"
#include "worker/comm/algorithms/broadcast_barrier.h"
#include "worker/comm/algorithms/halving_doubling.h"
#include "worker/comm/algorithms/hierarchical.h"
#include "worker/comm/algorithms/ring.h"
#include "worker/comm/algorithms/shared_memory.h"
#include "worker/comm/communicator.h"

namespace lmsgd::comm {
namespace {

// Records every Exchange (its `what` and peers) and completes it at once without moving data.
class RecordingTransport final : public Transport {
 public:
  RecordingTransport(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time, const char* what) override {
    whats.insert(what);
    for (const P2POp& op : ops) (op.is_send() ? sent_to : received_from).insert(op.peer);
    return absl::OkStatus();
  }
  void Abort() override {}
  std::set<std::string> whats;
  std::set<int> sent_to, received_from;

 private:
  int rank_, size_;
};

TEST(ChooseAlgorithmTest, BySizeHostsAndSharedMemory) {
  // One host with the shared-memory segment: shared memory at every size.
  EXPECT_EQ(ChooseAlgorithm(4 << 10, 4, 1, true), Algorithm::kSharedMemory);
  EXPECT_EQ(ChooseAlgorithm(64 << 20, 4, 1, true), Algorithm::kSharedMemory);
  // Without it, or one rank per host: halving/doubling up to the limit, ring above.
  EXPECT_EQ(ChooseAlgorithm(kHalvingDoublingMaxBytes, 4, 1, false), Algorithm::kHalvingDoubling);
  EXPECT_EQ(ChooseAlgorithm(kHalvingDoublingMaxBytes + 4, 4, 1, false), Algorithm::kRing);
  EXPECT_EQ(ChooseAlgorithm(64 << 10, 4, 4, false), Algorithm::kHalvingDoubling);
  EXPECT_EQ(ChooseAlgorithm(1 << 20, 4, 4, false), Algorithm::kRing);
  EXPECT_EQ(ChooseAlgorithm(1 << 20, 4, 4, false, /*halving_doubling_max_bytes=*/4 << 20),
            Algorithm::kHalvingDoubling);
  // Several hosts with several ranks on one: hierarchical at every size.
  EXPECT_EQ(ChooseAlgorithm(4 << 10, 8, 2, false), Algorithm::kHierarchical);
  EXPECT_EQ(ChooseAlgorithm(64 << 20, 8, 2, false), Algorithm::kHierarchical);
}

// Rank 0 alone on host "a"; hosts "b" (ranks 1, 2), "c" (3), "d" (4): leaders 0, 1, 3, 4. Rank 0
// has no local ranks, so everything it hands the transport is the phase among leaders.
TEST(HierarchicalAllreduceTest, LeadersUseHalvingDoublingForSmallMessagesAndRingForLarge) {
  const std::vector<std::string> hosts = {"a", "b", "b", "c", "d"};
  RecordingTransport t(0, 5);
  auto h = HierarchicalAllreduce::Create(&t, hosts, absl::InfiniteFuture());
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ((*h)->num_hosts(), 4);
  EXPECT_EQ((*h)->InterHostAlgorithm(kHalvingDoublingMaxBytes), Algorithm::kHalvingDoubling);
  EXPECT_EQ((*h)->InterHostAlgorithm(kHalvingDoublingMaxBytes + 4), Algorithm::kRing);

  std::vector<float> small(1000, 1.0f);  // 4 KB: recursive doubling among the 4 leaders
  ASSERT_TRUE((*h)->Run(small.data(), small.size(), 1, absl::InfiniteFuture()).ok());
  EXPECT_EQ(t.whats, std::set<std::string>{"halving/doubling allreduce (recursive doubling)"});
  // Partners: leader index 0 XOR 1 and XOR 2, i.e. ranks 1 and 3 (never rank 2, not a leader).
  EXPECT_EQ(t.sent_to, (std::set<int>{1, 3}));
  EXPECT_EQ(t.received_from, (std::set<int>{1, 3}));

  t.whats.clear();
  t.sent_to.clear();
  t.received_from.clear();
  std::vector<float> large(kHalvingDoublingMaxBytes / sizeof(float) + 1, 1.0f);
  ASSERT_TRUE((*h)->Run(large.data(), large.size(), 2, absl::InfiniteFuture()).ok());
  EXPECT_EQ(t.whats, (std::set<std::string>{"ring allreduce (reduce-scatter)", "ring allreduce (allgather)"}));
  // Ring among leaders 0 -> 1 -> 3 -> 4 -> 0: sends to rank 1, receives from rank 4.
  EXPECT_EQ(t.sent_to, std::set<int>{1});
  EXPECT_EQ(t.received_from, std::set<int>{4});
}

TEST(HierarchicalAllreduceTest, TheLimitIsAnOption) {
  const std::vector<std::string> hosts = {"a", "b", "b", "c", "d"};
  RecordingTransport t(0, 5);
  auto h = HierarchicalAllreduce::Create(&t, hosts, absl::InfiniteFuture(), /*halving_doubling_max_bytes=*/0,
                                         /*doubling_max_bytes=*/0);
  ASSERT_TRUE(h.ok()) << h.status();
  std::vector<float> small(1000, 1.0f);
  ASSERT_TRUE((*h)->Run(small.data(), small.size(), 1, absl::InfiniteFuture()).ok());
  EXPECT_EQ(t.whats, (std::set<std::string>{"ring allreduce (reduce-scatter)", "ring allreduce (allgather)"}));
}

}  // namespace
}  // namespace lmsgd::comm
