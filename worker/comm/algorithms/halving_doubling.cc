#include "worker/comm/algorithms/halving_doubling.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/comm/algorithms/tags.h"
#include "worker/comm/bf16_wire.h"
#include "worker/comm/reduce.h"
#include "common/status_macros.h"

namespace lmsgd::comm {

// Halving/doubling merges its middle steps up to this message size: one exchange instead of
// two while latency dominates, one more piece to add per rank (measured crossover:
// docs/benchmarks.md).
constexpr size_t kMergeMaxBytes = 64 << 10;

// Recursive doubling (see the class comment).
absl::Status HalvingDoublingAllreduce::RunDoubling(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int k = t_->size(), r = t_->rank();
  int p = 1;
  while (p * 2 <= k) p *= 2;
  const int rem = k - p;  // ranks 0..2 rem-1 fold in pairs: the even one hands its data to the odd one
  const size_t bytes = count * sizeof(float);
  if (scratch_.size() < count) scratch_.resize(count);
  if (r < 2 * rem && r % 2 == 0) {
    RETURN_IF_ERROR(t_->SendRecv(r + 1, data, bytes, -1, nullptr, 0, MakeTag(seq, tags::kDoublingFold), deadline, "halving/doubling allreduce (recursive doubling: fold)"));
    return t_->SendRecv(-1, nullptr, 0, r + 1, data, bytes, MakeTag(seq, tags::kDoublingHandBack), deadline,
                        "halving/doubling allreduce (recursive doubling: unfold)");
  }
  if (r < 2 * rem) {
    if (auto st = t_->Exchange({{P2POp::kRecvAdd, r - 1, data, bytes, MakeTag(seq, tags::kDoublingFold)}}, deadline,
                               "halving/doubling allreduce (recursive doubling: fold)");
        !st.ok()) {
      return st;
    }
  }
  // v: this rank among the p participants; real(w): participant w's rank.
  const int v = r < 2 * rem ? r / 2 : r - rem;
  auto real = [rem](int w) { return w < rem ? 2 * w + 1 : w + rem; };
  uint32_t step = 0;
  for (int mask = 1; mask < p; mask *= 2, ++step) {
    const int partner = real(v ^ mask);
    RETURN_IF_ERROR(t_->SendRecv(partner, data, bytes, partner, scratch_.data(), bytes, MakeTag(seq, tags::kDoublingStep + step), deadline, "halving/doubling allreduce (recursive doubling)"));
    AddFloats(data, scratch_.data(), count);
  }
  // Partners added the same two values to the same sum, which each rounds; the folded-in rank
  // receives it rounded.
  if (bf16_) RoundToBf16(data, count);
  if (r < 2 * rem) {
    return t_->SendRecv(r - 1, data, bytes, -1, nullptr, 0, MakeTag(seq, tags::kDoublingHandBack), deadline,
                        "halving/doubling allreduce (recursive doubling: unfold)");
  }
  return absl::OkStatus();
}

// Binary blocks (Gloo's scheme for non-powers of two). k is split into blocks of power-of-two
// sizes s_0 > s_1 > ... (its binary digits), ranks contiguous per block. The buffer is cut into
// P = s_0 pieces; in a block of size s, index i owns pieces [i P/s, (i+1) P/s).
//   1. Every block reduce-scatters inside itself (recursive halving).
//   2. From the smallest block up, block b hands its owned regions to block b-1 (each region is
//      P/s_b pieces = s_{b-1}/s_b regions of block b-1), which adds them: block 0 ends up owning
//      the sum over all ranks.
//   3. Block 0 allgathers (recursive doubling): its ranks hold the result.
//   4. From block 1 down, block b receives its regions from block b-1 and allgathers inside.
// For a power of two there is one block and this is plain recursive halving/doubling. No rank
// idles through the reduction (as pairing would make the extra ranks do).
absl::Status HalvingDoublingAllreduce::Run(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int k = t_->size(), r = t_->rank();
  if (k == 1 || count == 0) return absl::OkStatus();
  if (count * sizeof(float) <= doubling_max_bytes_) return RunDoubling(data, count, seq, deadline);
  std::vector<int> size_of, start_of;
  for (int bit = 30, start = 0; bit >= 0; --bit) {
    if (k & (1 << bit)) {
      size_of.push_back(1 << bit);
      start_of.push_back(start);
      start += 1 << bit;
    }
  }
  const int nb = static_cast<int>(size_of.size());
  int b = 0;
  while (b + 1 < nb && r >= start_of[b + 1]) ++b;
  const int s = size_of[b], i = r - start_of[b], P = size_of[0];
  auto off = [&](int piece) { return BlockStart(count, P, piece); };
  auto region = [&](int size, int idx, int* lo, int* hi) {
    *lo = idx * (P / size);
    *hi = (idx + 1) * (P / size);
  };
  // 1. Reduce-scatter inside the block. For a power of two (one block) the last halving step
  //    and the first allgather step pair the same ranks and move one piece each way each:
  //    merged into one exchange of the two-piece range, which both partners then sum (the same
  //    two values, so the same bits), the vector costs 2 log2(p) - 1 steps, no more bytes, but
  //    one more piece to add: worth it while latency dominates (kMergeMaxBytes; at
  //    k = 2 the merged form is recursive doubling, which doubling_max_bytes_ governs).
  const bool merge = nb == 1 && s >= 4 && count * sizeof(float) <= kMergeMaxBytes;
  int lo = 0, hi = P;
  uint32_t t = 0;
  for (int mask = s / 2; mask >= (merge ? 2 : 1); mask /= 2, ++t) {
    const int partner = start_of[b] + (i ^ mask);
    const int mid = lo + (hi - lo) / 2;
    const bool keep_low = (i & mask) == 0;
    const int send_lo = keep_low ? mid : lo, send_hi = keep_low ? hi : mid;
    const int keep_lo = keep_low ? lo : mid, keep_hi = keep_low ? mid : hi;
    const size_t rn = off(keep_hi) - off(keep_lo);
    // The half received is added into the half kept (the transport adds as it arrives); the
    // half sent is another range, overwritten by the allgather (kDiscard). The last step of a
    // single block without the merged middle completes the sums of the range kept (kFinal).
    const bool final_sums = nb == 1 && !merge && mask == 1;
    // Both halves in segments, as the ring's reduce-scatter: each received segment is added
    // while the next is in flight.
    std::vector<P2POp> ops;
    AppendSegmented({P2POp::kRecvAdd, partner, data + off(keep_lo), rn * sizeof(float), 0,
                     final_sums ? P2POp::kFinal : P2POp::kNoHint},
                    seq, tags::HalvingStep(t), &ops);
    AppendSegmented({P2POp::kSend, partner, data + off(send_lo), (off(send_hi) - off(send_lo)) * sizeof(float), 0,
                     P2POp::kDiscard},
                    seq, tags::HalvingStep(t), &ops);
    RETURN_IF_ERROR(t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: reduce-scatter)"));
    lo = keep_lo;
    hi = keep_hi;
  }
  if (merge) {
    // Sends the very range it adds into: received into scratch, added once the send is done.
    const int partner = start_of[b] + (i ^ 1);
    const size_t rn = off(hi) - off(lo);
    if (scratch_.size() < rn) scratch_.resize(rn);
    RETURN_IF_ERROR(t_->SendRecv(partner, data + off(lo), rn * sizeof(float), partner, scratch_.data(), rn * sizeof(float), MakeTag(seq, tags::kMergedMiddle), deadline, "halving/doubling allreduce (middle exchange)"));
    AddFloats(data + off(lo), scratch_.data(), rn);
    if (bf16_) RoundToBf16(data + off(lo), rn);  // both partners, the same sums
  }
  // 2. Hand partial sums up, smallest block first.
  for (int c = nb - 1; c >= 1; --c) {
    const int ratio = size_of[c - 1] / size_of[c];
    if (b == c) {  // send my region, split among `ratio` ranks of block c-1
      std::vector<P2POp> ops;
      for (int j = 0; j < ratio; ++j) {
        int plo, phi;
        region(size_of[c - 1], i * ratio + j, &plo, &phi);
        // Overwritten by the hand-down.
        ops.push_back({P2POp::kSend, start_of[c - 1] + i * ratio + j, data + off(plo),
                       (off(phi) - off(plo)) * sizeof(float), MakeTag(seq, tags::kHandUp + static_cast<uint32_t>(c)),
                       P2POp::kDiscard});
      }
      RETURN_IF_ERROR(t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand up)"));
    } else if (b == c - 1) {  // receive my region's partial sums from block c
      const size_t rn = off(hi) - off(lo);
      // Block 0's last addition (c = 1) completes its sums.
      const std::vector<P2POp> ops = {{P2POp::kRecvAdd, start_of[c] + i / ratio, data + off(lo), rn * sizeof(float),
                                       MakeTag(seq, tags::kHandUp + static_cast<uint32_t>(c)),
                                       c == 1 ? P2POp::kFinal : P2POp::kNoHint}};
      RETURN_IF_ERROR(t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand up)"));
    }
  }
  // 3./4. Block 0 allgathers; every smaller block first receives its regions from the block
  // above it, then allgathers.
  auto allgather = [&](uint32_t tag_base) -> absl::Status {
    int glo = lo, ghi = hi;
    uint32_t u = 0;
    for (int mask = merge ? 2 : 1; mask < s; mask *= 2, ++u) {
      const int partner = start_of[b] + (i ^ mask);
      const int width = ghi - glo;
      const bool low = (i & mask) == 0;
      const int other_lo = low ? ghi : glo - width, other_hi = low ? ghi + width : glo;
      // What is sent is final: summed and rounded above, or received exact.
      const uint64_t tag = MakeTag(seq, tag_base + u);
      RETURN_IF_ERROR(t_->Exchange(
          {{P2POp::kRecv, partner, data + off(other_lo), (off(other_hi) - off(other_lo)) * sizeof(float), tag},
           {P2POp::kSend, partner, data + off(glo), (off(ghi) - off(glo)) * sizeof(float), tag, P2POp::kFinal}},
          deadline, "halving/doubling allreduce (binary blocks: allgather)"));
      glo = std::min(glo, other_lo);
      ghi = std::max(ghi, other_hi);
    }
    return absl::OkStatus();
  };
  if (b == 0) {
    RETURN_IF_ERROR(allgather(tags::kBlockZeroAllgather));
  }
  for (int c = 1; c < nb; ++c) {
    const int ratio = size_of[c - 1] / size_of[c];
    if (b == c - 1) {  // send the full result for every region of block c that my part covers
      // Rank idx of block c owns the regions of block c-1 ranks idx*ratio .. idx*ratio+ratio-1; after
      // block c-1's allgather every rank there has everything, so each sends the piece it owned.
      int plo, phi;
      region(size_of[c - 1], i, &plo, &phi);
      RETURN_IF_ERROR(t_->Exchange({{P2POp::kSend, start_of[c] + i / ratio, data + off(plo),
                                     (off(phi) - off(plo)) * sizeof(float),
                                     MakeTag(seq, tags::kHandDown + static_cast<uint32_t>(c)), P2POp::kFinal}},
                                   deadline, "halving/doubling allreduce (binary blocks: hand down)"));
    } else if (b == c) {
      std::vector<P2POp> ops;
      for (int j = 0; j < ratio; ++j) {
        int plo, phi;
        region(size_of[c - 1], i * ratio + j, &plo, &phi);
        ops.push_back({P2POp::kRecv, start_of[c - 1] + i * ratio + j, data + off(plo),
                       (off(phi) - off(plo)) * sizeof(float), MakeTag(seq, tags::kHandDown + static_cast<uint32_t>(c))});
      }
      RETURN_IF_ERROR(t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand down)"));
      RETURN_IF_ERROR(allgather(tags::kBlockAllgather));
    }
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
