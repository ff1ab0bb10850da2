#include "worker/comm/algorithms/ring.h"

#include "worker/comm/algorithms/tags.h"
#include "common/status_macros.h"

namespace lmsgd::comm {

absl::Status RingAllreduce::Run(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int k = t_->size(), r = t_->rank();
  if (k == 1 || count == 0) return absl::OkStatus();
  const int right = (r + 1) % k, left = (r + k - 1) % k;
  auto start = [&](int c) { return BlockStart(count, k, ((c % k) + k) % k); };
  auto chunk_len = [&](int c) {
    c = ((c % k) + k) % k;
    return (c + 1 == k ? count : BlockStart(count, k, c + 1)) - BlockStart(count, k, c);
  };
  // Reduce-scatter: at step s send chunk r - s to the right, add chunk r - s - 1 from the left.
  // After k-1 steps rank r holds the full sum of chunk r + 1. Hints (transport.h): every chunk
  // sent here is overwritten in the allgather (kDiscard); the last step's sums are final.
  for (int s = 0; s < k - 1; ++s) {
    const int send_c = r - s, recv_c = r - s - 1;
    const size_t sn = chunk_len(send_c), rn = chunk_len(recv_c);
    // Pipelined: the incoming chunk arrives in segments, each added (by the transport, straight
    // out of its receive buffers where it can) while the rest is still in flight.
    const uint32_t step = tags::RingReduceScatter(s);
    std::vector<P2POp> ops;
    AppendSegmented({P2POp::kRecvAdd, left, data + start(recv_c), rn * sizeof(float), 0,
                     s == k - 2 ? P2POp::kFinal : P2POp::kNoHint},
                    seq, step, &ops);
    AppendSegmented({P2POp::kSend, right, data + start(send_c), sn * sizeof(float), 0, P2POp::kDiscard}, seq, step,
                    &ops);
    RETURN_IF_ERROR(t_->Exchange(ops, deadline, "ring allreduce (reduce-scatter)"));
  }
  // Allgather: at step s send chunk r + 1 - s (reduced) to the right, receive chunk r - s. What
  // is sent is final: summed in the reduce-scatter's last step, or received at the step before.
  for (int s = 0; s < k - 1; ++s) {
    const int send_c = r + 1 - s, recv_c = r - s;
    const uint64_t tag = MakeTag(seq, tags::RingAllgather(k, s));
    const std::vector<P2POp> ops = {
        {P2POp::kRecv, left, data + start(recv_c), chunk_len(recv_c) * sizeof(float), tag},
        {P2POp::kSend, right, data + start(send_c), chunk_len(send_c) * sizeof(float), tag, P2POp::kFinal}};
    RETURN_IF_ERROR(t_->Exchange(ops, deadline, "ring allreduce (allgather)"));
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
