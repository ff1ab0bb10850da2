// CUDA error conversion at the call site: CUDA_RETURN_IF_ERROR(cudaMalloc(...)) returns an
// absl::Status naming the call, file:line and CUDA's own message.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lmsgd::backend::cuda {

// A failed call's error is consumed here (cudaGetLastError): once it is a Status it must not be
// reported again by an unrelated launch check later on this thread (a failed cudaSetDevice
// on a bad ordinal once surfaced as "launching NchwToNhwcKernel: invalid device ordinal" in the
// next test). Sticky errors (a faulted context) keep coming back from every call regardless.
inline absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  (void)cudaGetLastError();
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, ": ", cudaGetErrorName(err), ": ",
                                          cudaGetErrorString(err)));
}

// For calls whose failure is tolerated (best-effort profiling): true on success; a failure is
// consumed as in CudaStatus, so no later launch check reports it.
inline bool BestEffort(cudaError_t err) {
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();
  return false;
}

// cudaEventQuery that does not leave cudaErrorNotReady behind as this thread's last runtime
// error: a later launch check (cudaGetLastError) would otherwise report "device not ready" as
// its kernel's failure. Returns cudaSuccess, cudaErrorNotReady, or the real error.
inline cudaError_t QueryEvent(cudaEvent_t event) {
  const cudaError_t q = cudaEventQuery(event);
  if (q == cudaErrorNotReady) (void)cudaGetLastError();
  return q;
}

}  // namespace lmsgd::backend::cuda

#define CUDA_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(::lmsgd::backend::cuda::CudaStatus((expr), #expr, __FILE__, __LINE__))
