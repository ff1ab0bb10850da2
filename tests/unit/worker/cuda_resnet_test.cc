// The cuDNN ResNet against the float64 reference (tests/gpu/agreement.h): loss, every
// gradient tensor, stem running statistics, inference logits and one full GpuTrainer step, in
// fp32 and bf16; and the fused SGD kernel against optim::Sgd. Skips without a GPU; the
// no-GPU error path runs everywhere.
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "tests/gpu/agreement.h"
#include "worker/backend/cuda/device.h"
#include "worker/backend/cuda/resnet.h"
#include "worker/model/param_store.h"

namespace lmsgd::gpucheck {
namespace {

using backend::cuda::Precision;

bool HaveGpu() {
  auto n = cuda::DeviceCount();
  return n.ok() && *n > 0;
}

TEST(CudaResNetTest, WithoutGpuCreateIsAClearError) {
  if (HaveGpu()) GTEST_SKIP() << "a GPU is present: the no-GPU error path is not reachable here";
  auto spec = model::MakeResNet(model::Arch::kResNet8, 3, 10);
  ASSERT_TRUE(spec.ok());
  model::ParamStore store(*spec);
  backend::NetworkOptions o;
  o.batch = 4;
  o.height = o.width = 8;
  o.bn_group = 4;
  auto net = backend::cuda::GpuResNet::Create(*spec, &store, o, {});
  ASSERT_FALSE(net.ok());
  EXPECT_TRUE(absl::StrContains(net.status().message(), "cuda:0")) << net.status();
}

TEST(CudaResNetTest, PrecisionNames) {
  EXPECT_EQ(*backend::cuda::ParsePrecision("BF16"), Precision::kBf16);
  EXPECT_EQ(*backend::cuda::ParsePrecision("tf32"), Precision::kTf32);
  auto bad = backend::cuda::ParsePrecision("fp8");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "fp8"));
}

class GpuVsReference : public ::testing::TestWithParam<AgreementCase> {};

TEST_P(GpuVsReference, AgreesWithinTolerance) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  const AgreementCase c = GetParam();
  auto a = RunAgreement(c);
  ASSERT_TRUE(a.ok()) << a.status();
  const Tolerance t = ToleranceFor(c.precision);
  EXPECT_LE(a->loss_rel, t.loss) << c.Name();
  EXPECT_LE(a->grad_rel_max, t.grad) << c.Name() << " worst tensor " << a->grad_worst;
  EXPECT_LE(a->running_rel, t.other) << c.Name();
  EXPECT_LE(a->logits_rel, t.other) << c.Name();
  EXPECT_LE(a->step_rel, t.grad) << c.Name();
}

INSTANTIATE_TEST_SUITE_P(Nets, GpuVsReference,
                         ::testing::Values(AgreementCase{model::Arch::kResNet8, 3, 10, 16, 8, 4, Precision::kFp32},
                                           AgreementCase{model::Arch::kResNet18, 3, 7, 32, 4, 2, Precision::kFp32},
                                           AgreementCase{model::Arch::kResNet8, 3, 10, 16, 8, 4, Precision::kBf16}),
                         [](const auto& info) { return "case" + std::to_string(info.index); });

// Profiling on: every op class of a step has GPU time; off: nothing is recorded.
TEST(CudaResNetTest, ProfilingCollectsPerOpTimes) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  auto spec = model::MakeResNet(model::Arch::kResNet18, 3, 10);
  ASSERT_TRUE(spec.ok());
  model::ParamStore store(*spec);
  ASSERT_TRUE(store.Load(model::InitializeParameters(*spec, {1, true})).ok());
  backend::NetworkOptions o;
  o.batch = 4;
  o.height = o.width = 32;
  o.bn_group = 4;
  auto net = backend::cuda::GpuResNet::Create(*spec, &store, o, {});
  ASSERT_TRUE(net.ok()) << net.status();
  std::vector<float> images(4 * 3 * 32 * 32, 0.5f);
  std::vector<int32_t> labels = {0, 1, 2, 3};
  (*net)->SetProfiling(true);
  ASSERT_TRUE((*net)->ForwardTrain(images.data(), labels.data(), 4).ok());
  ASSERT_TRUE((*net)->Backward(nullptr).ok());
  const backend::OpTimes t = (*net)->times();
  EXPECT_GT(t.conv_forward, 0);
  EXPECT_GT(t.conv_backward_data, 0);
  EXPECT_GT(t.conv_backward_weights, 0);
  EXPECT_GT(t.batch_norm_forward, 0);
  EXPECT_GT(t.batch_norm_backward, 0);
  EXPECT_GT(t.max_pool, 0);
  EXPECT_GT(t.fc, 0);
  EXPECT_GT(t.softmax_cross_entropy, 0);
  (*net)->SetProfiling(false);
  (*net)->ResetTimes();
  ASSERT_TRUE((*net)->ForwardTrain(images.data(), labels.data(), 4).ok());
  ASSERT_TRUE((*net)->Backward(nullptr).ok());
  EXPECT_EQ((*net)->times().Total(), 0);
}

TEST(CudaResNetTest, FusedSgdMatchesOptimizer) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  auto err = SgdKernelAgreement();
  ASSERT_TRUE(err.ok()) << err.status();
  EXPECT_LE(*err, 1e-6);
}

}  // namespace
}  // namespace lmsgd::gpucheck
