// Every reference op's backward checked against central finite differences (float64,
// h = 1e-6, relative tolerance 1e-6 of the largest gradient), plus hand-computed forwards.
#include "worker/backend/reference/ops.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

namespace lmsgd::backend::reference {
namespace {

Tensor Random(std::vector<int> shape, uint32_t seed, double scale = 1.0) {
  Tensor t(std::move(shape));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  for (auto& v : t.data) v = u(rng);
  return t;
}

double Dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (size_t i = 0; i < a.data.size(); ++i) s += a.data[i] * b.data[i];
  return s;
}

// Checks `analytic` = d/d(values) of loss(values) by central differences.
void ExpectGradient(std::vector<double>* values, const std::function<double()>& loss, const std::vector<double>& analytic,
                    const char* what) {
  ASSERT_EQ(values->size(), analytic.size()) << what;
  double max_abs = 1e-12;
  for (double g : analytic) max_abs = std::max(max_abs, std::abs(g));
  const double h = 1e-6;
  for (size_t i = 0; i < values->size(); ++i) {
    const double saved = (*values)[i];
    (*values)[i] = saved + h;
    const double up = loss();
    (*values)[i] = saved - h;
    const double down = loss();
    (*values)[i] = saved;
    const double numeric = (up - down) / (2 * h);
    ASSERT_NEAR(numeric, analytic[i], 1e-6 * max_abs + 1e-9) << what << "[" << i << "]";
  }
}

TEST(ReferenceOpsTest, ConvForwardByHand) {
  Tensor x({1, 1, 3, 3});
  for (int i = 0; i < 9; ++i) x.data[i] = i + 1;  // 1..9
  Tensor w({1, 1, 2, 2});
  w.data = {1, 0, 0, -1};  // x[i][j] - x[i+1][j+1]
  Tensor y = ConvForward(x, w, {1, 0});
  ASSERT_EQ(y.shape, (std::vector<int>{1, 1, 2, 2}));
  for (double v : y.data) EXPECT_DOUBLE_EQ(v, -4);
  Tensor yp = ConvForward(x, w, {2, 1});  // padded, stride 2: 2x2 output
  ASSERT_EQ(yp.shape, (std::vector<int>{1, 1, 2, 2}));
  EXPECT_DOUBLE_EQ(yp.at(0, 0, 0, 0), -1);  // 0 - x[0][0]
  EXPECT_DOUBLE_EQ(yp.at(0, 0, 1, 1), 5 - 9 + 0 * 0);  // x[1][1] - x[2][2]
}

TEST(ReferenceOpsTest, ConvBackwardMatchesFiniteDifferences) {
  const ConvParams p{2, 1};
  Tensor x = Random({2, 2, 5, 5}, 1), w = Random({3, 2, 3, 3}, 2);
  Tensor dy = Random(ConvForward(x, w, p).shape, 3);
  auto loss = [&] { return Dot(ConvForward(x, w, p), dy); };
  ExpectGradient(&x.data, loss, ConvBackwardData(dy, w, p, 5, 5).data, "conv dx");
  ExpectGradient(&w.data, loss, ConvBackwardWeights(x, dy, p, 3, 3).data, "conv dw");
}

TEST(ReferenceOpsTest, BatchNormPerGroupStatisticsAndGradients) {
  const int group = 2;
  Tensor x = Random({4, 3, 2, 2}, 4, 2.0);
  std::vector<double> gamma = {0.5, 1.5, -1.0}, beta = {0.1, -0.2, 0.3};
  BnSaved saved;
  Tensor y = BatchNormTrainForward(x, {1, 1, 1}, {0, 0, 0}, 0.0, group, &saved);
  // Each group of 2 samples is normalized on its own: mean 0, variance 1 per (group, channel).
  for (int g = 0; g < 2; ++g)
    for (int c = 0; c < 3; ++c) {
      double sum = 0, sq = 0;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int i = 0; i < 4; ++i) {
          const double v = y.data[((n * 3) + c) * 4 + i];
          sum += v;
          sq += v * v;
        }
      EXPECT_NEAR(sum / 8, 0, 1e-12);
      EXPECT_NEAR(sq / 8, 1, 1e-9);
    }
  Tensor dy = Random(x.shape, 5);
  auto loss = [&] {
    BnSaved s;
    return Dot(BatchNormTrainForward(x, gamma, beta, 1e-5, group, &s), dy);
  };
  (void)BatchNormTrainForward(x, gamma, beta, 1e-5, group, &saved);
  std::vector<double> dgamma, dbeta;
  Tensor dx = BatchNormBackward(dy, x, gamma, saved, group, &dgamma, &dbeta);
  ExpectGradient(&x.data, loss, dx.data, "bn dx");
  ExpectGradient(&gamma, loss, dgamma, "bn dgamma");
  ExpectGradient(&beta, loss, dbeta, "bn dbeta");
}

