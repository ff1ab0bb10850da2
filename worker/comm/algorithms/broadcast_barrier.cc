#include "worker/comm/algorithms/broadcast_barrier.h"

#include "absl/strings/str_cat.h"
#include "worker/comm/algorithms/halving_doubling.h"
#include "worker/comm/algorithms/tags.h"
#include "common/status_macros.h"

namespace lmsgd::comm {

absl::Status Broadcast(Transport* t, float* data, size_t count, int root, uint64_t seq, absl::Time deadline) {
  const int k = t->size();
  if (k == 1) return absl::OkStatus();
  const int v = (t->rank() - root + k) % k;  // virtual rank: root is 0
  // Binomial tree: in round with bit m, ranks v < m send to v + m.
  for (int m = 1; m < k; m *= 2) {
    if (v < m && v + m < k) {
      RETURN_IF_ERROR(t->SendRecv((v + m + root) % k, data, count * sizeof(float), -1, nullptr, 0, MakeTag(seq, tags::BroadcastRound(m)), deadline, "broadcast"));
    } else if (v >= m && v < 2 * m) {
      RETURN_IF_ERROR(t->SendRecv(-1, nullptr, 0, (v - m + root) % k, data, count * sizeof(float), MakeTag(seq, tags::BroadcastRound(m)), deadline, "broadcast"));
    }
  }
  return absl::OkStatus();
}

absl::Status Barrier(Transport* t, uint64_t seq, absl::Time deadline) {
  // A one-element allreduce (no rank finishes before every rank has contributed) by recursive
  // doubling: log2 k steps (2 more when k is not a power of two) instead of the ring's 2(k-1).
  float one = 1.0f;
  HalvingDoublingAllreduce doubling(t);
  auto st = doubling.Run(&one, 1, seq, deadline);
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("barrier: ", st.message()));
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
