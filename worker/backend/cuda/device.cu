#include "worker/backend/cuda/device.h"

#include "absl/strings/str_cat.h"
#include "worker/backend/cuda/cuda_check.h"

namespace lmsgd::backend::cuda {

absl::StatusOr<int> DeviceCount() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice) {
    cudaGetLastError();  // clear the sticky error
    return 0;
  }
  CUDA_RETURN_IF_ERROR(err);
  return n;
}

absl::StatusOr<DeviceInfo> GetDeviceInfo(int index) {
  auto count = DeviceCount();
  if (!count.ok()) return count.status();
  if (index < 0 || index >= *count) {
    return absl::NotFoundError(absl::StrCat("no CUDA device ", index, " (", *count, " device(s) visible",
                                            *count == 0 ? ": no GPU or no driver on this machine" : "", ")"));
  }
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, index));
  DeviceInfo info;
  info.index = index;
  info.name = prop.name;
  info.compute_capability_major = prop.major;
  info.compute_capability_minor = prop.minor;
  info.total_memory_bytes = prop.totalGlobalMem;
  info.multiprocessors = prop.multiProcessorCount;
  return info;
}

namespace {
// out is (n,): out[i] = value.
__global__ void FillKernel(float* out, size_t n, float value) {
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}
}  // namespace

absl::Status FillAndSync(float* device_ptr, size_t n, float value) {
  if (n == 0) return absl::OkStatus();
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  FillKernel<<<blocks, threads>>>(device_ptr, n, value);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

}  // namespace lmsgd::backend::cuda
