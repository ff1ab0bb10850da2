
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/algorithms/halving_doubling.h"
#include "worker/comm/algorithms/ring.h"
#include "worker/comm/algorithms/shared_memory.h"

namespace lmsgd::comm {

// `host_of_rank[r]` names rank r's host; ranks of a host must be contiguous. With several
// hosts, a host whose ranks can map shared memory runs the intra-host phases through it
// (SharedMemoryAllreduce over the host's ranks; set up in Create, a collective, by `deadline`).
// The leaders allreduce by halving/doubling (`doubling_max_bytes`: its recursive-doubling
// switch) up to `halving_doubling_max_bytes`, by ring above.
class HierarchicalAllreduce final : public AllreduceAlgorithm {
 public:
  static absl::StatusOr<std::unique_ptr<HierarchicalAllreduce>> Create(
      Transport* t, const std::vector<std::string>& host_of_rank, absl::Time deadline,
      size_t halving_doubling_max_bytes = kHalvingDoublingMaxBytes,
      size_t doubling_max_bytes = HalvingDoublingAllreduce::kDefaultDoublingMaxBytes);
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override {
    return Run(data, count, sequence, deadline, WireDtype::kFp32);
  }
  // kBf16: every phase on the bf16 wire (bf16_wire.h), the intra-host one through shared memory
  // in bf16 too.
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline, WireDtype wire);
  void Abort();  // a Run in progress on shared memory returns ABORTED promptly
  bool intra_host_shared_memory() const { return local_shm_ != nullptr; }
  int num_hosts() const { return static_cast<int>(leaders_.size()); }
  // The algorithm of the phase among host leaders for a message of `bytes`.
  Algorithm InterHostAlgorithm(size_t bytes) const { return RingOrHalvingDoubling(bytes, halving_doubling_max_bytes_); }
  // The setup messages of the intra-host segment: the largest sequence a tag holds (32 bits,
  // MakeTag), beyond any collective's (counted from 1; the leaders' phase adds bit 31).
  static constexpr uint64_t kLocalShmSetupSequence = 0xffffffffu;

 private:
  class LeaderView;
  HierarchicalAllreduce() = default;
  absl::Status RunAmongLeaders(float* data, size_t count, uint64_t sequence, absl::Time deadline, WireDtype wire);
  Transport* t_ = nullptr;
  int leader_ = 0, local_size_ = 1;  // this host's first rank and rank count
  std::vector<int> leaders_;          // first rank of every host
  size_t halving_doubling_max_bytes_ = kHalvingDoublingMaxBytes;
  std::unique_ptr<Transport> leader_view_, local_view_;
  std::unique_ptr<RingAllreduce> leader_ring_;
  std::unique_ptr<HalvingDoublingAllreduce> leader_halving_doubling_;
  std::unique_ptr<SharedMemoryAllreduce> local_shm_;
  // The same over the bf16 wire.
  std::unique_ptr<Transport> bf16_, bf16_leader_view_;
  std::unique_ptr<RingAllreduce> bf16_leader_ring_;
  std::unique_ptr<HalvingDoublingAllreduce> bf16_leader_halving_doubling_;
};

}  // namespace lmsgd::comm
