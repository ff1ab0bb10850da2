// The oneDNN ResNet against the float64 reference: loss, every parameter's gradient, BN
// running statistics and inference logits, for a CIFAR-style net and an ImageNet-style one
// (7x7 stem + max pool, projection shortcuts).
//
// Tolerances (fp32 vs float64): loss relative 1e-4; each gradient tensor max |diff| <= 2e-3 of
// that tensor's max |reference value| (+1e-7); running stats 1e-4; logits 1e-4 relative.
//
// Cases marked `relu_flips` have a pre-activation within fp32 rounding of 0 on some CPUs: which
// ReLU branch fp32 takes there depends on oneDNN's summation order, which depends on the ISA
// it picks. ResNet-18 64x64 batch 4 agrees to 1.7e-5 in every tensor with oneDNN's SSE4.1 and
// AVX kernels (and with AVX-512), but its AVX2 kernels flip one mask in layer3.0's output:
// 4.4e-3 in that block's BN biases, 8e-3 in its convolutions, 5e-4 in every tensor upstream
// of it, nothing downstream. As in tests/gpu/agreement.h, such cases are gated on the
// gradients as a whole (5e-2: a wrong kernel is off by order 1) and report each tensor; the
// ResNet-18 32x32 batch 8 case holds the per-tensor bound on every ISA tried.
#include "worker/backend/onednn/resnet.h"

#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <random>
#include <set>

#include "tests/unit/worker/test_params.h"
#include "worker/backend/reference/ops.h"
#include "worker/backend/reference/reference_resnet.h"

namespace lmsgd::backend::onednn {
namespace {

using model::Arch;

struct Case {
  Arch arch;
  int channels, classes, hw, batch, bn_group;
  bool relu_flips = false;
};

using ::lmsgd::testing::TestParams;

class OnednnVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(OnednnVsReference, LossGradientsRunningStatsAndLogitsMatch) {
  const Case c = GetParam();
  SetNumThreads(2);
  auto spec = model::MakeResNet(c.arch, c.channels, c.classes);
  ASSERT_TRUE(spec.ok());
  const auto init = TestParams(*spec, 5);
  model::ParamStore store(*spec);
  ASSERT_TRUE(store.Load(init).ok());

  std::vector<float> images;
  std::vector<int32_t> labels;
  ::lmsgd::testing::TestBatch(c.batch, c.channels, c.hw, c.classes, &images, &labels);
  const double kn = 2.0 * c.batch;  // as if one of 2 workers

  NetworkOptions o;
  o.batch = c.batch;
  o.height = o.width = c.hw;
  o.bn_group = c.bn_group;
  auto net = CreateResNet(*spec, &store, o);
  ASSERT_TRUE(net.ok()) << net.status();
  auto loss = (*net)->ForwardTrain(images.data(), labels.data(), kn);
  ASSERT_TRUE(loss.ok()) << loss.status();
  std::vector<size_t> ready;
  const absl::Status bst = (*net)->Backward([&](size_t i) { ready.push_back(i); });
  ASSERT_TRUE(bst.ok()) << bst;

  // Reference on the same (pre-step) parameters.
  backend::reference::ReferenceResNet ref(*spec, init);
  backend::reference::Tensor x({c.batch, c.channels, c.hw, c.hw});
  for (size_t i = 0; i < images.size(); ++i) x.data[i] = images[i];
  const double ref_loss = ref.Forward(x, std::vector<int>(labels.begin(), labels.end()), c.bn_group, kn);
  auto ref_grads = ref.Backward();
  EXPECT_NEAR(*loss, ref_loss, 1e-4 * std::abs(ref_loss)) << (*net)->Describe();

  double all_sq_diff = 0, all_sq_ref = 0;
  for (size_t i = 0; i < store.num_params(); ++i) {
    const auto& ps = store.param_specs()[i];
    const std::vector<double>& g = ref_grads.at(ps.name);
    const float* got = store.grad(i);
    double max_ref = 0, max_diff = 0;
    for (size_t j = 0; j < g.size(); ++j) {
      max_ref = std::max(max_ref, std::abs(g[j]));
      max_diff = std::max(max_diff, std::abs(g[j] - got[j]));
      all_sq_diff += (g[j] - got[j]) * (g[j] - got[j]);
      all_sq_ref += g[j] * g[j];
    }
    if (!c.relu_flips) {
      EXPECT_LE(max_diff, 2e-3 * max_ref + 1e-7) << ps.name << " max_ref=" << max_ref;
    } else if (max_diff > 2e-3 * max_ref + 1e-7) {
      std::cout << ps.name << ": max |diff| " << max_diff / max_ref << " of its max (a flipped ReLU mask: see the top of this file)\n";
    }
  }
  const double all_rel = std::sqrt(all_sq_diff / all_sq_ref);
  EXPECT_LE(all_rel, c.relu_flips ? 5e-2 : 2e-3) << "the gradients as a whole";

