// The cuDNN ResNet against the float64 reference (tests/gpu/agreement.h): loss, every
// gradient tensor, stem running statistics, inference logits and one full DeviceStep step, in
// fp32 and bf16; and the fused SGD kernel against optim::Sgd. Skips without a GPU; the
// no-GPU error path runs everywhere.
#include <gtest/gtest.h>

#include <cmath>
#include <optional>

#include "absl/strings/match.h"
#include "tests/gpu/agreement.h"
#include "worker/backend/cuda/device.h"
#include "worker/backend/cuda/resnet.h"
#include "worker/model/param_store.h"

namespace lmsgd::gpucheck {
namespace {

using backend::Precision;

bool HaveGpu() {
  auto n = backend::cuda::DeviceCount();
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
  EXPECT_EQ(*backend::ParsePrecision("BF16"), Precision::kBf16);
  EXPECT_EQ(*backend::ParsePrecision("tf32"), Precision::kTf32);
  auto bad = backend::ParsePrecision("fp8");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "fp8"));
}

// The bounds themselves (no GPU needed): bf16's follow the same case's fp32 error x 4 x 2^16,
// with base bounds, and stop gating where that reaches 1 (the rule: tests/gpu/agreement.h).
TEST(AgreementToleranceTest, LowerPrecisionBoundsFollowTheCaseFp32Error) {
  AgreementCase c;
  EXPECT_EQ(ToleranceFor(c).grad_all, 1e-3);
  EXPECT_EQ(ToleranceFor(c).grad, 1e-3);
  c.relu_flips = true;
  EXPECT_EQ(ToleranceFor(c).grad_all, 5e-2);
  EXPECT_LE(ToleranceFor(c).grad, 0);
  c.relu_flips = false;
  c.precision = Precision::kBf16;
  EXPECT_EQ(ToleranceFor(c).grad_all, 5e-2);  // no fp32 row: the base bounds
  Agreement resnet8_fp32;
  resnet8_fp32.loss_rel = 1.506e-9;
  resnet8_fp32.grad_rel_all = 6.049e-7;
  const Tolerance t8 = ToleranceFor(c, &resnet8_fp32);
  EXPECT_NEAR(t8.grad_all, 4 * 65536 * 6.049e-7, 1e-9);
  EXPECT_EQ(t8.loss, 2e-2);
  Agreement bf16;  // the H200's ResNet-8 bf16 row passes ...
  bf16.loss_rel = 3.18e-5;
  bf16.grad_rel_all = 4.04e-2;
  bf16.grad_rel_max = 1.97e-1;
  bf16.running_rel = 3.48e-5;
  bf16.logits_rel = 4.27e-3;
  bf16.step_rel = 4.03e-2;
  EXPECT_TRUE(Passes(bf16, t8));
  bf16.grad_rel_all = 0.8;  // ... an error of order 1 does not
  EXPECT_FALSE(Passes(bf16, t8));
  bf16.grad_rel_all = NAN;
  EXPECT_FALSE(Passes(bf16, t8));
  Agreement resnet18_fp32;  // amplifies rounding ~1e3 times: bf16 gradients not gated
  resnet18_fp32.loss_rel = 1.129e-7;
  resnet18_fp32.grad_rel_all = 7.172e-5;
  const Tolerance t18 = ToleranceFor(c, &resnet18_fp32);
  EXPECT_TRUE(std::isinf(t18.grad_all));
  EXPECT_NEAR(t18.loss, 4 * 65536 * 1.129e-7, 1e-9);
  bf16.grad_rel_all = 0.819;
  bf16.step_rel = 0.819;
  bf16.loss_rel = 1.13e-3;
  EXPECT_TRUE(Passes(bf16, t18));
  bf16.logits_rel = 0.5;  // logits and running statistics stay gated
  EXPECT_FALSE(Passes(bf16, t18));
}

class GpuVsReference : public ::testing::TestWithParam<AgreementCase> {};

TEST_P(GpuVsReference, AgreesWithinTolerance) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  const AgreementCase c = GetParam();
  auto a = RunAgreement(c);
  ASSERT_TRUE(a.ok()) << a.status();
  // Lower precisions are bounded by how much the same case amplifies fp32 rounding.
  std::optional<Agreement> fp32;
  if (c.precision != Precision::kFp32) {
    AgreementCase f = c;
    f.precision = Precision::kFp32;
    auto r = RunAgreement(f);
    ASSERT_TRUE(r.ok()) << r.status();
    fp32 = *r;
  }
  const Tolerance t = ToleranceFor(c, fp32 ? &*fp32 : nullptr);
  EXPECT_LE(a->loss_rel, t.loss) << c.Name();
  EXPECT_LE(a->grad_rel_all, t.grad_all) << c.Name();
  if (t.grad > 0) EXPECT_LE(a->grad_rel_max, t.grad) << c.Name() << " worst tensor " << a->grad_worst;
  EXPECT_LE(a->running_rel, t.other) << c.Name();
  EXPECT_LE(a->logits_rel, t.other) << c.Name();
  EXPECT_LE(a->step_rel, t.grad_all) << c.Name();
}

