// Runs everywhere: without a GPU (or driver) DeviceCount() must be 0, not an error, and the
// kernel test skips saying why. On a GPU machine it launches a kernel and checks the result.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <vector>

#include "absl/strings/match.h"
#include "worker/backend/cuda/device.h"

namespace lmsgd::cuda {
namespace {

TEST(CudaDeviceTest, CountIsNotAnErrorWithoutGpu) {
  auto n = DeviceCount();
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_GE(*n, 0);
  if (*n == 0) {
    auto info = GetDeviceInfo(0);
    EXPECT_EQ(info.status().code(), absl::StatusCode::kNotFound);
    EXPECT_TRUE(absl::StrContains(info.status().message(), "no GPU")) << info.status();
  }
}

TEST(CudaDeviceTest, FillKernelOnDevice) {
  auto n = DeviceCount();
  ASSERT_TRUE(n.ok()) << n.status();
  if (*n == 0) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  auto info = GetDeviceInfo(0);
  ASSERT_TRUE(info.ok()) << info.status();
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), 1000 * sizeof(float)), cudaSuccess);
  ASSERT_TRUE(FillAndSync(d, 1000, 2.5f).ok());
  std::vector<float> h(1000);
  ASSERT_EQ(cudaMemcpy(h.data(), d, 1000 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(d);
  for (float v : h) ASSERT_EQ(v, 2.5f);
}

}  // namespace
}  // namespace lmsgd::cuda
