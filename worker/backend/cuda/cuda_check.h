// CUDA error conversion at the call site: CUDA_RETURN_IF_ERROR(cudaMalloc(...)) returns an
// absl::Status naming the call, file:line and CUDA's own message.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lmsgd::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, ": ", cudaGetErrorName(err), ": ",
                                          cudaGetErrorString(err)));
}

}  // namespace lmsgd::cuda

#define CUDA_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(::lmsgd::cuda::CudaStatus((expr), #expr, __FILE__, __LINE__))