INSTANTIATE_TEST_SUITE_P(Nets, GpuVsReference,
                         ::testing::Values(AgreementCase{model::Arch::kResNet8, 3, 10, 16, 16, 8, Precision::kFp32},
                                           AgreementCase{model::Arch::kResNet18, 3, 7, 32, 8, 4, Precision::kFp32},
                                           AgreementCase{model::Arch::kResNet8, 3, 10, 16, 16, 8, Precision::kBf16}),
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
  auto loss = (*net)->ForwardTrain(images.data(), labels.data(), 4);
  ASSERT_TRUE(loss.ok()) << loss.status();
  const absl::Status back = (*net)->Backward(nullptr);
  ASSERT_TRUE(back.ok()) << back;
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
  auto loss2 = (*net)->ForwardTrain(images.data(), labels.data(), 4);
  ASSERT_TRUE(loss2.ok()) << loss2.status();
  const absl::Status back2 = (*net)->Backward(nullptr);
  ASSERT_TRUE(back2.ok()) << back2;
  EXPECT_EQ((*net)->times().Total(), 0);
}

// 8-bit staging (normalized on the device) gives the loss of the same images normalized on the
// host and staged as floats, in fp32 and bf16.
TEST(CudaResNetTest, StagedPixelsEqualTheSameImagesStagedAsFloats) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  for (Precision p : {Precision::kFp32, Precision::kBf16}) {
    auto spec = model::MakeResNet(model::Arch::kResNet18, 3, 10);
    ASSERT_TRUE(spec.ok());
    model::ParamStore store(*spec);
    ASSERT_TRUE(store.Load(model::InitializeParameters(*spec, {3, true})).ok());
    backend::NetworkOptions o;
    o.batch = 4;
    o.height = o.width = 32;
    o.bn_group = 4;
    o.precision = p;
    auto net = backend::cuda::GpuResNet::Create(*spec, &store, o, {});
    ASSERT_TRUE(net.ok()) << net.status();
    const int N = 4, H = 32, W = 32;
    std::vector<uint8_t> pixels(static_cast<size_t>(N) * H * W * 3);
    for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>((i * 37 + i / 97) % 256);
    backend::cuda::GpuResNet::PixelNormalization norm;
    const float mean[3] = {0.485f, 0.456f, 0.406f}, stdv[3] = {0.229f, 0.224f, 0.225f};
    for (int c = 0; c < 3; ++c) {
      norm.mul[c] = 1.0f / (255.0f * stdv[c]);
      norm.add[c] = -mean[c] / stdv[c];
    }
    std::vector<float> images(pixels.size());  // NCHW
    for (int n = 0; n < N; ++n) {
      for (int y = 0; y < H; ++y) {
        for (int x = 0; x < W; ++x) {
          for (int c = 0; c < 3; ++c) {
            images[((static_cast<size_t>(n) * 3 + c) * H + y) * W + x] =
                pixels[((static_cast<size_t>(n) * H + y) * W + x) * 3 + c] * norm.mul[c] + norm.add[c];
          }
        }
      }
    }
    std::vector<int32_t> labels = {0, 1, 2, 3};
    ASSERT_TRUE((*net)->UploadState(store).ok());
    ASSERT_TRUE((*net)->StageBatch(images.data(), labels.data()).ok());
    ASSERT_TRUE((*net)->ForwardTrainAsync(4).ok());
    auto from_floats = (*net)->ReadLoss();
    ASSERT_TRUE(from_floats.ok()) << from_floats.status();
    ASSERT_TRUE((*net)->UploadState(store).ok());
    ASSERT_TRUE((*net)->StageBatchPixels(pixels.data(), labels.data(), norm).ok());
    ASSERT_TRUE((*net)->ForwardTrainAsync(4).ok());
    auto from_pixels = (*net)->ReadLoss();
    ASSERT_TRUE(from_pixels.ok()) << from_pixels.status();
    EXPECT_NEAR(*from_pixels, *from_floats, 1e-5 * std::abs(*from_floats)) << backend::PrecisionName(p);
    // Bad labels are refused before anything is copied.
    std::vector<int32_t> bad = {0, 1, 2, 10};
    auto st = (*net)->StageBatchPixels(pixels.data(), bad.data(), norm);
    ASSERT_FALSE(st.ok());
    EXPECT_TRUE(absl::StrContains(st.message(), "label 10 of sample 3")) << st;
  }
}

TEST(CudaResNetTest, FusedSgdMatchesOptimizer) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  auto err = SgdKernelAgreement();
  ASSERT_TRUE(err.ok()) << err.status();
  EXPECT_LE(*err, 1e-6);
}

}  // namespace
}  // namespace lmsgd::gpucheck
