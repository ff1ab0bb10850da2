// ResNet specs: torchvision names/shapes/counts and the paper's initialization.
#include "worker/model/resnet.h"

#include <gtest/gtest.h>

#include <cmath>

#include "absl/strings/match.h"

namespace lmsgd::model {
namespace {

ResNetSpec Make(Arch a, int c = 3, int k = 1000) {
  auto s = MakeResNet(a, c, k);
  EXPECT_TRUE(s.ok()) << s.status();
  return *s;
}

double Std(const std::vector<float>& v) {
  double sum = 0, sq = 0;
  for (float x : v) {
    sum += x;
    sq += static_cast<double>(x) * x;
  }
  const double mean = sum / v.size();
  return std::sqrt(sq / v.size() - mean * mean);
}

TEST(ResNetTest, ParameterCountsMatchTorchvision) {
  EXPECT_EQ(CountParameters(Make(Arch::kResNet50)), 25557032);
  EXPECT_EQ(CountParameters(Make(Arch::kResNet18)), 11689512);
  EXPECT_EQ(CountParameters(Make(Arch::kResNet34)), 21797672);
  // CIFAR ResNet-20 with projection shortcuts, 3 channels, 10 classes:
  // stem 432+32, stage1 3*(2*2304+64), stage2 14528+2*18560, stage3 57728+2*73984, fc 650.
  EXPECT_EQ(CountParameters(Make(Arch::kResNet20, 3, 10)), 272474);
}

TEST(ResNetTest, Resnet50NamesAndShapesAreTorchvisions) {
  const ResNetSpec s = Make(Arch::kResNet50);
  const auto params = Parameters(s);
  const auto buffers = Buffers(s);
  EXPECT_EQ(params.size(), 161u);  // 53 convs + 53 BN x (gamma, beta) + fc weight and bias
  EXPECT_EQ(buffers.size(), 159u);  // 53 BN x (running_mean, running_var, num_batches_tracked)
  EXPECT_EQ(params[0].name, "conv1.weight");
  EXPECT_EQ(params[0].shape, (std::vector<int64_t>{64, 3, 7, 7}));
  EXPECT_EQ(params[1].name, "bn1.weight");
  EXPECT_EQ(params[2].name, "bn1.bias");
  EXPECT_EQ(params[3].name, "layer1.0.conv1.weight");
  EXPECT_EQ(params.back().name, "fc.bias");
  EXPECT_EQ(params[params.size() - 2].shape, (std::vector<int64_t>{1000, 2048}));
  std::map<std::string, std::vector<int64_t>> by_name;
  for (const auto& p : params) by_name[p.name] = p.shape;
  EXPECT_EQ(by_name["layer1.0.downsample.0.weight"], (std::vector<int64_t>{256, 64, 1, 1}));
  EXPECT_EQ(by_name["layer3.5.conv2.weight"], (std::vector<int64_t>{256, 256, 3, 3}));
  EXPECT_EQ(by_name["layer4.2.bn3.weight"], (std::vector<int64_t>{2048}));
  EXPECT_EQ(by_name.count("layer4.1.downsample.0.weight"), 0u);
  EXPECT_EQ(buffers[0].name, "bn1.running_mean");
  EXPECT_EQ(buffers[2].name, "bn1.num_batches_tracked");
  // ResNet-50 v1.5: the stride-2 is on the 3x3 conv of the first bottleneck of stages 2-4.
  for (const auto& blk : s.blocks) {
    const int want = (blk.name == "layer2.0" || blk.name == "layer3.0" || blk.name == "layer4.0") ? 2 : 1;
    EXPECT_EQ(blk.convs[0].stride, 1) << blk.name;
    EXPECT_EQ(blk.convs[1].stride, want) << blk.name;
    EXPECT_EQ(blk.convs[1].kernel, 3);
    if (blk.downsample_conv) EXPECT_EQ(blk.downsample_conv->stride, want) << blk.name;
  }
  EXPECT_EQ(s.blocks.size(), 16u);
}

TEST(ResNetTest, PaperInitialization) {
  const ResNetSpec s = Make(Arch::kResNet50);
  auto w = InitializeParameters(s, {7, true});
  // He (MSRA) normal with fan-out: layer4.0.conv2 is 512x512x3x3, std sqrt(2 / (9 * 512)).
  EXPECT_NEAR(Std(w["layer4.0.conv2.weight"]), std::sqrt(2.0 / (9 * 512)), 0.01 * std::sqrt(2.0 / (9 * 512)));
  EXPECT_NEAR(Std(w["conv1.weight"]), std::sqrt(2.0 / (49 * 64)), 0.03 * std::sqrt(2.0 / (49 * 64)));
  EXPECT_NEAR(Std(w["fc.weight"]), 0.01, 0.0002);
  for (float x : w["fc.bias"]) ASSERT_EQ(x, 0.0f);
  // gamma = 0 for the last BN of each of the 16 bottlenecks; 1 elsewhere; beta 0.
  int zero_gammas = 0;
  for (const auto& p : Parameters(s)) {
    if (p.kind != optim::ParamKind::kBnGamma) continue;
    const bool last = absl::StrContains(p.name, ".bn3.");
    for (float x : w[p.name]) ASSERT_EQ(x, last ? 0.0f : 1.0f) << p.name;
    zero_gammas += last;
  }
  EXPECT_EQ(zero_gammas, 16);
  for (float x : w["layer1.0.downsample.1.weight"]) ASSERT_EQ(x, 1.0f);
  for (float x : w["layer2.1.bn1.bias"]) ASSERT_EQ(x, 0.0f);
  for (float x : w["bn1.running_var"]) ASSERT_EQ(x, 1.0f);
  for (float x : w["bn1.running_mean"]) ASSERT_EQ(x, 0.0f);
  // Basic blocks: bn2 is the last one.
  auto r20 = InitializeParameters(Make(Arch::kResNet20, 1, 10), {7, true});
  for (float x : r20["layer2.1.bn2.weight"]) ASSERT_EQ(x, 0.0f);
  for (float x : r20["layer2.1.bn1.weight"]) ASSERT_EQ(x, 1.0f);
  // The paper's gamma = 1 ablation.
  auto ones = InitializeParameters(s, {7, false});
  for (float x : ones["layer4.2.bn3.weight"]) ASSERT_EQ(x, 1.0f);
}

TEST(ResNetTest, InitIsDeterministicInTheSeed) {
  const ResNetSpec s = Make(Arch::kResNet20, 3, 10);
  auto a = InitializeParameters(s, {1, true});
  auto b = InitializeParameters(s, {1, true});
  auto c = InitializeParameters(s, {2, true});
  EXPECT_EQ(a, b);
  EXPECT_NE(a["layer1.0.conv1.weight"], c["layer1.0.conv1.weight"]);
  for (const auto& p : Parameters(s)) EXPECT_EQ(static_cast<int64_t>(a[p.name].size()), p.numel()) << p.name;
}

TEST(ResNetTest, BadArguments) {
  EXPECT_FALSE(MakeResNet(Arch::kResNet50, 0, 1000).ok());
  EXPECT_FALSE(MakeResNet(Arch::kResNet50, 3, 1).ok());
}

}  // namespace
}  // namespace lmsgd::model
