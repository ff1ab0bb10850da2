// NCCL communicator: a clear error (never a crash) without a usable GPU; on a GPU machine a
// 1-rank allreduce/broadcast through the store bootstrap, ordered by events.
#include "worker/comm/nccl_communicator.h"

#include "worker/comm/bf16_wire.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <vector>

#include "absl/strings/match.h"
#include "worker/backend/cuda/device.h"

namespace lmsgd::comm {
namespace {

TEST(NcclCommunicatorTest, NoUsableDeviceIsAClearErrorNotACrash) {
  auto n = backend::cuda::DeviceCount();
  ASSERT_TRUE(n.ok()) << n.status();
  MemoryStore store;
  // Without a GPU device 0 does not exist; with GPUs, index n does not.
  auto c = NcclCommunicator::Create(0, 1, *n, &store, "gen1", absl::Now() + absl::Seconds(5));
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "cudaSetDevice")) << c.status();
}

TEST(NcclCommunicatorTest, SingleRankAllreduceAndBroadcastOnTheGpu) {
  auto n = backend::cuda::DeviceCount();
  ASSERT_TRUE(n.ok()) << n.status();
  if (*n == 0) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  MemoryStore store;
  auto c = NcclCommunicator::Create(0, 1, 0, &store, "gen1", absl::Now() + absl::Seconds(30));
  ASSERT_TRUE(c.ok()) << c.status();
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), 1024 * sizeof(float)), cudaSuccess);
  std::vector<float> h(1024, 1.5f);
  ASSERT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  cudaEvent_t ready, done;
  ASSERT_EQ(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(ready, nullptr), cudaSuccess);
  ASSERT_TRUE((*c)->AllreduceAsync(d, 1024, ready, done).ok());
  ASSERT_TRUE((*c)->Wait(done, absl::Now() + absl::Seconds(30), "allreduce").ok());
  ASSERT_TRUE((*c)->BroadcastAsync(d, 1024, 0, done, ready).ok());
  ASSERT_TRUE((*c)->Wait(ready, absl::Now() + absl::Seconds(30), "broadcast").ok());
  ASSERT_EQ(cudaMemcpy(h.data(), d, h.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (float v : h) ASSERT_EQ(v, 1.5f);  // one rank: the sum is the value itself
  cudaEventDestroy(ready);
  cudaEventDestroy(done);
  cudaFree(d);
}

// The bf16 path (JobSpec gradient_exchange_dtype BF16): cast, ncclBfloat16 sum, cast back. At one
// rank the result is each value rounded to bf16 (nearest even), as the CPU's FloatToBf16 rounds.
TEST(NcclCommunicatorTest, SingleRankBf16AllreduceRoundsEachValueToBf16) {
  auto n = backend::cuda::DeviceCount();
  ASSERT_TRUE(n.ok()) << n.status();
  if (*n == 0) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  MemoryStore store;
  auto c = NcclCommunicator::Create(0, 1, 0, &store, "gen1", absl::Now() + absl::Seconds(30));
  ASSERT_TRUE(c.ok()) << c.status();
  const size_t count = 4096;
  std::vector<float> h(count);
  for (size_t i = 0; i < count; ++i) h[i] = 1.0f + static_cast<float>(i) * 1.2345e-4f - (i % 3 == 0 ? 7.0f : 0.0f);
  float* d = nullptr;
  uint16_t* wire = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), count * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&wire), count * sizeof(uint16_t)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d, h.data(), count * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  cudaEvent_t ready, done;
  ASSERT_EQ(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(ready, nullptr), cudaSuccess);
  ASSERT_TRUE((*c)->AllreduceAsync(d, count, ready, done, wire).ok());
  ASSERT_TRUE((*c)->Wait(done, absl::Now() + absl::Seconds(30), "bf16 allreduce").ok());
  std::vector<float> got(count);
  ASSERT_EQ(cudaMemcpy(got.data(), d, count * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  int rounded = 0;
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(got[i], Bf16ToFloat(FloatToBf16(h[i]))) << i;
    rounded += got[i] != h[i];
  }
  EXPECT_GT(rounded, 1000) << "the values went through bf16";
  cudaEventDestroy(ready);
  cudaEventDestroy(done);
  cudaFree(wire);
  cudaFree(d);
}

}  // namespace
}  // namespace lmsgd::comm
