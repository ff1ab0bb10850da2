#include "worker/data/sampler.h"

#include <cstddef>
#include <numeric>

namespace lmsgd::data {

uint64_t SplitMix64::Below(uint64_t bound) {
  if (bound <= 1) return 0;
  // Rejection sampling on the top of the range keeps every value equally likely.
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % bound);
  uint64_t x;
  do {
    x = Next();
  } while (x >= limit);
  return x % bound;
}

std::vector<uint64_t> EpochPermutation(uint64_t n, uint64_t seed, uint64_t epoch) {
  std::vector<uint64_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  // Mix seed and epoch into one stream seed.
  SplitMix64 mix(seed ^ (0x5851f42d4c957f2dull * (epoch + 1)));
  SplitMix64 rng(mix.Next());
  for (uint64_t i = n; i > 1; --i) {
    const uint64_t j = rng.Below(i);
    std::swap(perm[i - 1], perm[j]);
  }
  return perm;
}

std::vector<uint64_t> ShardForRank(uint64_t n, uint64_t seed, uint64_t epoch, uint32_t rank, uint32_t world_size) {
  if (world_size == 0 || rank >= world_size) return {};
  std::vector<uint64_t> perm = EpochPermutation(n, seed, epoch);
  const uint64_t part = n / world_size;
  return std::vector<uint64_t>(perm.begin() + static_cast<std::ptrdiff_t>(rank * part),
                               perm.begin() + static_cast<std::ptrdiff_t>((rank + 1) * part));
}

std::vector<uint64_t> WorkerOrder(uint64_t n, uint64_t seed, uint64_t epoch, uint32_t rank, uint32_t world_size,
                                  uint32_t virtual_workers, uint32_t batch) {
  if (virtual_workers <= 1) return ShardForRank(n, seed, epoch, rank, world_size);
  if (world_size == 0 || rank >= world_size || batch == 0) return {};
  const uint64_t parts = static_cast<uint64_t>(world_size) * virtual_workers;
  const std::vector<uint64_t> perm = EpochPermutation(n, seed, epoch);
  const uint64_t part = n / parts;
  const uint64_t steps = part / batch;
  std::vector<uint64_t> out;
  out.reserve(steps * batch * virtual_workers);
  for (uint64_t t = 0; t < steps; ++t) {
    for (uint32_t j = 0; j < virtual_workers; ++j) {
      const uint64_t base = (static_cast<uint64_t>(rank) * virtual_workers + j) * part + t * batch;
      out.insert(out.end(), perm.begin() + static_cast<std::ptrdiff_t>(base),
                 perm.begin() + static_cast<std::ptrdiff_t>(base + batch));
    }
  }
  return out;
}

}  // namespace lmsgd::data
