#include "worker/comm/algorithms.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lmsgd::comm {
namespace {

// Element offset of block i when `count` elements are cut into `blocks` near-equal blocks.
size_t BlockStart(size_t count, int blocks, int i) {
  const size_t base = count / blocks, extra = count % blocks;
  return base * i + std::min<size_t>(i, extra);
}

// dst += src, compiled for AVX-512, AVX2 and baseline x86-64; the loader picks the best.
__attribute__((target_clones("avx512f", "avx2", "default"))) void Add(float* __restrict dst,
                                                                       const float* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace

const char* AlgorithmName(Algorithm a) {
  switch (a) {
    case Algorithm::kAuto: return "auto";
    case Algorithm::kRing: return "ring";
    case Algorithm::kHalvingDoubling: return "halving_doubling";
    case Algorithm::kHierarchical: return "hierarchical";
  }
  return "?";
}

// Segment size for pipelining the ring's reduce-scatter (elements; at most 64 segments a step).
constexpr size_t kSegment = 256 * 1024;

absl::Status RingAllreduce::Run(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int k = t_->size(), r = t_->rank();
  if (k == 1 || count == 0) return absl::OkStatus();
  const int right = (r + 1) % k, left = (r + k - 1) % k;
  auto start = [&](int c) { return BlockStart(count, k, ((c % k) + k) % k); };
  auto chunk_len = [&](int c) {
    c = ((c % k) + k) % k;
    return (c + 1 == k ? count : BlockStart(count, k, c + 1)) - BlockStart(count, k, c);
  };
  const size_t max_chunk = count / k + 1;
  if (scratch_.size() < max_chunk) scratch_.resize(max_chunk);
  // Reduce-scatter: at step s send chunk r - s to the right, add chunk r - s - 1 from the left.
  // After k-1 steps rank r holds the full sum of chunk r + 1.
  for (int s = 0; s < k - 1; ++s) {
    const int send_c = r - s, recv_c = r - s - 1;
    const size_t sn = chunk_len(send_c), rn = chunk_len(recv_c);
    // Pipelined: the incoming chunk arrives in segments, each added as soon as it lands while
    // the rest is still in flight.
    std::vector<P2POp> ops;
    const size_t nseg = std::clamp<size_t>((rn + kSegment - 1) / kSegment, 1, 64);
    for (size_t j = 0; j < nseg; ++j) {
      const size_t a = rn * j / nseg, b = rn * (j + 1) / nseg;
      ops.push_back({P2POp::kRecv, left, scratch_.data() + a, (b - a) * sizeof(float),
                     MakeTag(seq, static_cast<uint32_t>(s * 64 + j))});
    }
    const size_t send_segs = std::clamp<size_t>((sn + kSegment - 1) / kSegment, 1, 64);
    for (size_t j = 0; j < send_segs; ++j) {
      const size_t a = sn * j / send_segs, b = sn * (j + 1) / send_segs;
      ops.push_back({P2POp::kSend, right, data + start(send_c) + a, (b - a) * sizeof(float),
                     MakeTag(seq, static_cast<uint32_t>(s * 64 + j))});
    }
    float* dst = data + start(recv_c);
    auto st = t_->Exchange(ops, deadline, "ring allreduce (reduce-scatter)", [&](size_t i) {
      const size_t a = rn * i / nseg, b = rn * (i + 1) / nseg;
      Add(dst + a, scratch_.data() + a, b - a);
    });
    if (!st.ok()) return st;
  }
  // Allgather: at step s send chunk r + 1 - s (reduced) to the right, receive chunk r - s.
  for (int s = 0; s < k - 1; ++s) {
    const int send_c = r + 1 - s, recv_c = r - s;
    if (auto st = t_->SendRecv(right, data + start(send_c), chunk_len(send_c) * sizeof(float), left,
                               data + start(recv_c), chunk_len(recv_c) * sizeof(float),
                               MakeTag(seq, static_cast<uint32_t>(64 * k + s)), deadline, "ring allreduce (allgather)");
        !st.ok()) {
      return st;
    }
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
  if (scratch_.size() < count) scratch_.resize(count);
  // 1. Reduce-scatter inside the block.
  int lo = 0, hi = P;
  uint32_t t = 0;
  for (int mask = s / 2; mask >= 1; mask /= 2, ++t) {
    const int partner = start_of[b] + (i ^ mask);
    const int mid = lo + (hi - lo) / 2;
    const bool keep_low = (i & mask) == 0;
    const int send_lo = keep_low ? mid : lo, send_hi = keep_low ? hi : mid;
    const int keep_lo = keep_low ? lo : mid, keep_hi = keep_low ? mid : hi;
    const size_t rn = off(keep_hi) - off(keep_lo);
    if (auto st = t_->SendRecv(partner, data + off(send_lo), (off(send_hi) - off(send_lo)) * sizeof(float), partner,
                               scratch_.data(), rn * sizeof(float), MakeTag(seq, 100 + t), deadline,
                               "halving/doubling allreduce (binary blocks: reduce-scatter)");
        !st.ok()) {
      return st;
    }
    Add(data + off(keep_lo), scratch_.data(), rn);
    lo = keep_lo;
    hi = keep_hi;
  }
  // 2. Hand partial sums up, smallest block first.
  for (int c = nb - 1; c >= 1; --c) {
    const int ratio = size_of[c - 1] / size_of[c];
    if (b == c) {  // send my region, split among `ratio` ranks of block c-1
      std::vector<P2POp> ops;
      for (int j = 0; j < ratio; ++j) {
        int plo, phi;
        region(size_of[c - 1], i * ratio + j, &plo, &phi);
        ops.push_back({P2POp::kSend, start_of[c - 1] + i * ratio + j, data + off(plo),
                       (off(phi) - off(plo)) * sizeof(float), MakeTag(seq, 200 + static_cast<uint32_t>(c))});
      }
      if (auto st = t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand up)", nullptr);
          !st.ok()) {
        return st;
      }
    } else if (b == c - 1) {  // receive my region's partial sums from block c
      const size_t rn = off(hi) - off(lo);
      if (auto st = t_->SendRecv(-1, nullptr, 0, start_of[c] + i / ratio, scratch_.data(), rn * sizeof(float),
                                 MakeTag(seq, 200 + static_cast<uint32_t>(c)), deadline,
                                 "halving/doubling allreduce (binary blocks: hand up)");
          !st.ok()) {
        return st;
      }
      Add(data + off(lo), scratch_.data(), rn);
    }
  }
  // 3./4. Block 0 allgathers; every smaller block first receives its regions from the block
  // above it, then allgathers.
  auto allgather = [&](uint32_t tag_base) -> absl::Status {
    int glo = lo, ghi = hi;
    uint32_t u = 0;
    for (int mask = 1; mask < s; mask *= 2, ++u) {
      const int partner = start_of[b] + (i ^ mask);
      const int width = ghi - glo;
      const bool low = (i & mask) == 0;
      const int other_lo = low ? ghi : glo - width, other_hi = low ? ghi + width : glo;
      if (auto st = t_->SendRecv(partner, data + off(glo), (off(ghi) - off(glo)) * sizeof(float), partner,
                                 data + off(other_lo), (off(other_hi) - off(other_lo)) * sizeof(float),
                                 MakeTag(seq, tag_base + u), deadline,
                                 "halving/doubling allreduce (binary blocks: allgather)");
          !st.ok()) {
        return st;
      }
      glo = std::min(glo, other_lo);
      ghi = std::max(ghi, other_hi);
    }
    return absl::OkStatus();
  };
  if (b == 0) {
    if (auto st = allgather(300); !st.ok()) return st;
  }
  for (int c = 1; c < nb; ++c) {
    const int ratio = size_of[c - 1] / size_of[c];
    if (b == c - 1) {  // send the full result for every region of block c that my part covers
      // Rank idx of block c owns the regions of block c-1 ranks idx*ratio .. idx*ratio+ratio-1; after
      // block c-1's allgather every rank there has everything, so each sends the piece it owned.
      int plo, phi;
      region(size_of[c - 1], i, &plo, &phi);
      if (auto st = t_->SendRecv(start_of[c] + i / ratio, data + off(plo), (off(phi) - off(plo)) * sizeof(float), -1,
                                 nullptr, 0, MakeTag(seq, 400 + static_cast<uint32_t>(c)), deadline,
                                 "halving/doubling allreduce (binary blocks: hand down)");
          !st.ok()) {
        return st;
      }
    } else if (b == c) {
      std::vector<P2POp> ops;
      for (int j = 0; j < ratio; ++j) {
        int plo, phi;
        region(size_of[c - 1], i * ratio + j, &plo, &phi);
        ops.push_back({P2POp::kRecv, start_of[c - 1] + i * ratio + j, data + off(plo),
                       (off(phi) - off(plo)) * sizeof(float), MakeTag(seq, 400 + static_cast<uint32_t>(c))});
      }
      if (auto st = t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand down)", nullptr);
          !st.ok()) {
        return st;
      }
      if (auto st = allgather(500); !st.ok()) return st;
    }
  }
  return absl::OkStatus();
}

// The leaders as a transport of their own: rank i = the i-th host's leader.
class HierarchicalAllreduce::LeaderView final : public Transport {
 public:
  LeaderView(Transport* t, std::vector<int> leaders, int index) : t_(t), leaders_(std::move(leaders)), index_(index) {}
  int rank() const override { return index_; }
  int size() const override { return static_cast<int>(leaders_.size()); }
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what,
                        const std::function<void(size_t)>& on_recv) override {
    std::vector<P2POp> mapped = ops;
    for (auto& op : mapped) op.peer = leaders_[op.peer];
    return t_->Exchange(mapped, deadline, what, on_recv);
  }
  void Abort() override { t_->Abort(); }

