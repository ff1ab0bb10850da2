// Pins the learning-rate schedule to the numbers of Goyal et al. (2017), section 2 and 5.
#include "common/lr_schedule.h"

#include <gtest/gtest.h>

namespace lmsgd {
namespace {

// ImageNet-1k at kn = 8192: 1281167 / 8192 = 156 iterations per epoch.
LrScheduleParams Paper8k(Warmup warmup = Warmup::kGradual) {
  LrScheduleParams p;
  p.base_lr = 0.1;
  p.reference_batch = 256;
  p.global_batch = 8192;
  p.warmup = warmup;
  p.warmup_epochs = 5;
  p.decay_epochs = {30, 60, 80};
  p.decay_factor = 0.1;
  p.iterations_per_epoch = 1281167 / 8192;
  return p;
}

// The paper's Table 2 ablations at kn = 8192: the linear rule 3.2, no scaling 0.1, the square-root
// rule 0.1 x sqrt(32) = 0.566. Warmup starts from base_lr whatever the rule.
TEST(LrScheduleTest, ScalingRulesAt8k) {
  LrScheduleParams p = Paper8k();
  EXPECT_NEAR(PeakLearningRate(p), 3.2, 1e-12);
  p.scaling = LrScaling::kNone;
  EXPECT_NEAR(PeakLearningRate(p), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(p, 0), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(p, 30 * 156), 0.01, 1e-12);
  p.scaling = LrScaling::kSqrt;
  EXPECT_NEAR(PeakLearningRate(p), 0.565685424949238, 1e-12);
  EXPECT_NEAR(LearningRate(p, 0), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(p, 5 * 156), 0.565685424949238, 1e-12);
  const uint64_t half = 5 * 156 / 2;
  EXPECT_NEAR(LearningRate(p, half), 0.1 + (0.565685424949238 - 0.1) * half / (5.0 * 156), 1e-12);
}

TEST(LrScheduleTest, LinearScalingRule) {
  EXPECT_NEAR(PeakLearningRate(Paper8k()), 3.2, 1e-12);
  LrScheduleParams p = Paper8k();
  p.global_batch = 256;
  EXPECT_NEAR(PeakLearningRate(p), 0.1, 1e-12);
  p.global_batch = 1024;
  EXPECT_NEAR(PeakLearningRate(p), 0.4, 1e-12);
}

TEST(LrScheduleTest, GradualWarmupFrom0_1To3_2OverFiveEpochs) {
  const LrScheduleParams p = Paper8k();
  const uint64_t ipe = p.iterations_per_epoch;
  ASSERT_EQ(ipe, 156u);
  EXPECT_EQ(WarmupIterations(p), 5 * ipe);
  EXPECT_NEAR(LearningRate(p, 0), 0.1, 1e-12);
  // A constant increment every iteration.
  const double step = (3.2 - 0.1) / static_cast<double>(5 * ipe);
  EXPECT_NEAR(LearningRate(p, 1), 0.1 + step, 1e-12);
  EXPECT_NEAR(LearningRate(p, 2) - LearningRate(p, 1), step, 1e-12);
  EXPECT_NEAR(LearningRate(p, 5 * ipe - 1) - LearningRate(p, 5 * ipe - 2), step, 1e-12);
  // Halfway through warmup: halfway between the two rates.
  EXPECT_NEAR(LearningRate(p, 5 * ipe / 2), 0.1 + (3.2 - 0.1) / 2, 1e-12);
  // End of epoch 5.
  EXPECT_NEAR(LearningRate(p, 5 * ipe), 3.2, 1e-12);
  EXPECT_NEAR(LearningRate(p, 10 * ipe), 3.2, 1e-12);
}

TEST(LrScheduleTest, StepDecayAt30_60_80) {
  const LrScheduleParams p = Paper8k();
  const uint64_t ipe = p.iterations_per_epoch;
  EXPECT_NEAR(LearningRate(p, 30 * ipe - 1), 3.2, 1e-12);
  EXPECT_NEAR(LearningRate(p, 30 * ipe), 0.32, 1e-12);
  EXPECT_NEAR(LearningRate(p, 60 * ipe - 1), 0.32, 1e-12);
  EXPECT_NEAR(LearningRate(p, 60 * ipe), 0.032, 1e-12);
  EXPECT_NEAR(LearningRate(p, 80 * ipe), 0.0032, 1e-12);
  EXPECT_NEAR(LearningRate(p, 90 * ipe - 1), 0.0032, 1e-12);
}

TEST(LrScheduleTest, Kn256HasNoRamp) {
  LrScheduleParams p = Paper8k();
  p.global_batch = 256;
  p.iterations_per_epoch = 1281167 / 256;
  for (uint64_t t : {0ull, 1ull, 100ull, 5ull * p.iterations_per_epoch - 1, 5ull * p.iterations_per_epoch}) {
    EXPECT_NEAR(LearningRate(p, t), 0.1, 1e-12) << "iteration " << t;
  }
  EXPECT_NEAR(LearningRate(p, 30 * p.iterations_per_epoch), 0.01, 1e-12);
}

TEST(LrScheduleTest, ConstantWarmupJumpsAtEpoch5) {
  const LrScheduleParams p = Paper8k(Warmup::kConstant);
  const uint64_t ipe = p.iterations_per_epoch;
  EXPECT_NEAR(LearningRate(p, 0), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(p, 5 * ipe - 1), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(p, 5 * ipe), 3.2, 1e-12);
}

TEST(LrScheduleTest, NoWarmupStartsAtPeak) {
  const LrScheduleParams p = Paper8k(Warmup::kNone);
  EXPECT_EQ(WarmupIterations(p), 0u);
  EXPECT_NEAR(LearningRate(p, 0), 3.2, 1e-12);
  EXPECT_NEAR(LearningRate(p, 30 * p.iterations_per_epoch), 0.32, 1e-12);
}

TEST(LrScheduleTest, MomentumCorrectionIsRatioOfRates) {
  const LrScheduleParams p = Paper8k();
  const uint64_t ipe = p.iterations_per_epoch;
  EXPECT_DOUBLE_EQ(MomentumCorrection(p, 0), 1.0);
  // During warmup the rate grows every iteration: the factor is > 1.
  EXPECT_NEAR(MomentumCorrection(p, 1), LearningRate(p, 1) / 0.1, 1e-12);
  EXPECT_GT(MomentumCorrection(p, 1), 1.0);
  // Flat part: exactly 1.
  EXPECT_DOUBLE_EQ(MomentumCorrection(p, 10 * ipe), 1.0);
  // At a decay step: 0.1.
  EXPECT_NEAR(MomentumCorrection(p, 30 * ipe), 0.1, 1e-12);
  // Constant warmup: the jump multiplies by 32.
  EXPECT_NEAR(MomentumCorrection(Paper8k(Warmup::kConstant), 5 * ipe), 32.0, 1e-9);
}

}  // namespace
TEST(LrScheduleTest, ElasticRewarmRampsLinearlyFromTheOldRate) {
  LrScheduleParams p;
  p.global_batch = 4096;  // peak 1.6
  p.iterations_per_epoch = 100;
  p.warmup_epochs = 1;
  p.decay_epochs = {30};
  p.rewarm_start = 500;   // re-formed at epoch 5
  p.rewarm_iterations = 25;
  p.rewarm_from = 3.2;    // the rate the kn = 8192 generation had reached
  EXPECT_DOUBLE_EQ(LearningRate(p, 499), 1.6);
  EXPECT_DOUBLE_EQ(LearningRate(p, 500), 3.2);
  EXPECT_NEAR(LearningRate(p, 510), 3.2 + (1.6 - 3.2) * 10 / 25.0, 1e-12);
  EXPECT_DOUBLE_EQ(LearningRate(p, 525), 1.6);
  EXPECT_NEAR(MomentumCorrection(p, 501), LearningRate(p, 501) / 3.2, 1e-15);
}

}  // namespace lmsgd
