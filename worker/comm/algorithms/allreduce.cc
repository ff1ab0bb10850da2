#include "worker/comm/algorithms/allreduce.h"

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

}  // namespace lmsgd::comm
