#include "worker/comm/algorithms.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/comm/reduce.h"

namespace lmsgd::comm {
namespace {

// Element offset of block i when `count` elements are cut into `blocks` near-equal blocks.
size_t BlockStart(size_t count, int blocks, int i) {
  const size_t base = count / blocks, extra = count % blocks;
  return base * i + std::min<size_t>(i, extra);
}

}  // namespace

const char* AlgorithmName(Algorithm a) {
  switch (a) {
    case Algorithm::kAuto: return "auto";
    case Algorithm::kRing: return "ring";
    case Algorithm::kHalvingDoubling: return "halving_doubling";
    case Algorithm::kHierarchical: return "hierarchical";
    case Algorithm::kSharedMemory: return "shared_memory";
  }
  return "?";
}

// Halving/doubling merges its middle steps up to this message size: at k = 4 on this project's
// machine it took 64 KiB from 1.05-1.12x to 1.18-1.36x ring's speed, and cost 10-20% from 1 MiB.
constexpr size_t kMergeMaxBytes = 64 << 10;

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
  // Reduce-scatter: at step s send chunk r - s to the right, add chunk r - s - 1 from the left.
  // After k-1 steps rank r holds the full sum of chunk r + 1.
  for (int s = 0; s < k - 1; ++s) {
    const int send_c = r - s, recv_c = r - s - 1;
    const size_t sn = chunk_len(send_c), rn = chunk_len(recv_c);
    // Pipelined: the incoming chunk arrives in segments, each added (by the transport, straight
    // out of its receive buffers where it can) while the rest is still in flight.
    float* dst = data + start(recv_c);
    std::vector<P2POp> ops;
    const size_t nseg = std::clamp<size_t>((rn + kSegment - 1) / kSegment, 1, 64);
    for (size_t j = 0; j < nseg; ++j) {
      const size_t a = rn * j / nseg, b = rn * (j + 1) / nseg;
      ops.push_back({P2POp::kRecvAdd, left, dst + a, (b - a) * sizeof(float),
                     MakeTag(seq, static_cast<uint32_t>(s * 64 + j))});
    }
    const size_t send_segs = std::clamp<size_t>((sn + kSegment - 1) / kSegment, 1, 64);
    for (size_t j = 0; j < send_segs; ++j) {
      const size_t a = sn * j / send_segs, b = sn * (j + 1) / send_segs;
      ops.push_back({P2POp::kSend, right, data + start(send_c) + a, (b - a) * sizeof(float),
                     MakeTag(seq, static_cast<uint32_t>(s * 64 + j))});
    }
    if (auto st = t_->Exchange(ops, deadline, "ring allreduce (reduce-scatter)"); !st.ok()) return st;
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

// Recursive doubling (see the class comment).
absl::Status HalvingDoublingAllreduce::RunDoubling(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int k = t_->size(), r = t_->rank();
  int p = 1;
  while (p * 2 <= k) p *= 2;
  const int rem = k - p;  // ranks 0..2 rem-1 fold in pairs: the even one hands its data to the odd one
  const size_t bytes = count * sizeof(float);
  if (scratch_.size() < count) scratch_.resize(count);
  if (r < 2 * rem && r % 2 == 0) {
    if (auto st = t_->SendRecv(r + 1, data, bytes, -1, nullptr, 0, MakeTag(seq, 600), deadline,
                               "halving/doubling allreduce (recursive doubling: fold)");
        !st.ok()) {
      return st;
    }
    return t_->SendRecv(-1, nullptr, 0, r + 1, data, bytes, MakeTag(seq, 700), deadline,
                        "halving/doubling allreduce (recursive doubling: unfold)");
  }
  if (r < 2 * rem) {
    if (auto st = t_->Exchange({{P2POp::kRecvAdd, r - 1, data, bytes, MakeTag(seq, 600)}}, deadline,
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
    if (auto st = t_->SendRecv(partner, data, bytes, partner, scratch_.data(), bytes, MakeTag(seq, 610 + step),
                               deadline, "halving/doubling allreduce (recursive doubling)");
        !st.ok()) {
      return st;
    }
    AddFloats(data, scratch_.data(), count);
  }
  if (r < 2 * rem) {
    return t_->SendRecv(r - 1, data, bytes, -1, nullptr, 0, MakeTag(seq, 700), deadline,
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
  //    one more piece to add: worth it while latency dominates (kMergeMaxBytes, measured; at
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
    // half sent is another range.
    const std::vector<P2POp> ops = {
        {P2POp::kRecvAdd, partner, data + off(keep_lo), rn * sizeof(float), MakeTag(seq, 100 + t)},
        {P2POp::kSend, partner, data + off(send_lo), (off(send_hi) - off(send_lo)) * sizeof(float),
         MakeTag(seq, 100 + t)}};
    if (auto st = t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: reduce-scatter)");
        !st.ok()) {
      return st;
    }
    lo = keep_lo;
    hi = keep_hi;
  }
  if (merge) {
    // Sends the very range it adds into: received into scratch, added once the send is done.
    const int partner = start_of[b] + (i ^ 1);
    const size_t rn = off(hi) - off(lo);
    if (scratch_.size() < rn) scratch_.resize(rn);
    if (auto st = t_->SendRecv(partner, data + off(lo), rn * sizeof(float), partner, scratch_.data(),
                               rn * sizeof(float), MakeTag(seq, 150), deadline,
                               "halving/doubling allreduce (middle exchange)");
        !st.ok()) {
      return st;
    }
    AddFloats(data + off(lo), scratch_.data(), rn);
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
      if (auto st = t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand up)");
          !st.ok()) {
        return st;
      }
    } else if (b == c - 1) {  // receive my region's partial sums from block c
      const size_t rn = off(hi) - off(lo);
      const std::vector<P2POp> ops = {{P2POp::kRecvAdd, start_of[c] + i / ratio, data + off(lo), rn * sizeof(float),
                                       MakeTag(seq, 200 + static_cast<uint32_t>(c))}};
      if (auto st = t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand up)");
          !st.ok()) {
        return st;
      }
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
      if (auto st = t_->Exchange(ops, deadline, "halving/doubling allreduce (binary blocks: hand down)");
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
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) override {
    std::vector<P2POp> mapped = ops;
    for (auto& op : mapped) op.peer = leaders_[op.peer];
    return t_->Exchange(mapped, deadline, what);
  }
  void Abort() override { t_->Abort(); }

 private:
  Transport* t_;
  std::vector<int> leaders_;
  int index_;
};

absl::StatusOr<std::unique_ptr<HierarchicalAllreduce>> HierarchicalAllreduce::Create(
    Transport* t, const std::vector<std::string>& host_of_rank, absl::Time deadline,
    size_t halving_doubling_max_bytes, size_t doubling_max_bytes) {
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
  h->leader_halving_doubling_ = std::make_unique<HalvingDoublingAllreduce>(h->leader_view_.get(), doubling_max_bytes);
  h->halving_doubling_max_bytes_ = halving_doubling_max_bytes;
  // Several hosts with several ranks on this one: the intra-host phases go through shared memory
  // when this host's ranks can map it (decided by them alone; other hosts decide for themselves).
  if (h->leaders_.size() > 1 && h->local_size_ > 1) {
    std::vector<int> locals;
    for (int l = 0; l < h->local_size_; ++l) locals.push_back(h->leader_ + l);
    h->local_view_ = std::make_unique<LeaderView>(t, locals, me - h->leader_);
    auto shm = SharedMemoryAllreduce::Create(h->local_view_.get(), kLocalShmSetupSequence, deadline);
    if (shm.ok()) {
      h->local_shm_ = std::move(*shm);
    } else if (shm.status().code() != absl::StatusCode::kFailedPrecondition) {
      return shm.status();
    }
  }
  return h;
}

void HierarchicalAllreduce::Abort() {
  if (local_shm_) local_shm_->Abort();
}

// Phase 2 (on the leaders only), in its own tag space: the collective's sequence with a high bit.
absl::Status HierarchicalAllreduce::RunAmongLeaders(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const uint64_t leader_seq = seq | (uint64_t{1} << 31);
  if (InterHostAlgorithm(count * sizeof(float)) == Algorithm::kHalvingDoubling) {
    return leader_halving_doubling_->Run(data, count, leader_seq, deadline);
  }
  return leader_ring_->Run(data, count, leader_seq, deadline);
}

absl::Status HierarchicalAllreduce::Run(float* data, size_t count, uint64_t seq, absl::Time deadline) {
  const int me = t_->rank();
  if (t_->size() == 1 || count == 0) return absl::OkStatus();
  const size_t bytes = count * sizeof(float);
  if (local_shm_) {
    // 1. Every rank of the host gets the host's sum (shared memory); 2. the leaders allreduce
    // it over the transport; 3. the leader's result reaches the others as a shared-memory
    // allreduce in which they contribute zeros (x + 0 = x: the result is the leader's, bitwise).
    RETURN_IF_ERROR(Annotate(local_shm_->Run(data, count, seq, deadline), "hierarchical allreduce (intra-host reduce)"));
    if (me == leader_) RETURN_IF_ERROR(RunAmongLeaders(data, count, seq, deadline));
    if (me != leader_) std::memset(data, 0, bytes);
    return Annotate(local_shm_->Run(data, count, seq, deadline), "hierarchical allreduce (intra-host broadcast)");
  }
  // Phase 1: reduce inside the host to the leader, in local-rank order.
  if (me != leader_) {
    if (auto st = t_->SendRecv(leader_, data, bytes, -1, nullptr, 0, MakeTag(seq, 0), deadline,
                               "hierarchical allreduce (intra-host reduce)");
        !st.ok()) {
      return st;
    }
  } else {
    for (int l = 1; l < local_size_; ++l) {  // one at a time: the sum in rank order
      if (auto st = t_->Exchange({{P2POp::kRecvAdd, leader_ + l, data, bytes, MakeTag(seq, 0)}}, deadline,
                                 "hierarchical allreduce (intra-host reduce)");
          !st.ok()) {
        return st;
      }
    }
    // Phase 2: allreduce among the host leaders.
    if (auto st = RunAmongLeaders(data, count, seq, deadline); !st.ok()) return st;
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
  // A one-element allreduce (no rank finishes before every rank has contributed) by recursive
  // doubling: log2 k steps (2 more when k is not a power of two) instead of the ring's 2(k-1).
  float one = 1.0f;
  HalvingDoublingAllreduce doubling(t);
  auto st = doubling.Run(&one, 1, seq, deadline);
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("barrier: ", st.message()));
  return absl::OkStatus();
}

// ---- shared memory ------------------------------------------------------------------------

namespace {
constexpr int kShmMaxRanks = 64;
constexpr uint64_t kShmMagic = 0x6c6d7367642d7368ull;  // "lmsgd-sh"
struct alignas(64) ShmCounter {
  std::atomic<uint64_t> v;
  char pad[64 - sizeof(std::atomic<uint64_t>)];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "cross-process atomics must be lock-free");
const char* const kShmPhase[3] = {"publish its input", "reduce its slice", "copy the result out"};
}  // namespace

// flags[phase][rank] = the last chunk step rank has completed that phase for; pid / pid_ns:
// each rank's process id and pid namespace (to tell a peer that died from a slow one).
struct SharedMemoryAllreduce::Header {
  uint64_t magic;
  uint32_t size;
  uint32_t chunk;
  char pad[48];
  ShmCounter flags[3][kShmMaxRanks];
  int32_t pid[kShmMaxRanks];
  uint64_t pid_ns[kShmMaxRanks];
};

namespace {
uint64_t PidNamespace() {
  struct stat sb {};
  return stat("/proc/self/ns/pid", &sb) == 0 ? static_cast<uint64_t>(sb.st_ino) : 0;
}

// Whether process `pid` (in our pid namespace) has exited: gone, or a zombie not yet reaped.
bool ProcessExited(int pid) {
  if (kill(pid, 0) != 0) return errno == ESRCH;
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  const int fd = open(path, O_RDONLY);
  if (fd < 0) return false;
  char buf[256];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return false;
  buf[n] = 0;
  const char* paren = strrchr(buf, ')');  // "pid (comm) S ...": the state follows the last ')'
  return paren != nullptr && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}
}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemoryAllreduce>> SharedMemoryAllreduce::Create(Transport* t,
                                                                                     uint64_t tag_sequence,
                                                                                     absl::Time deadline,
                                                                                     size_t chunk_floats) {
  const int k = t->size(), r = t->rank();
  if (k > kShmMaxRanks) {
    return absl::FailedPreconditionError(absl::StrCat("shared-memory allreduce supports up to ", kShmMaxRanks,
                                                      " ranks on a host, not ", k));
  }
  auto a = std::unique_ptr<SharedMemoryAllreduce>(new SharedMemoryAllreduce());
  a->rank_ = r;
  a->size_ = k;
  if (chunk_floats == 0) {
    // Both slots of k inputs and a result within ~8 MiB (cache-resident), at most 1 MiB a rank.
    chunk_floats = std::min<size_t>(256 * 1024, (size_t{8} << 20) / (2 * static_cast<size_t>(k + 1) * sizeof(float)));
    chunk_floats = std::max<size_t>(16, chunk_floats / 16 * 16);
  }
  a->chunk_ = chunk_floats;
  const size_t header_bytes = (sizeof(Header) + 4095) / 4096 * 4096;
  a->bytes_ = header_bytes + 2 * static_cast<size_t>(k + 1) * chunk_floats * sizeof(float);
  char name[64] = {0};
  std::string error;
  // 1. Rank 0 creates the segment; its name (empty on failure) goes to every rank.
  if (r == 0) {
    std::random_device rd;
    snprintf(name, sizeof(name), "/lmsgd-allreduce-%d-%08x%08x", static_cast<int>(getpid()), rd(), rd());
    // The space is reserved up front (posix_fallocate): a full /dev/shm (containers default to
    // 64 MiB) is then this error, and the transport algorithms, not a SIGBUS at first touch.
    const int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    int err = fd < 0 ? errno : 0;
    if (fd >= 0 && ftruncate(fd, static_cast<off_t>(a->bytes_)) != 0) err = errno;
    if (fd >= 0 && err == 0) err = posix_fallocate(fd, 0, static_cast<off_t>(a->bytes_));
    if (err != 0) {
      error = absl::StrCat("creating shared memory ", name, " of ", a->bytes_, " bytes: ", strerror(err));
      if (fd >= 0) {
        close(fd);
        shm_unlink(name);
      }
      name[0] = 0;
    } else {
      void* p = mmap(nullptr, a->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      close(fd);
      if (p == MAP_FAILED) {
        error = absl::StrCat("mapping shared memory ", name, ": ", strerror(errno));
        shm_unlink(name);
        name[0] = 0;
      } else {
        a->base_ = p;
        Header* h = new (p) Header();
        h->magic = kShmMagic;
        h->size = static_cast<uint32_t>(k);
        h->chunk = static_cast<uint32_t>(chunk_floats);
        for (auto& phase : h->flags) {
          for (auto& c : phase) c.v.store(0, std::memory_order_relaxed);
        }
      }
    }
    std::vector<P2POp> ops;
    for (int q = 1; q < k; ++q) ops.push_back({P2POp::kSend, q, name, sizeof(name), MakeTag(tag_sequence, 1)});
    if (auto st = t->Exchange(ops, deadline, "shared-memory allreduce setup (segment name)"); !st.ok()) {
      if (name[0]) shm_unlink(name);
      return st;
    }
  } else {
    if (auto st = t->SendRecv(-1, nullptr, 0, 0, name, sizeof(name), MakeTag(tag_sequence, 1), deadline,
                              "shared-memory allreduce setup (segment name)");
        !st.ok()) {
      return st;
    }
    name[sizeof(name) - 1] = 0;
    if (name[0] == 0) {
      error = "rank 0 could not create the shared-memory segment";
    } else {
      const int fd = shm_open(name, O_RDWR, 0600);
      struct stat sb {};
      if (fd < 0 || fstat(fd, &sb) != 0 || static_cast<size_t>(sb.st_size) != a->bytes_) {
        error = absl::StrCat("opening shared memory ", name, ": ", fd < 0 ? strerror(errno) : "unexpected size");
      } else {
        void* p = mmap(nullptr, a->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
          error = absl::StrCat("mapping shared memory ", name, ": ", strerror(errno));
        } else {
          a->base_ = p;
        }
      }
      if (fd >= 0) close(fd);
    }
  }
  if (a->base_ != nullptr) {
    Header* h = static_cast<Header*>(a->base_);
    h->pid[r] = static_cast<int32_t>(getpid());
    h->pid_ns[r] = PidNamespace();
  }
  // 2. Everyone reports to rank 0, which unlinks the name and tells all whether every rank
  //    mapped it, so the outcome is the same on every rank.
  uint8_t ok = error.empty() ? 1 : 0;
  if (r == 0) {
    std::vector<uint8_t> oks(k, 1);
    std::vector<P2POp> ops;
    for (int q = 1; q < k; ++q) ops.push_back({P2POp::kRecv, q, &oks[q], 1, MakeTag(tag_sequence, 2)});
    absl::Status st = t->Exchange(ops, deadline, "shared-memory allreduce setup (status)");
    if (name[0]) shm_unlink(name);
    if (!st.ok()) return st;
    for (int q = 1; q < k; ++q) ok = ok && oks[q];
    ops.clear();
    for (int q = 1; q < k; ++q) ops.push_back({P2POp::kSend, q, &ok, 1, MakeTag(tag_sequence, 3)});
    RETURN_IF_ERROR(t->Exchange(ops, deadline, "shared-memory allreduce setup (verdict)"));
  } else {
    RETURN_IF_ERROR(t->SendRecv(0, &ok, 1, -1, nullptr, 0, MakeTag(tag_sequence, 2), deadline,
                                "shared-memory allreduce setup (status)"));
    RETURN_IF_ERROR(t->SendRecv(-1, nullptr, 0, 0, &ok, 1, MakeTag(tag_sequence, 3), deadline,
                                "shared-memory allreduce setup (verdict)"));
  }
  if (!ok) {
    return absl::FailedPreconditionError(
        absl::StrCat("shared memory unavailable", error.empty() ? " on another rank" : ": " + error));
  }
  a->header_ = static_cast<Header*>(a->base_);
  if (a->header_->magic != kShmMagic || a->header_->size != static_cast<uint32_t>(k)) {
    return absl::InternalError("shared-memory allreduce: segment header mismatch");
  }
  a->slots_ = reinterpret_cast<float*>(static_cast<char*>(a->base_) + header_bytes);
  a->my_pid_ns_ = PidNamespace();
  return a;
}

SharedMemoryAllreduce::~SharedMemoryAllreduce() {
  if (base_ != nullptr) munmap(base_, bytes_);
}

void SharedMemoryAllreduce::Abort() { aborted_.store(true); }

// Waits until rank q has completed `phase` for chunk `step`: spin briefly, then yield (ranks
// may outnumber cores), then sleep in short naps, checking the deadline and Abort().
absl::Status SharedMemoryAllreduce::WaitOne(int phase, int q, uint64_t step, absl::Time deadline) {
  const std::atomic<uint64_t>& f = header_->flags[phase][q].v;
  for (uint64_t spins = 0; f.load(std::memory_order_acquire) < step; ++spins) {
    if (spins < 64) {
      __builtin_ia32_pause();
      continue;
    }
    if ((spins & 63) == 0) {
      if (aborted_.load(std::memory_order_relaxed)) return absl::AbortedError("shared-memory allreduce aborted");
      // A peer in our pid namespace that has exited will never come: fail now, not at the deadline.
      if ((spins & 4095) == 0 && header_->pid_ns[q] == my_pid_ns_ && my_pid_ns_ != 0 &&
          ProcessExited(header_->pid[q])) {
        return absl::UnavailableError(absl::StrFormat(
            "shared-memory allreduce: rank %d (pid %d) exited while this rank waited for it to %s (chunk %d)", q,
            header_->pid[q], kShmPhase[phase], step));
      }
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrFormat(
            "shared-memory allreduce: timed out waiting for rank %d to %s (chunk %d)", q, kShmPhase[phase], step));
      }
    }
    if (spins < 20000) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryAllreduce::WaitAll(int phase, uint64_t step, absl::Time deadline) {
  for (int q = 0; q < size_; ++q) {
    if (q != rank_) RETURN_IF_ERROR(WaitOne(phase, q, step, deadline));
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryAllreduce::Run(float* data, size_t count, uint64_t /*sequence*/, absl::Time deadline) {
  const int k = size_, r = rank_;
  if (k == 1 || count == 0) return absl::OkStatus();
  if (aborted_.load()) return absl::AbortedError("shared-memory allreduce aborted");
  constexpr size_t kLine = 16;  // floats per cache line: slices start on line boundaries
  for (size_t off = 0; off < count; off += chunk_) {
    const size_t n = std::min(chunk_, count - off);
    const uint64_t step = ++step_;
    float* in = slots_ + (step & 1) * static_cast<size_t>(k + 1) * chunk_;
    float* out = in + static_cast<size_t>(k) * chunk_;
    float* mine = data + off;
    const size_t lines = (n + kLine - 1) / kLine;
    auto slice = [&](int q, size_t* lo, size_t* hi) {
      *lo = std::min(n, BlockStart(lines, k, q) * kLine);
      *hi = std::min(n, BlockStart(lines, k, q + 1) * kLine);
    };
    size_t lo = 0, hi = 0;
    slice(r, &lo, &hi);
    // A. Publish the parts of this chunk the other ranks reduce (not this rank's own slice,
    //    which it reads from its buffer). The slot was last used two chunks ago: every rank
    //    must have copied that result out first.
    if (step > 2) RETURN_IF_ERROR(WaitAll(2, step - 2, deadline));
    float* my_in = in + static_cast<size_t>(r) * chunk_;
    std::memcpy(my_in, mine, lo * sizeof(float));
    std::memcpy(my_in + hi, mine + hi, (n - hi) * sizeof(float));
    header_->flags[0][r].v.store(step, std::memory_order_release);
    RETURN_IF_ERROR(WaitAll(0, step, deadline));
    // B. This rank's slice summed in rank order (each element by one rank: identical results
    //    everywhere), into its buffer and into the result area for the others.
    // In tiles that stay in L1 while the k inputs are added into them.
    constexpr size_t kTile = 2048;
    for (size_t t = lo; t < hi; t += kTile) {
      const size_t len = std::min(kTile, hi - t);
      float* acc = out + t;
      std::memcpy(acc, r == 0 ? mine + t : in + t, len * sizeof(float));
      for (int q = 1; q < k; ++q) AddFloats(acc, q == r ? mine + t : in + static_cast<size_t>(q) * chunk_ + t, len);
      std::memcpy(mine + t, acc, len * sizeof(float));
    }
    header_->flags[1][r].v.store(step, std::memory_order_release);
    // C. The other ranks' slices, each as soon as it is ready.
    for (int q = 0; q < k; ++q) {
      if (q == r) continue;
      RETURN_IF_ERROR(WaitOne(1, q, step, deadline));
      size_t qlo = 0, qhi = 0;
      slice(q, &qlo, &qhi);
      std::memcpy(mine + qlo, out + qlo, (qhi - qlo) * sizeof(float));
    }
    header_->flags[2][r].v.store(step, std::memory_order_release);
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
