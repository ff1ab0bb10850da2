#include "worker/comm/algorithms/allreduce.h"

#include <algorithm>

#include "worker/comm/algorithms/tags.h"

namespace lmsgd::comm {

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

void AppendSegmented(const P2POp& op, uint64_t sequence, uint32_t step, std::vector<P2POp>* ops) {
  const size_t n = op.bytes / sizeof(float);
  const size_t segments = std::clamp<size_t>((n + kSegmentFloats - 1) / kSegmentFloats, 1, tags::kSegmentsPerStep);
  for (size_t j = 0; j < segments; ++j) {
    const size_t a = n * j / segments, b = n * (j + 1) / segments;
    P2POp piece = op;
    piece.buf = static_cast<float*>(op.buf) + a;
    piece.bytes = (b - a) * sizeof(float);
    piece.tag = MakeTag(sequence, step + static_cast<uint32_t>(j));
    ops->push_back(piece);
  }
}

}  // namespace lmsgd::comm