 private:
  Transport* t_;
  std::vector<int> leaders_;
  int index_;
};

absl::StatusOr<std::unique_ptr<HierarchicalAllreduce>> HierarchicalAllreduce::Create(
    Transport* t, const std::vector<std::string>& host_of_rank) {
  if (static_cast<int>(host_of_rank.size()) != t->size()) {
    return absl::InvalidArgumentError(absl::StrCat("host list has ", host_of_rank.size(), " entries for ", t->size(),
                                                   " ranks"));
  }
  auto h = std::unique_ptr<HierarchicalAllreduce>(new HierarchicalAllreduce());
  h->t_ = t;
  for (int r = 0; r < t->size(); ++r) {
    if (r == 0 || host_of_rank[r] != host_of_rank[r - 1]) {
      for (int l : h->leaders_) {
        if (host_of_rank[l] == host_of_rank[r]) {
          return absl::InvalidArgumentError(
              absl::StrCat("ranks of host '", host_of_rank[r], "' are not contiguous (rank ", r, ")"));
        }
      }
      h->leaders_.push_back(r);
    }
  }
  const int me = t->rank();
  int index = 0;
  for (size_t i = 0; i < h->leaders_.size(); ++i) {
    if (h->leaders_[i] <= me) index = static_cast<int>(i);
  }
  h->leader_ = h->leaders_[index];
  const int next = index + 1 < static_cast<int>(h->leaders_.size()) ? h->leaders_[index + 1] : t->size();
  h->local_size_ = next - h->leader_;
  h->leader_view_ = std::make_unique<LeaderView>(t, h->leaders_, index);
  h->leader_ring_ = std::make_unique<RingAllreduce>(h->leader_view_.get());
  return h;
}

