// Which allreduce runs where: AUTO's choice (ChooseAlgorithm) and the hierarchical allreduce's
// choice among host leaders (the paper's inter-server phase: halving/doubling for small
// messages, ring for large), seen through the operations it hands a recording transport; and
// how the algorithms cut a step into segments.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "worker/comm/algorithms/allreduce.h"
#include "worker/comm/algorithms/broadcast_barrier.h"
#include "worker/comm/algorithms/halving_doubling.h"
#include "worker/comm/algorithms/hierarchical.h"
#include "worker/comm/algorithms/ring.h"
#include "worker/comm/algorithms/shared_memory.h"
#include "worker/comm/algorithms/tags.h"
#include "worker/comm/communicator.h"

namespace lmsgd::comm {
namespace {

// Records every Exchange (its `what`, peers and operations) and completes it at once without
// moving data.
class RecordingTransport final : public Transport {
 public:
  RecordingTransport(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time, const char* what) override {
    whats.insert(what);
    for (const P2POp& op : ops) (op.is_send() ? sent_to : received_from).insert(op.peer);
    exchanges.push_back({what, ops});
    return absl::OkStatus();
  }
  void Abort() override {}
  std::set<std::string> whats;
  std::set<int> sent_to, received_from;
  std::vector<std::pair<std::string, std::vector<P2POp>>> exchanges;

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

// A segmented step cuts a range into contiguous pieces of about kSegmentFloats, tagged with
// consecutive steps, at most tags::kSegmentsPerStep of them, each keeping the op's kind and hint.
TEST(AppendSegmentedTest, CutsTheRangeIntoConsecutivelyTaggedPieces) {
  for (size_t n : {size_t{1}, kSegmentFloats, 3 * kSegmentFloats + 5, 100 * kSegmentFloats}) {
    std::vector<float> buf(n);
    std::vector<P2POp> ops = {{P2POp::kSend, 9, nullptr, 4, 77}};  // already there: kept
    AppendSegmented({P2POp::kRecvAdd, 3, buf.data(), n * sizeof(float), 0, P2POp::kFinal}, /*sequence=*/5,
                    /*step=*/1000, &ops);
    const size_t expected = std::min<size_t>((n + kSegmentFloats - 1) / kSegmentFloats, tags::kSegmentsPerStep);
    ASSERT_EQ(ops.size(), 1 + expected) << n;
    EXPECT_EQ(ops[0].tag, 77u);
    float* next = buf.data();
    for (size_t j = 0; j < expected; ++j) {
      const P2POp& op = ops[1 + j];
      EXPECT_EQ(op.kind, P2POp::kRecvAdd);
      EXPECT_EQ(op.peer, 3);
      EXPECT_EQ(op.hint, P2POp::kFinal);
      EXPECT_EQ(op.tag, MakeTag(5, 1000 + static_cast<uint32_t>(j)));
      EXPECT_EQ(op.buf, next) << n << " segment " << j;
      EXPECT_GT(op.bytes, 0u);
      EXPECT_LE(op.bytes, (n / expected + 1) * sizeof(float));
      next += op.bytes / sizeof(float);
    }
    EXPECT_EQ(next, buf.data() + n) << "the pieces cover the range exactly";
  }
}

// Halving/doubling's reduce-scatter moves its halves in segments, as the ring does, so that the
// additions (and a bf16 wire's conversions) overlap the transfer; its allgather sends whole.
TEST(HalvingDoublingAllreduceTest, TheReduceScatterIsSegmented) {
  for (int k : {2, 4}) {
    RecordingTransport t(0, k);
    HalvingDoublingAllreduce hd(&t, /*doubling_max_bytes=*/0);
    std::vector<float> data(8 * kSegmentFloats);
    ASSERT_TRUE(hd.Run(data.data(), data.size(), 1, absl::InfiniteFuture()).ok());
    size_t halving = 0;
    for (const auto& [what, ops] : t.exchanges) {
      if (what != "halving/doubling allreduce (binary blocks: reduce-scatter)") continue;
      // Step `halving` moves 8 / 2^(halving + 1) segments' worth each way.
      const size_t pieces = 8 >> (halving + 1);
      size_t recv_adds = 0, sends = 0;
      for (const P2POp& op : ops) (op.kind == P2POp::kRecvAdd ? recv_adds : sends) += 1;
      EXPECT_EQ(recv_adds, pieces) << "k=" << k << " step " << halving;
      EXPECT_EQ(sends, pieces) << "k=" << k << " step " << halving;
      ++halving;
    }
    EXPECT_EQ(halving, k == 2 ? 1u : 2u);
  }
}

}  // namespace
}  // namespace lmsgd::comm
