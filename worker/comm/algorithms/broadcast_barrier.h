// Broadcast and barrier over a Transport.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

// Broadcast from `root` (binomial tree, log2 k steps) and barrier (a 1-element allreduce by
// recursive doubling).
absl::Status Broadcast(Transport* t, float* data, size_t count, int root, uint64_t sequence, absl::Time deadline);
absl::Status Barrier(Transport* t, uint64_t sequence, absl::Time deadline);

}  // namespace lmsgd::comm