TEST(ReferenceOpsTest, RunningStatsMomentum) {
  Tensor x({2, 1, 1, 2});
  x.data = {1, 3, 5, 7};  // group of 2 samples: one group, mean 4, unbiased var 20/3
  std::vector<double> mean = {0}, var = {1};
  UpdateRunningStats(x, 2, 0.9, &mean, &var);
  EXPECT_NEAR(mean[0], 0.1 * 4, 1e-12);
  EXPECT_NEAR(var[0], 0.9 + 0.1 * 20.0 / 3.0, 1e-12);
  Tensor y = BatchNormInference(x, {2}, {1}, {4}, {4}, 0.0);
  EXPECT_NEAR(y.data[0], 2 * (1 - 4) / 2.0 + 1, 1e-12);
}

TEST(ReferenceOpsTest, ReluMaxPoolAvgPoolFcBackward) {
  // ReLU: inputs away from the kink.
  Tensor x = Random({2, 3, 4, 4}, 6);
  for (auto& v : x.data) v += (v >= 0 ? 0.01 : -0.01);
  Tensor dy = Random(x.shape, 7);
  ExpectGradient(&x.data, [&] { return Dot(ReluForward(x), dy); }, ReluBackward(dy, ReluForward(x)).data, "relu");

  // Max pool 3x3 stride 2 pad 1 (the ResNet stem).
  Tensor xm = Random({2, 2, 6, 6}, 8);
  std::vector<int64_t> argmax;
  Tensor ym = MaxPoolForward(xm, 3, 2, 1, &argmax);
  ASSERT_EQ(ym.shape, (std::vector<int>{2, 2, 3, 3}));
  Tensor dym = Random(ym.shape, 9);
  ExpectGradient(&xm.data, [&] {
    std::vector<int64_t> a;
    return Dot(MaxPoolForward(xm, 3, 2, 1, &a), dym);
  }, MaxPoolBackward(dym, argmax, xm.shape).data, "maxpool");

  Tensor xa = Random({2, 3, 3, 3}, 10);
  Tensor dya = Random({2, 3, 1, 1}, 11);
  ExpectGradient(&xa.data, [&] { return Dot(GlobalAvgPoolForward(xa), dya); },
                 GlobalAvgPoolBackward(dya, xa.shape).data, "avgpool");

  Tensor xf = Random({3, 4, 1, 1}, 12), wf = Random({5, 4}, 13);
  std::vector<double> b = {0.1, 0.2, 0.3, 0.4, 0.5};
  Tensor dyf = Random({3, 5}, 14);
  Tensor dw;
  std::vector<double> db;
  Tensor dxf = FcBackward(dyf, xf, wf, &dw, &db);
  auto fl = [&] { return Dot(FcForward(xf, wf, b), dyf); };
  ExpectGradient(&xf.data, fl, dxf.data, "fc dx");
  ExpectGradient(&wf.data, fl, dw.data, "fc dw");
  ExpectGradient(&b, fl, db, "fc db");
}

TEST(ReferenceOpsTest, SoftmaxCrossEntropyNormalizedByGlobalBatch) {
  Tensor z = Random({4, 6}, 15, 3.0);
  std::vector<int> labels = {0, 5, 2, 2};
  Tensor dz;
  // Loss of 4 local samples normalized by kn = 16 (4 workers x 4): a quarter of the local mean.
  const double local_mean = SoftmaxCrossEntropy(z, labels, 4, &dz);
  const double global = SoftmaxCrossEntropy(z, labels, 16, &dz);
  EXPECT_NEAR(global, local_mean / 4, 1e-12);
  ExpectGradient(&z.data, [&] {
    Tensor unused;
    return SoftmaxCrossEntropy(z, labels, 16, &unused);
  }, dz.data, "softmax-ce");
  // Uniform logits: loss = log K per sample.
  Tensor u({2, 6});
  EXPECT_NEAR(SoftmaxCrossEntropy(u, {1, 3}, 2, &dz), std::log(6.0), 1e-12);
}

}  // namespace
}  // namespace lmsgd::backend::reference