  // Every gradient reported ready exactly once, the head first and the stem conv last.
  ASSERT_EQ(ready.size(), store.num_params());
  EXPECT_EQ(std::set<size_t>(ready.begin(), ready.end()).size(), store.num_params());
  EXPECT_EQ(store.param_specs()[ready.front()].name, "fc.weight");
  EXPECT_EQ(store.param_specs()[ready.back()].name, "conv1.weight");

  // Stem BN running statistics: 0.9 * initial + 0.1 * mean over groups (unbiased variance).
  backend::reference::Tensor w({spec->stem_conv.out_channels, c.channels, spec->stem_conv.kernel, spec->stem_conv.kernel});
  for (size_t i = 0; i < w.data.size(); ++i) w.data[i] = init.at("conv1.weight")[i];
  const auto conv1 = backend::reference::ConvForward(x, w, {spec->stem_conv.stride, spec->stem_conv.padding});
  std::vector<double> rm(init.at("bn1.running_mean").begin(), init.at("bn1.running_mean").end());
  std::vector<double> rv(init.at("bn1.running_var").begin(), init.at("bn1.running_var").end());
  backend::reference::UpdateRunningStats(conv1, c.bn_group, 0.9, &rm, &rv);
  for (size_t i = 0; i < rm.size(); ++i) {
    EXPECT_NEAR(store.BufferByName("bn1.running_mean")[i], rm[i], 1e-4 * (1 + std::abs(rm[i]))) << i;
    EXPECT_NEAR(store.BufferByName("bn1.running_var")[i], rv[i], 1e-4 * (1 + std::abs(rv[i]))) << i;
  }
  EXPECT_EQ(store.num_batches_tracked(), 1);

