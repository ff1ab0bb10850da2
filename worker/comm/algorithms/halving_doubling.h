// Recursive halving/doubling (Rabenseifner; Thakur et al. 2005): for p = 2^m ranks, m
// reduce-scatter steps with partner rank XOR p/2, p/4, ..., 1, each exchanging half of the
// current range, then m allgather steps in reverse: the paper's choice for small messages. Up
// to 64 KiB the last halving and the first doubling step (same partner, one piece each way
// each) run as one exchange of the two-piece range that both partners sum: 2 log2(p) - 1
// steps. Non-powers of two: Gloo's "binary blocks" (see the .cc). Short messages: recursive
// doubling, log2(p) steps (see the class).
#pragma once

#include <vector>

#include "worker/comm/algorithms/allreduce.h"

namespace lmsgd::comm {

// Messages of at most `doubling_max_bytes` take the latency-optimal end of the family
// (Thakur et al.'s choice for short messages): recursive doubling, log2(p) steps that each
// exchange the whole vector with partner rank XOR 1, 2, ..., p/2 and add it; k not a power of
// two folds the first 2(k-p) ranks in pairs before and hands the result back after (2 more
// steps). Partners add the same two vectors (IEEE addition is commutative), and a folded pair's
// sum is computed by one rank, so every rank still ends bitwise identical. Larger messages take
// recursive halving/doubling (binary blocks): 2 log2(p) steps (2 log2(p) - 1 up to 64 KiB)
// moving 2(p-1)/p of the vector.
class HalvingDoublingAllreduce final : public AllreduceAlgorithm {
 public:
  // Recursive doubling moves the whole vector each step: faster while the step count
  // dominates, slower once the bytes do (the crossover is in docs/benchmarks.md).
  static constexpr size_t kDefaultDoublingMaxBytes = 32 << 10;
  // `wire` kBf16: `t` carries float32 messages as bf16 (a Bf16WireTransport). The sends and
  // final sums then carry the ring's hints (transport.h), and every rank ends with the same
  // bf16-rounded result: the last receive-and-add of each owned range rounds it (or, where
  // partners add the same values themselves, recursive doubling and the merged middle step,
  // the sum is rounded after), and what is gathered arrives exact.
  explicit HalvingDoublingAllreduce(Transport* t, size_t doubling_max_bytes = kDefaultDoublingMaxBytes,
                                    WireDtype wire = WireDtype::kFp32)
      : t_(t), doubling_max_bytes_(doubling_max_bytes), bf16_(wire == WireDtype::kBf16) {}
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override;

 private:
  absl::Status RunDoubling(float* data, size_t count, uint64_t sequence, absl::Time deadline);
  Transport* t_;
  size_t doubling_max_bytes_;
  bool bf16_;
  std::vector<float> scratch_;
};

}  // namespace lmsgd::comm
