// Sharding per the paper: one permutation per epoch, split into k contiguous parts.
#include "worker/data/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

namespace lmsgd::data {
namespace {

TEST(SamplerTest, EverySampleExactlyOncePerEpochAcrossRanks) {
  for (uint32_t k : {1u, 2u, 3u, 4u, 7u, 8u}) {
    const uint64_t n = 1000;
    for (uint64_t epoch = 0; epoch < 3; ++epoch) {
      std::multiset<uint64_t> seen;
      for (uint32_t r = 0; r < k; ++r) {
        auto shard = ShardForRank(n, 42, epoch, r, k);
        EXPECT_EQ(shard.size(), n / k);
        seen.insert(shard.begin(), shard.end());
      }
      EXPECT_EQ(seen.size(), (n / k) * k) << "k=" << k;
      for (uint64_t x : seen) {
        ASSERT_LT(x, n);
        ASSERT_EQ(seen.count(x), 1u) << "sample " << x << " twice, k=" << k;
      }
    }
  }
}

TEST(SamplerTest, ShardsAreContiguousPartsOfOnePermutation) {
  const auto perm = EpochPermutation(999, 7, 3);
  std::vector<uint64_t> joined;
  for (uint32_t r = 0; r < 3; ++r) {
    auto s = ShardForRank(999, 7, 3, r, 3);
    joined.insert(joined.end(), s.begin(), s.end());
  }
  EXPECT_EQ(joined, perm);
}

TEST(SamplerTest, DeterministicAndChangesPerEpochAndSeed) {
  const auto a = EpochPermutation(500, 1, 0);
  EXPECT_EQ(a, EpochPermutation(500, 1, 0));
  EXPECT_NE(a, EpochPermutation(500, 1, 1));
  EXPECT_NE(a, EpochPermutation(500, 2, 0));
  std::vector<uint64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (uint64_t i = 0; i < sorted.size(); ++i) ASSERT_EQ(sorted[i], i);
  // Shuffled, not the identity.
  int fixed = 0;
  for (uint64_t i = 0; i < a.size(); ++i) fixed += a[i] == i;
  EXPECT_LT(fixed, 10);
}

TEST(SamplerTest, BelowIsRoughlyUniform) {
  SplitMix64 rng(123);
  std::vector<int> counts(6, 0);
  for (int i = 0; i < 60000; ++i) counts[rng.Below(6)]++;
  for (int c : counts) EXPECT_NEAR(c, 10000, 400);
}

TEST(WorkerOrderTest, VirtualWorkersSeeWhatRealWorkersWould) {
  const uint64_t n = 1000;
  // 1 process x 4 virtual workers of 8 == 4 ranks of 8: step t's 32 examples are ranks 0..3's
  // step-t batches in order.
  const auto v = WorkerOrder(n, 5, 3, 0, 1, 4, 8);
  std::vector<std::vector<uint64_t>> ranks;
  for (uint32_t r = 0; r < 4; ++r) ranks.push_back(ShardForRank(n, 5, 3, r, 4));
  ASSERT_EQ(v.size(), (n / 4 / 8) * 8 * 4);
  for (size_t t = 0; t < v.size() / 32; ++t) {
    for (uint32_t j = 0; j < 4; ++j) {
      for (size_t i = 0; i < 8; ++i) EXPECT_EQ(v[t * 32 + j * 8 + i], ranks[j][t * 8 + i]);
    }
  }
  // 2 ranks x 2 virtual workers: rank 1 covers parts 2 and 3.
  const auto r1 = WorkerOrder(n, 5, 3, 1, 2, 2, 8);
  EXPECT_EQ(r1[0], ranks[2][0]);
  EXPECT_EQ(r1[8], ranks[3][0]);
  EXPECT_EQ(WorkerOrder(n, 5, 3, 1, 2, 1, 8), ShardForRank(n, 5, 3, 1, 2));
}

}  // namespace
}  // namespace lmsgd::data
