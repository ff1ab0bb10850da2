// Shared memory (every rank on one host): the ranks map one segment and, chunk by chunk, each
// publishes the parts of its data the others reduce, sums its own 1/k of the chunk (in rank
// order, its own part read in place) into its buffer and a result area, and copies the other
// slices of the result out as each becomes ready. The segment stays in cache, so each rank's
// memory traffic is about one read and one write of its buffer (a ring over a transport moves
// it several times). Flag-synchronized phases per chunk, two chunk slots in flight.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "worker/comm/algorithms/allreduce.h"

namespace lmsgd::comm {

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
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) override {
    return Run(data, count, sequence, deadline, WireDtype::kFp32);
  }
  // kBf16: each rank publishes its values as bf16 (half the bytes through the segment), each
  // slice is summed in float32 from the bf16 values in rank order and published as bf16, which
  // every rank (its owner too) takes as its result.
  absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline, WireDtype wire);
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

}  // namespace lmsgd::comm
