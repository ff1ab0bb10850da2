// Runs everywhere: without a GPU (or driver) DeviceCount() must be 0, not an error, and the
// kernel test skips saying why. On a GPU machine it launches a kernel and checks the result.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <vector>

#include "absl/strings/match.h"
#include "worker/backend/cuda/cuda_check.h"
#include "worker/backend/cuda/device.h"

namespace lmsgd::backend::cuda {
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

// A failed runtime call is recorded as the thread's last error; once CudaStatus has turned it
// into a Status, a later launch check (cudaGetLastError) must not report it again. Runs on a
// GPU machine; without a driver the runtime's error is sticky and the test skips.
TEST(CudaDeviceTest, AConvertedErrorIsNotReportedAgainByTheNextCheck) {
  const int bad = 1 << 20;  // no such ordinal anywhere
  ASSERT_NE(cudaSetDevice(bad), cudaSuccess);
  if (cudaPeekAtLastError() == cudaSuccess) GTEST_SKIP() << "this CUDA runtime records no last error for it";
  (void)cudaGetLastError();
  if (cudaPeekAtLastError() != cudaSuccess) {
    GTEST_SKIP() << "the runtime's error is sticky on this machine (" << cudaGetErrorName(cudaPeekAtLastError())
                 << ": no GPU driver), so there is nothing to clear";
  }
  const absl::Status st = CudaStatus(cudaSetDevice(bad), "cudaSetDevice(bad)", __FILE__, __LINE__);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(absl::StrContains(st.message(), "cudaSetDevice(bad)")) << st;
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess) << cudaGetErrorName(cudaPeekAtLastError());
}

}  // namespace
}  // namespace lmsgd::backend::cuda
