// The paper's SGD (section 2.1, appendix B): hand-computed updates, momentum correction,
// no weight decay on BN gamma/beta.
#include "worker/optim/sgd.h"

#include <gtest/gtest.h>

#include <cmath>

#include "absl/strings/match.h"
#include "common/lr_schedule.h"

namespace lmsgd::optim {
namespace {

TEST(SgdTest, HandComputedMomentumCorrectedSteps) {
  float w = 1.0f, g = 0.5f;
  Sgd sgd({/*momentum=*/0.9, /*nesterov=*/false, /*weight_decay=*/1e-4, false},
          {{"conv.weight", &w, &g, 1, ParamKind::kWeight}});
  ASSERT_TRUE(sgd.Step(0.1, 1.0).ok());
  // v = 0.1 * (0.5 + 1e-4 * 1) = 0.05001; w = 0.94999
  EXPECT_NEAR(sgd.velocity()[0][0], 0.05001, 1e-7);
  EXPECT_NEAR(w, 0.94999, 1e-7);
  // Warmup doubles the rate: c = 0.2 / 0.1 = 2.
  // v = 0.9 * 2 * 0.05001 + 0.2 * (0.5 + 1e-4 * 0.94999) = 0.1900369998
  ASSERT_TRUE(sgd.Step(0.2, 2.0).ok());
  EXPECT_NEAR(sgd.velocity()[0][0], 0.1900369998, 1e-7);
  EXPECT_NEAR(w, 0.7599530002, 1e-7);
}

TEST(SgdTest, HandComputedNesterov) {
  float w = 1.0f, g = 0.5f;
  Sgd sgd({0.9, /*nesterov=*/true, 1e-4, false}, {{"fc.weight", &w, &g, 1, ParamKind::kWeight}});
  ASSERT_TRUE(sgd.Step(0.1, 1.0).ok());
  EXPECT_NEAR(w, 0.904981, 1e-6);
  ASSERT_TRUE(sgd.Step(0.2, 2.0).ok());
  EXPECT_NEAR(sgd.velocity()[0][0], 0.19003609962, 1e-7);
  EXPECT_NEAR(w, 0.624928610722, 1e-6);
}

TEST(SgdTest, NoWeightDecayOnBatchNormParameters) {
  float conv = 1, gamma = 1, beta = 1, bias = 1;
  const float zero = 0;
  std::vector<ParamRef> params = {{"conv1.weight", &conv, &zero, 1, ParamKind::kWeight},
                                  {"bn1.weight", &gamma, &zero, 1, ParamKind::kBnGamma},
                                  {"bn1.bias", &beta, &zero, 1, ParamKind::kBnBeta},
                                  {"fc.bias", &bias, &zero, 1, ParamKind::kBias}};
  Sgd sgd({0.9, false, 1e-4, /*weight_decay_on_bn=*/false}, params);
  ASSERT_TRUE(sgd.Step(0.1, 1.0).ok());
  EXPECT_NEAR(conv, 1 - 0.1 * 1e-4, 1e-7);
  EXPECT_EQ(gamma, 1.0f);
  EXPECT_EQ(beta, 1.0f);
  EXPECT_NEAR(bias, 1 - 0.1 * 1e-4, 1e-7);
  EXPECT_FALSE(sgd.DecaysParam(1));
  EXPECT_TRUE(sgd.DecaysParam(3));

  float gamma2 = 1;
  Sgd with_bn({0.9, false, 1e-4, /*weight_decay_on_bn=*/true}, {{"bn1.weight", &gamma2, &zero, 1, ParamKind::kBnGamma}});
  ASSERT_TRUE(with_bn.Step(0.1, 1.0).ok());
  EXPECT_NEAR(gamma2, 1 - 0.1 * 1e-4, 1e-7);
}

// The folded form with momentum correction equals the unfolded form (u <- m u + g; w <- w - lr u)
// through a warmup, a decay step and a constant stretch; without the correction it does not.
TEST(SgdTest, MomentumCorrectionMatchesUnfoldedForm) {
  LrScheduleParams p;
  p.base_lr = 0.1;
  p.global_batch = 8192;
  p.warmup_epochs = 1;
  p.iterations_per_epoch = 5;
  p.decay_epochs = {2};
  const int steps = 15;
  std::vector<float> grads(steps);
  for (int t = 0; t < steps; ++t) grads[t] = std::sin(0.7f * t) + 0.3f;

  double w_ref = 1.0, u = 0.0;
  for (int t = 0; t < steps; ++t) {
    const double lr = LearningRate(p, t);
    u = 0.9 * u + (grads[t] + 1e-4 * w_ref);
    w_ref -= lr * u;
  }
  auto run = [&](bool correct) {
    float w = 1.0f, g = 0;
    Sgd sgd({0.9, false, 1e-4, false}, {{"w", &w, &g, 1, ParamKind::kWeight}});
    for (int t = 0; t < steps; ++t) {
      g = grads[t];
      EXPECT_TRUE(sgd.Step(LearningRate(p, t), correct ? MomentumCorrection(p, t) : 1.0).ok());
    }
    return static_cast<double>(w);
  };
  EXPECT_NEAR(run(true), w_ref, 1e-4 * std::abs(w_ref) + 1e-5);
  EXPECT_GT(std::abs(run(false) - w_ref), 1e-2);
}

TEST(SgdTest, ErrorsAndState) {
  float w = 1, g = 1;
  Sgd sgd({}, {{"layer1.0.conv1.weight", &w, &g, 1, ParamKind::kWeight}});
  EXPECT_EQ(sgd.Step(std::nan(""), 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(w, 1.0f);
  auto st = sgd.SetVelocity({{1, 2}});
  EXPECT_TRUE(absl::StrContains(st.message(), "layer1.0.conv1.weight")) << st;
  ASSERT_TRUE(sgd.SetVelocity({{0.5f}}).ok());
  ASSERT_TRUE(sgd.Step(0.1, 1.0).ok());
  EXPECT_NEAR(sgd.velocity()[0][0], 0.9 * 0.5 + 0.1 * (1 + 1e-4), 1e-7);
}

}  // namespace
}  // namespace lmsgd::optim
