#include "worker/backend/cuda/profiler.h"

#include "worker/backend/cuda/cuda_check.h"

namespace lmsgd::backend::cuda {

OpProfiler::~OpProfiler() {
  for (cudaEvent_t e : all_) cudaEventDestroy(e);
}

cudaEvent_t OpProfiler::TakeEvent() {
  if (!pool_.empty()) {
    cudaEvent_t e = pool_.back();
    pool_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  if (!BestEffort(cudaEventCreate(&e))) return nullptr;
  all_.push_back(e);
  return e;
}

OpProfiler::Scope::Scope(OpProfiler* profiler, cudaStream_t stream, double OpTimes::*field)
    : p_(profiler), stream_(stream), field_(field) {
  if (!p_->enabled_ || (start_ = p_->TakeEvent()) == nullptr) return;
  if (!BestEffort(cudaEventRecord(start_, stream_))) {  // no timing, no error left
    p_->pool_.push_back(start_);
    start_ = nullptr;
  }
}

OpProfiler::Scope::~Scope() {
  if (start_ == nullptr) return;
  cudaEvent_t end = p_->TakeEvent();
  if (end == nullptr || !BestEffort(cudaEventRecord(end, stream_))) {
    p_->pool_.push_back(start_);
    if (end != nullptr) p_->pool_.push_back(end);
    return;
  }
  p_->timings_.push_back({field_, start_, end});
}

void OpProfiler::Collect() {
  for (const Timing& t : timings_) {
    float ms = 0;
    if (BestEffort(cudaEventElapsedTime(&ms, t.start, t.end))) times_.*(t.field) += ms / 1000.0;
    pool_.push_back(t.start);
    pool_.push_back(t.end);
  }
  timings_.clear();
}

}  // namespace lmsgd::backend::cuda
