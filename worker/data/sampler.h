// Epoch sharding as in Goyal et al. (2017), section 2.3: ONE random permutation of the whole
// training set per epoch, derived from (seed, epoch), split into k contiguous parts; rank r
// takes part r. Not k independent shuffles. Deterministic and portable: the permutation uses
// its own generator (SplitMix64) and Fisher-Yates, not std::shuffle, whose output differs
// between standard libraries.
//
// Part size is floor(N / k); the N mod k samples at the end of the permutation sit out that
// epoch (a different set each epoch). A rank then takes whole batches from its part.
#pragma once

#include <cstdint>
#include <vector>

namespace lmsgd::data {

// A permutation of 0..n-1, a function of (seed, epoch) only.
std::vector<uint64_t> EpochPermutation(uint64_t n, uint64_t seed, uint64_t epoch);

// The indices rank `rank` of `world_size` visits in `epoch`, in order.
std::vector<uint64_t> ShardForRank(uint64_t n, uint64_t seed, uint64_t epoch, uint32_t rank, uint32_t world_size);

// The order in which a worker with `virtual_workers` (m) groups of `batch` (n) examples visits
// an epoch: the permutation split into world_size * m parts; virtual worker j of rank r takes
// part r * m + j. Step t's m*n examples are part (r*m)'s examples [t*n, (t+1)*n), then part
// (r*m+1)'s, and so on, so one process with m virtual workers sees exactly what m real workers
// would (and k workers with m virtual workers each simulate k*m workers). With m = 1 this is
// ShardForRank.
std::vector<uint64_t> WorkerOrder(uint64_t n, uint64_t seed, uint64_t epoch, uint32_t rank, uint32_t world_size,
                                  uint32_t virtual_workers, uint32_t batch);

// SplitMix64: a small, well-mixed, portable 64-bit generator.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, bound) without modulo bias (Lemire's method with rejection).
  uint64_t Below(uint64_t bound);
  uint64_t state() const { return state_; }

 private:
  uint64_t state_;
};

}  // namespace lmsgd::data
