// Allreduce (sum, fp32), broadcast and barrier algorithms over a Transport, one class each
// (after Gloo). Every algorithm reduces each element in an order fixed by the algorithm and
// the ranks, and the final value of every element is computed by exactly one rank and then
// copied to the others (recursive doubling: by two partners adding the same two values), so
// all ranks end bitwise identical.
//
// Received data that is summed goes through the transport's receive-and-add (P2POp::kRecvAdd:
// added straight out of the transport's receive buffers), except where the rank is still sending
// the very range (recursive doubling, the merged middle step of halving/doubling): those receive
// into scratch memory, which grows to the largest message seen and is then reused.
//
// Ring (reduce-scatter, then allgather): the buffer is cut into k chunks; in k-1 steps each
// rank sends one chunk to its right neighbour and adds the chunk from its left; then k-1 steps
// pass the reduced chunks around. 2(k-1) steps, each moving count/k elements: bandwidth optimal,
// latency 2(k-1) alpha.
//
// Recursive halving/doubling (Rabenseifner; Thakur et al. 2005): for p = 2^m ranks, m
// reduce-scatter steps with partner rank XOR p/2, p/4, ..., 1, each exchanging half of the
// current range, then m allgather steps in reverse: the paper's choice for small messages. Up
// to 64 KiB the last halving and the first doubling step (same partner, one piece each way
// each) run as one exchange of the two-piece range that both partners sum: 2 log2(p) - 1
// steps. Non-powers of two: Gloo's "binary blocks" (see the .cc). Short messages: recursive
// doubling, log2(p) steps (see the class).
//
// Shared memory (every rank on one host): the ranks map one segment and, chunk by chunk, each
// publishes the parts of its data the others reduce, sums its own 1/k of the chunk (in rank
// order, its own part read in place) into its buffer and a result area, and copies the other
// slices of the result out as each becomes ready. The segment stays in cache, so each rank's
// memory traffic is about one read and one write of its buffer (a ring over a transport moves
// it several times). Flag-synchronized phases per chunk, two chunk slots in flight.
//
// Hierarchical (the paper's three phases): ranks are contiguous per host; the local ranks
// send their buffers to the host's first rank (the leader), which sums them in rank order;
// the leaders allreduce among themselves (the paper's inter-server choice: halving/doubling up
// to kHalvingDoublingMaxBytes, ring above); each leader sends the result back to its local
// ranks.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

// kAuto: chosen per collective by the Communicator (ChooseAlgorithm).
enum class Algorithm { kAuto, kRing, kHalvingDoubling, kHierarchical, kSharedMemory };
const char* AlgorithmName(Algorithm a);

// Where ring and halving/doubling are chosen by message size (AUTO among ranks on different
// hosts; the hierarchical allreduce's phase among host leaders): halving/doubling up to this
// size, ring above. From `lmsgd-bench allreduce --ranks=4` over UCX's TCP transport (the wire
// between hosts) on this project's machine (README): halving/doubling 1.4-2.9x faster than ring
// from 4 to 64 KiB, still ahead at 1 MiB on loopback, behind at 4 MiB; kept at 256 KiB because
// loopback has no network latency (the paper saw halving/doubling ahead up to ~1M elements).
inline constexpr size_t kHalvingDoublingMaxBytes = 256 << 10;
// That choice for a message of `bytes`.
inline Algorithm RingOrHalvingDoubling(size_t bytes, size_t halving_doubling_max_bytes = kHalvingDoublingMaxBytes) {
  return bytes <= halving_doubling_max_bytes ? Algorithm::kHalvingDoubling : Algorithm::kRing;
}

class AllreduceAlgorithm {
 public:
  virtual ~AllreduceAlgorithm() = default;
  // Sums `data[0..count)` over all ranks in place. `sequence` must be the same on every rank
  // for the same collective (it keys the messages).
  virtual absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) = 0;
};

class RingAllreduce final : public AllreduceAlgorithm {
 public:
  explicit RingAllreduce(Transport* t) : t_(t) {}
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override;

 private:
  Transport* t_;
};

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
  // From `lmsgd-bench allreduce --ranks=4` on this project's 2-core machine (README): recursive
  // doubling took 0.75-0.8x halving/doubling's time at 4 and 16 KiB, 1.1-1.2x at 64 KiB.
  static constexpr size_t kDefaultDoublingMaxBytes = 32 << 10;
  explicit HalvingDoublingAllreduce(Transport* t, size_t doubling_max_bytes = kDefaultDoublingMaxBytes)
      : t_(t), doubling_max_bytes_(doubling_max_bytes) {}
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override;

 private:
  absl::Status RunDoubling(float* data, size_t count, uint64_t sequence, absl::Time deadline);
  Transport* t_;
  size_t doubling_max_bytes_;
  std::vector<float> scratch_;
};

class SharedMemoryAllreduce final : public AllreduceAlgorithm {
 public:
  // Collective over `t` (every rank calls it, all on one host): rank 0 creates a POSIX
  // shared-memory segment and sends its name over the transport; every rank maps it; once all
  // have (checked by an exchange that also makes the outcome the same everywhere), rank 0
  // unlinks the name, so nothing outlives the processes. `tag_sequence` keys the setup
  // messages (use one no collective uses). `chunk_floats` per rank and slot (0: sized so that
  // the segment's two slots stay within ~8 MiB).
  static absl::StatusOr<std::unique_ptr<SharedMemoryAllreduce>> Create(Transport* t, uint64_t tag_sequence,
                                                                        absl::Time deadline, size_t chunk_floats = 0);
  ~SharedMemoryAllreduce() override;
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override;
  // Makes a Run in progress (and every later one) return ABORTED promptly. Thread-safe.
  void Abort();

  struct Header;

 private:
  SharedMemoryAllreduce() = default;
  absl::Status WaitOne(int phase, int q, uint64_t step, absl::Time deadline);
  absl::Status WaitAll(int phase, uint64_t step, absl::Time deadline);  // every other rank
  int rank_ = 0, size_ = 1;
  size_t chunk_ = 0;
  void* base_ = nullptr;
  size_t bytes_ = 0;
  Header* header_ = nullptr;
  float* slots_ = nullptr;  // 2 slots x (size inputs + 1 result) x chunk floats
  uint64_t step_ = 0;
  uint64_t my_pid_ns_ = 0;
  std::atomic<bool> aborted_{false};
};

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
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override;
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
  absl::Status RunAmongLeaders(float* data, size_t count, uint64_t sequence, absl::Time deadline);
  Transport* t_ = nullptr;
  int leader_ = 0, local_size_ = 1;  // this host's first rank and rank count
  std::vector<int> leaders_;          // first rank of every host
  size_t halving_doubling_max_bytes_ = kHalvingDoublingMaxBytes;
  std::unique_ptr<Transport> leader_view_, local_view_;
  std::unique_ptr<RingAllreduce> leader_ring_;
  std::unique_ptr<HalvingDoublingAllreduce> leader_halving_doubling_;
  std::unique_ptr<SharedMemoryAllreduce> local_shm_;
};

// Broadcast from `root` (binomial tree, log2 k steps) and barrier (a 1-element allreduce by
// recursive doubling).
absl::Status Broadcast(Transport* t, float* data, size_t count, int root, uint64_t sequence, absl::Time deadline);
absl::Status Barrier(Transport* t, uint64_t sequence, absl::Time deadline);

}  // namespace lmsgd::comm