absl::Status HierarchicalAllreduce::Run(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int me = t_->rank();
  if (t_->size() == 1 || count == 0) return absl::OkStatus();
  const size_t bytes = count * sizeof(float);
  // Phase 1: reduce inside the host to the leader, in local-rank order.
  if (me != leader_) {
    if (auto st = t_->SendRecv(leader_, data, bytes, -1, nullptr, 0, MakeTag(seq, 0), deadline,
                               "hierarchical allreduce (intra-host reduce)");
        !st.ok()) {
      return st;
    }
  } else {
    if (scratch_.size() < count) scratch_.resize(count);
    for (int l = 1; l < local_size_; ++l) {
      if (auto st = t_->SendRecv(-1, nullptr, 0, leader_ + l, scratch_.data(), bytes, MakeTag(seq, 0), deadline,
                                 "hierarchical allreduce (intra-host reduce)");
          !st.ok()) {
        return st;
      }
      Add(data, scratch_.data(), count);
    }
    // Phase 2: allreduce among the host leaders (its own tag space: sequence with a high bit).
    if (auto st = leader_ring_->Run(data, count, seq | (uint64_t{1} << 31), deadline); !st.ok()) return st;
  }
  // Phase 3: broadcast inside the host.
  if (me == leader_) {
    for (int l = 1; l < local_size_; ++l) {
      if (auto st = t_->SendRecv(leader_ + l, data, bytes, -1, nullptr, 0, MakeTag(seq, 1), deadline,
                                 "hierarchical allreduce (intra-host broadcast)");
          !st.ok()) {
        return st;
      }
    }
  } else {
    if (auto st = t_->SendRecv(-1, nullptr, 0, leader_, data, bytes, MakeTag(seq, 1), deadline,
                               "hierarchical allreduce (intra-host broadcast)");
        !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

absl::Status Broadcast(Transport* t, float* data, size_t count, int root, uint64_t seq, absl::Time deadline) {
  const int k = t->size();
  if (k == 1) return absl::OkStatus();
  const int v = (t->rank() - root + k) % k;  // virtual rank: root is 0
  // Binomial tree: in round with bit m, ranks v < m send to v + m.
  for (int m = 1; m < k; m *= 2) {
    if (v < m && v + m < k) {
      if (auto st = t->SendRecv((v + m + root) % k, data, count * sizeof(float), -1, nullptr, 0,
                                MakeTag(seq, static_cast<uint32_t>(m)), deadline, "broadcast");
          !st.ok()) {
        return st;
      }
    } else if (v >= m && v < 2 * m) {
      if (auto st = t->SendRecv(-1, nullptr, 0, (v - m + root) % k, data, count * sizeof(float),
                                MakeTag(seq, static_cast<uint32_t>(m)), deadline, "broadcast");
          !st.ok()) {
        return st;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Barrier(Transport* t, uint64_t seq, absl::Time deadline) {
  float one = 1.0f;
  RingAllreduce ring(t);
  auto st = ring.Run(&one, 1, seq, deadline);
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("barrier: ", st.message()));
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