  // Inference network on the (now updated) store vs the reference's inference path.
  NetworkOptions io = o;
  io.training = false;
  auto inf = CreateResNet(*spec, &store, io);
  ASSERT_TRUE(inf.ok()) << inf.status();
  std::vector<float> logits(static_cast<size_t>(c.batch) * c.classes);
  ASSERT_TRUE((*inf)->Predict(images.data(), logits.data()).ok());
  backend::reference::ReferenceResNet ref_inf(*spec, store.ToMap());
  const auto ref_logits = ref_inf.Predict(x);
  double max_ref = 0;
  for (double v : ref_logits.data) max_ref = std::max(max_ref, std::abs(v));
  for (size_t i = 0; i < logits.size(); ++i) EXPECT_NEAR(logits[i], ref_logits.data[i], 1e-4 * max_ref) << i;
}

INSTANTIATE_TEST_SUITE_P(Nets, OnednnVsReference,
                         ::testing::Values(Case{Arch::kResNet8, 1, 10, 8, 4, 2},
                                           Case{Arch::kResNet8, 3, 10, 12, 6, 3},
                                           Case{Arch::kResNet18, 3, 7, 32, 8, 4},
                                           Case{Arch::kResNet18, 3, 7, 64, 4, 4, /*relu_flips=*/true}),
                         [](const auto& info) { return "case" + std::to_string(info.index); });

// bf16 against the same reference, with bounds derived like the GPU's (tests/gpu/agreement.h):
// bf16's unit roundoff is 2^16 times fp32's, so the case's fp32 error x 4 x 2^16 bounds the
// bf16 error (at least the base bounds: loss 2e-2, gradients as a whole 5e-2). The bf16 error
// must also exceed the fp32 one: the bf16 path really ran.
struct Errors {
  double loss = 0, grads = 0;  // |loss - ref| / |ref|; ||grads - ref|| / ||ref|| over all parameters
};

// The case's error in fp32 and in bf16 against one float64 reference computation.
void AgainstReference(const Case& c, Errors* fp32, Errors* bf16, std::string* bf16_describe) {
  auto spec = model::MakeResNet(c.arch, c.channels, c.classes);
  ASSERT_TRUE(spec.ok());
  const auto init = TestParams(*spec, 5);
  std::vector<float> images;
  std::vector<int32_t> labels;
  ::lmsgd::testing::TestBatch(c.batch, c.channels, c.hw, c.classes, &images, &labels);
  const double kn = 2.0 * c.batch;
  backend::reference::ReferenceResNet ref(*spec, init);
  backend::reference::Tensor x({c.batch, c.channels, c.hw, c.hw});
  for (size_t i = 0; i < images.size(); ++i) x.data[i] = images[i];
  const double ref_loss = ref.Forward(x, std::vector<int>(labels.begin(), labels.end()), c.bn_group, kn);
  const auto ref_grads = ref.Backward();
  for (Precision precision : {Precision::kFp32, Precision::kBf16}) {
    model::ParamStore store(*spec);
    ASSERT_TRUE(store.Load(init).ok());
    NetworkOptions o;
    o.batch = c.batch;
    o.height = o.width = c.hw;
    o.bn_group = c.bn_group;
    o.precision = precision;
    auto net = CreateResNet(*spec, &store, o);
    ASSERT_TRUE(net.ok()) << net.status();
    if (precision == Precision::kBf16) *bf16_describe = (*net)->Describe();
    auto loss = (*net)->ForwardTrain(images.data(), labels.data(), kn);
    ASSERT_TRUE(loss.ok()) << loss.status();
    ASSERT_TRUE((*net)->Backward(nullptr).ok());
    Errors& e = precision == Precision::kFp32 ? *fp32 : *bf16;
    e.loss = std::abs(*loss - ref_loss) / std::abs(ref_loss);
    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < store.num_params(); ++i) {
      const std::vector<double>& g = ref_grads.at(store.param_specs()[i].name);
      const float* got = store.grad(i);
      for (size_t j = 0; j < g.size(); ++j) {
        diff2 += (got[j] - g[j]) * (got[j] - g[j]);
        ref2 += g[j] * g[j];
      }
    }
    e.grads = std::sqrt(diff2 / ref2);
  }
}

class OnednnBf16VsReference : public ::testing::TestWithParam<Case> {};

TEST_P(OnednnBf16VsReference, ErrorWithinTheFp32ErrorTimesBf16sRoundoff) {
  if (auto st = CheckPrecision(Precision::kBf16); !st.ok()) GTEST_SKIP() << st.message();
  SetNumThreads(2);
  const Case c = GetParam();
  std::string d16;
  Errors e32, e16;
  AgainstReference(c, &e32, &e16, &d16);
  EXPECT_NE(d16.find("bf16"), std::string::npos) << d16;
  const double ratio = 4.0 * 65536.0;
  EXPECT_LE(e16.loss, std::max(2e-2, ratio * e32.loss)) << "fp32 loss error " << e32.loss;
  EXPECT_LE(e16.grads, std::max(5e-2, ratio * e32.grads)) << "fp32 gradient error " << e32.grads;
  EXPECT_GT(e16.grads, e32.grads) << "bf16 as exact as fp32: the bf16 path did not run";
  std::cout << "fp32 vs reference: loss " << e32.loss << ", gradients " << e32.grads << "; bf16: loss " << e16.loss
            << ", gradients " << e16.grads << "\n";
}

INSTANTIATE_TEST_SUITE_P(Nets, OnednnBf16VsReference,
                         ::testing::Values(Case{Arch::kResNet8, 3, 10, 12, 6, 3},
                                           Case{Arch::kResNet18, 3, 7, 32, 8, 4},
                                           Case{Arch::kResNet18, 3, 7, 64, 4, 4, /*relu_flips=*/true}),
                         [](const auto& info) { return "case" + std::to_string(info.index); });

TEST(OnednnResNetTest, Tf32IsRefusedOnTheCpu) {
  auto spec = model::MakeResNet(Arch::kResNet8, 1, 10);
  model::ParamStore store(*spec);
  NetworkOptions o;
  o.batch = 4;
  o.height = o.width = 8;
  o.bn_group = 2;
  o.precision = Precision::kTf32;
  auto net = CreateResNet(*spec, &store, o);
  ASSERT_FALSE(net.ok());
  EXPECT_NE(net.status().message().find("tf32"), std::string::npos) << net.status();
}

TEST(OnednnResNetTest, ResNet50BuildsAtImageNetShape) {
  SetNumThreads(2);
  auto spec = model::MakeResNet(Arch::kResNet50, 3, 1000);
  ASSERT_TRUE(spec.ok());
  model::ParamStore store(*spec);
  EXPECT_EQ(store.params().size(), 25557032u);
  NetworkOptions o;
  o.batch = 2;
  o.bn_group = 2;
  auto net = CreateResNet(*spec, &store, o);
  ASSERT_TRUE(net.ok()) << net.status();
  ASSERT_TRUE(store.Load(model::InitializeParameters(*spec, {1, true})).ok());
  std::vector<float> images(2 * 3 * 224 * 224, 0.5f);
  std::vector<int32_t> labels = {1, 999};
  auto loss = (*net)->ForwardTrain(images.data(), labels.data(), 2);
  ASSERT_TRUE(loss.ok()) << loss.status();
  // fc ~ N(0, 0.01) on BN-normalized features: logits near 0, loss near ln(1000).
  EXPECT_NEAR(*loss, std::log(1000.0), 0.2);
  ASSERT_TRUE((*net)->Backward(nullptr).ok());
  EXPECT_GT((*net)->times().conv_forward, 0);
}

TEST(OnednnResNetTest, BadInputsAreErrorsNotCrashes) {
  auto spec = model::MakeResNet(Arch::kResNet8, 1, 10);
  model::ParamStore store(*spec);
  NetworkOptions o;
  o.batch = 4;
  o.height = o.width = 8;
  o.bn_group = 3;
  auto bad = CreateResNet(*spec, &store, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("bn_group 3 must divide the batch 4"), std::string::npos);
  o.bn_group = 2;
  auto net = CreateResNet(*spec, &store, o);
  ASSERT_TRUE(net.ok());
  std::vector<float> images(4 * 64, 0.1f);
  std::vector<int32_t> labels = {0, 1, 10, 2};
  auto loss = (*net)->ForwardTrain(images.data(), labels.data(), 4);
  ASSERT_FALSE(loss.ok());
  EXPECT_NE(loss.status().message().find("label 10 of sample 2"), std::string::npos);
  EXPECT_EQ((*net)->Backward(nullptr).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*net)->Predict(images.data(), nullptr).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace lmsgd::backend::onednn
