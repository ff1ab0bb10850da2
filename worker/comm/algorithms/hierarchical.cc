#include "worker/comm/algorithms/hierarchical.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/comm/algorithms/tags.h"
#include "worker/comm/bf16_wire.h"

namespace lmsgd::comm {

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
  h->bf16_ = std::make_unique<Bf16WireTransport>(t);
  h->bf16_leader_view_ = std::make_unique<Bf16WireTransport>(h->leader_view_.get());
  h->bf16_leader_ring_ = std::make_unique<RingAllreduce>(h->bf16_leader_view_.get());
  h->bf16_leader_halving_doubling_ =
      std::make_unique<HalvingDoublingAllreduce>(h->bf16_leader_view_.get(), doubling_max_bytes, WireDtype::kBf16);
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
absl::Status HierarchicalAllreduce::RunAmongLeaders(float* data, size_t count, uint64_t seq, absl::Time deadline,
                                                    WireDtype wire) {
  const uint64_t leader_seq = seq | tags::kLeaderSequenceBit;
  if (wire == WireDtype::kFp32) {
    if (InterHostAlgorithm(count * sizeof(float)) == Algorithm::kHalvingDoubling) {
      return leader_halving_doubling_->Run(data, count, leader_seq, deadline);
    }
    return leader_ring_->Run(data, count, leader_seq, deadline);
  }
  // Both end with every leader holding the same bf16-rounded sum, as the hosts' ranks get it.
  if (InterHostAlgorithm(count * sizeof(uint16_t)) == Algorithm::kHalvingDoubling) {
    return bf16_leader_halving_doubling_->Run(data, count, leader_seq, deadline);
  }
  return bf16_leader_ring_->Run(data, count, leader_seq, deadline);
}

absl::Status HierarchicalAllreduce::Run(float* data, size_t count, uint64_t seq, absl::Time deadline,
                                        WireDtype wire) {
  Transport* const t = wire == WireDtype::kBf16 ? bf16_.get() : t_;
  const int me = t_->rank();
  if (t_->size() == 1 || count == 0) return absl::OkStatus();
  const size_t bytes = count * sizeof(float);
  if (local_shm_) {
    // 1. Every rank of the host gets the host's sum (shared memory); 2. the leaders allreduce
    // it over the transport; 3. the leader's result reaches the others as a shared-memory
    // allreduce in which they contribute zeros (x + 0 = x: the result is the leader's, bitwise).
    RETURN_IF_ERROR(Annotate(local_shm_->Run(data, count, seq, deadline, wire), "hierarchical allreduce (intra-host reduce)"));
    if (me == leader_) RETURN_IF_ERROR(RunAmongLeaders(data, count, seq, deadline, wire));
    if (me != leader_) std::memset(data, 0, bytes);
    return Annotate(local_shm_->Run(data, count, seq, deadline, wire), "hierarchical allreduce (intra-host broadcast)");
  }
  // Phase 1: reduce inside the host to the leader, in local-rank order.
  if (me != leader_) {
    RETURN_IF_ERROR(t->SendRecv(leader_, data, bytes, -1, nullptr, 0, MakeTag(seq, tags::kToLeader), deadline, "hierarchical allreduce (intra-host reduce)"));
  } else {
    for (int l = 1; l < local_size_; ++l) {  // one at a time: the sum in rank order
      if (auto st = t->Exchange({{P2POp::kRecvAdd, leader_ + l, data, bytes, MakeTag(seq, tags::kToLeader)}}, deadline,
                                 "hierarchical allreduce (intra-host reduce)");
          !st.ok()) {
        return st;
      }
    }
    // Phase 2: allreduce among the host leaders.
    RETURN_IF_ERROR(RunAmongLeaders(data, count, seq, deadline, wire));
  }
  // Phase 3: broadcast inside the host.
  if (me == leader_) {
    for (int l = 1; l < local_size_; ++l) {
      RETURN_IF_ERROR(t->SendRecv(leader_ + l, data, bytes, -1, nullptr, 0, MakeTag(seq, tags::kFromLeader), deadline, "hierarchical allreduce (intra-host broadcast)"));
    }
  } else {
    RETURN_IF_ERROR(t->SendRecv(-1, nullptr, 0, leader_, data, bytes, MakeTag(seq, tags::kFromLeader), deadline, "hierarchical allreduce (intra-host broadcast)"));
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
