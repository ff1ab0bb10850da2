// Ring (reduce-scatter, then allgather): the buffer is cut into k chunks; in k-1 steps each
// rank sends one chunk to its right neighbour and adds the chunk from its left; then k-1 steps
// pass the reduced chunks around. 2(k-1) steps, each moving count/k elements: bandwidth optimal,
// latency 2(k-1) alpha.
#pragma once

#include "worker/comm/algorithms/allreduce.h"

namespace lmsgd::comm {

class RingAllreduce final : public AllreduceAlgorithm {
 public:
  explicit RingAllreduce(Transport* t) : t_(t) {}
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override;

 private:
  Transport* t_;
};

}  // namespace lmsgd::comm
