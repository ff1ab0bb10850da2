// cuDNN error conversion at the call site, like cuda_check.h: the Status names the call,
// file:line and cuDNN's own message and cudnnGetLastErrorString (which argument it rejected).
#pragma once

#include <cudnn.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lmsgd::backend::cuda {

inline absl::Status CudnnStatus(cudnnStatus_t st, const char* expr, const char* file, int line) {
  if (st == CUDNN_STATUS_SUCCESS) return absl::OkStatus();
  char detail[512] = {0};
  cudnnGetLastErrorString(detail, sizeof(detail));
  return absl::InternalError(
      absl::StrCat(file, ":", line, ": ", expr, ": ", cudnnGetErrorString(st), detail[0] ? ": " : "", detail));
}

}  // namespace lmsgd::backend::cuda

#define CUDNN_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(::lmsgd::backend::cuda::CudnnStatus((expr), #expr, __FILE__, __LINE__))
