// The allreduce algorithms' common interface and the choice between them. Each algorithm
// (sum, fp32) has a file of its own in this folder, one class each (after Gloo); message tags
// are laid out in tags.h. Every algorithm reduces each element in an order fixed by the algorithm and
// the ranks, and the final value of every element is computed by exactly one rank and then
// copied to the others (recursive doubling: by two partners adding the same two values), so
// all ranks end bitwise identical.
//
// Received data that is summed goes through the transport's receive-and-add (P2POp::kRecvAdd:
// added straight out of the transport's receive buffers), except where the rank is still sending
// the very range (recursive doubling, the merged middle step of halving/doubling): those receive
// into scratch memory, which grows to the largest message seen and is then reused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

// kAuto: chosen per collective by the Communicator (ChooseAlgorithm).
enum class Algorithm { kAuto, kRing, kHalvingDoubling, kHierarchical, kSharedMemory };
const char* AlgorithmName(Algorithm a);

// Where ring and halving/doubling are chosen by message size (AUTO among ranks on different
// hosts; the hierarchical allreduce's phase among host leaders): halving/doubling up to this
// size, ring above. Halving/doubling needs fewer steps (latency) and the ring moves less data
// per step (bandwidth); the crossover measured over TCP is in docs/benchmarks.md. It is set
// below the paper's (~1M elements) because loopback has no network latency.
inline constexpr size_t kHalvingDoublingMaxBytes = 256 << 10;
// That choice for a message of `bytes`.
inline Algorithm RingOrHalvingDoubling(size_t bytes, size_t halving_doubling_max_bytes = kHalvingDoublingMaxBytes) {
  return bytes <= halving_doubling_max_bytes ? Algorithm::kHalvingDoubling : Algorithm::kRing;
}

// Element offset of block i when `count` elements are cut into `blocks` near-equal blocks.
inline size_t BlockStart(size_t count, int blocks, int i) {
  const size_t base = count / blocks, extra = count % blocks;
  return base * i + (static_cast<size_t>(i) < extra ? static_cast<size_t>(i) : extra);
}

// Appends `op` cut into segments (about kSegmentFloats floats each, at most
// tags::kSegmentsPerStep), segment j tagged MakeTag(sequence, step + j): a receive-and-add then
// adds each segment as it arrives, while the rest is still in flight, and a bf16 wire converts
// one segment while the previous one moves. Sender and receiver cut a range of the same length
// the same way.
inline constexpr size_t kSegmentFloats = 256 * 1024;
void AppendSegmented(const P2POp& op, uint64_t sequence, uint32_t step, std::vector<P2POp>* ops);

// What an allreduce puts on the wire: float32, or bf16 with float32 additions (bf16_wire.h).
enum class WireDtype { kFp32, kBf16 };

class AllreduceAlgorithm {
 public:
  virtual ~AllreduceAlgorithm() = default;
  // Sums `data[0..count)` over all ranks in place. `sequence` must be the same on every rank
  // for the same collective (it keys the messages).
  virtual absl::Status Run(float* data, size_t count, uint64_t sequence, absl::Time deadline) = 0;
};

}  // namespace lmsgd::comm
