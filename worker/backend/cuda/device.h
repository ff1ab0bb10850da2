// GPU discovery. A machine without a GPU or driver is not an error: DeviceCount() returns 0
// (cudaGetDeviceCount answers cudaErrorInsufficientDriver / cudaErrorNoDevice there).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lmsgd::backend::cuda {

absl::StatusOr<int> DeviceCount();

struct DeviceInfo {
  int index = 0;
  std::string name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  size_t total_memory_bytes = 0;
  int multiprocessors = 0;
};
// NOT_FOUND (naming the index and how many devices exist) when there is no such device.
absl::StatusOr<DeviceInfo> GetDeviceInfo(int index);

// Fills `n` floats at `device_ptr` with `value` on the default stream and waits: a minimal
// kernel launch used to prove a device works.
absl::Status FillAndSync(float* device_ptr, size_t n, float value);

}  // namespace lmsgd::backend::cuda
