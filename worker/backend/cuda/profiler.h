// Per-op GPU times for GpuResNet::SetProfiling: a Scope records a CUDA event on the stream when
// it is made and another when it goes, and Collect (once the host has waited for the stream)
// adds each pair's elapsed time to the op's OpTimes field. Off by default: then a Scope records
// nothing at all. Timing is best effort: a failed event call loses that sample and leaves no
// CUDA error behind.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "worker/backend/network.h"

namespace lmsgd::backend::cuda {

class OpProfiler {
 public:
  OpProfiler() = default;
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;
  ~OpProfiler();

  class Scope {
   public:
    Scope(OpProfiler* profiler, cudaStream_t stream, double OpTimes::*field);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* p_;
    cudaStream_t stream_;
    double OpTimes::*field_;
    cudaEvent_t start_ = nullptr;
  };

  void set_enabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }
  // Adds the recorded pairs' times; the stream must have been waited for.
  void Collect();
  const OpTimes& times() const { return times_; }
  void Reset() { times_ = OpTimes(); }

 private:
  struct Timing {
    double OpTimes::*field;
    cudaEvent_t start, end;
  };
  cudaEvent_t TakeEvent();  // null when none can be made
  bool enabled_ = false;
  std::vector<Timing> timings_;
  std::vector<cudaEvent_t> pool_, all_;
  OpTimes times_;
};

}  // namespace lmsgd::backend::cuda
