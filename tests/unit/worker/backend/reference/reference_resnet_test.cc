// A whole small ResNet's gradient checked end to end against finite differences.
#include "worker/backend/reference/reference_resnet.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace lmsgd::model {
namespace {

using backend::reference::ReferenceResNet;

TEST(ReferenceResNetTest, WholeNetworkGradientMatchesFiniteDifferences) {
  auto spec = MakeResNet(Arch::kResNet8, 1, 10);
  ASSERT_TRUE(spec.ok());
  // gamma = 1 everywhere so that every branch carries gradient.
  ReferenceResNet net(*spec, InitializeParameters(*spec, {3, /*zero_init_last_bn_gamma=*/false}));
  backend::reference::Tensor x({4, 1, 8, 8});
  std::mt19937 rng(11);
  std::normal_distribution<double> nd;
  for (auto& v : x.data) v = nd(rng);
  const std::vector<int> labels = {3, 1, 4, 1};
  const int bn_group = 2;
  const double kn = 8;  // as if 2 workers of 4
  const double loss = net.Forward(x, labels, bn_group, kn);
  EXPECT_GT(loss, 0);
  auto grads = net.Backward();
  int checked = 0;
  for (const auto& p : Parameters(*spec)) {
    ASSERT_TRUE(grads.count(p.name)) << p.name;
    std::vector<double>& values = net.params()[p.name];
    const std::vector<double>& g = grads[p.name];
    ASSERT_EQ(values.size(), g.size()) << p.name;
    double max_abs = 1e-10;
    for (double v : g) max_abs = std::max(max_abs, std::abs(v));
    std::uniform_int_distribution<size_t> pick(0, values.size() - 1);
    for (int t = 0; t < 3; ++t) {
      const size_t i = pick(rng);
      const double saved = values[i], h = 1e-6;
      values[i] = saved + h;
      const double up = net.Forward(x, labels, bn_group, kn);
      values[i] = saved - h;
      const double down = net.Forward(x, labels, bn_group, kn);
      values[i] = saved;
      EXPECT_NEAR((up - down) / (2 * h), g[i], 1e-5 * max_abs + 1e-10) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 * static_cast<int>(Parameters(*spec).size()));
}

TEST(ReferenceResNetTest, BnGroupsChangeTheLoss) {
  auto spec = MakeResNet(Arch::kResNet8, 1, 10);
  ReferenceResNet net(*spec, InitializeParameters(*spec, {3, false}));
  backend::reference::Tensor x({4, 1, 8, 8});
  std::mt19937 rng(12);
  std::normal_distribution<double> nd;
  for (auto& v : x.data) v = nd(rng);
  const double per2 = net.Forward(x, {0, 1, 2, 3}, 2, 4);
  const double per4 = net.Forward(x, {0, 1, 2, 3}, 4, 4);
  EXPECT_GT(std::abs(per2 - per4), 1e-6);
  // With the paper's zero-gamma init every block starts as the identity: the loss does not
  // depend on the residual branches' conv weights.
  ReferenceResNet ident(*spec, InitializeParameters(*spec, {3, true}));
  const double before = ident.Forward(x, {0, 1, 2, 3}, 2, 4);
  for (auto& v : ident.params()["layer1.0.conv1.weight"]) v *= 3;
  EXPECT_NEAR(ident.Forward(x, {0, 1, 2, 3}, 2, 4), before, 1e-12);
}

}  // namespace
}  // namespace lmsgd::model
