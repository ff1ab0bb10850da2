#include "worker/backend/reference/ops.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace lmsgd::backend::reference {

Tensor::Tensor(std::vector<int> s, double fill) : shape(std::move(s)) { data.assign(static_cast<size_t>(numel()), fill); }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int d : shape) n *= d;
  return n;
}

Tensor ConvForward(const Tensor& x, const Tensor& w, ConvParams p) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  const int K = w.shape[0], R = w.shape[2], S = w.shape[3];
  const int P = (H + 2 * p.padding - R) / p.stride + 1, Q = (W + 2 * p.padding - S) / p.stride + 1;
  Tensor y({N, K, P, Q});
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      for (int oh = 0; oh < P; ++oh)
        for (int ow = 0; ow < Q; ++ow) {
          double acc = 0;
          for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r)
              for (int s = 0; s < S; ++s) {
                const int ih = oh * p.stride - p.padding + r, iw = ow * p.stride - p.padding + s;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                acc += x.at(n, c, ih, iw) * w.at(k, c, r, s);
              }
          y.at(n, k, oh, ow) = acc;
        }
  return y;
}

Tensor ConvBackwardData(const Tensor& dy, const Tensor& w, ConvParams p, int H, int W) {
  const int N = dy.shape[0], K = dy.shape[1], P = dy.shape[2], Q = dy.shape[3];
  const int C = w.shape[1], R = w.shape[2], S = w.shape[3];
  Tensor dx({N, C, H, W});
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      for (int oh = 0; oh < P; ++oh)
        for (int ow = 0; ow < Q; ++ow) {
          const double g = dy.at(n, k, oh, ow);
          for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r)
              for (int s = 0; s < S; ++s) {
                const int ih = oh * p.stride - p.padding + r, iw = ow * p.stride - p.padding + s;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                dx.at(n, c, ih, iw) += g * w.at(k, c, r, s);
              }
        }
  return dx;
}

Tensor ConvBackwardWeights(const Tensor& x, const Tensor& dy, ConvParams p, int R, int S) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  const int K = dy.shape[1], P = dy.shape[2], Q = dy.shape[3];
  Tensor dw({K, C, R, S});
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      for (int oh = 0; oh < P; ++oh)
        for (int ow = 0; ow < Q; ++ow) {
          const double g = dy.at(n, k, oh, ow);
          for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r)
              for (int s = 0; s < S; ++s) {
                const int ih = oh * p.stride - p.padding + r, iw = ow * p.stride - p.padding + s;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                dw.at(k, c, r, s) += g * x.at(n, c, ih, iw);
              }
        }
  return dw;
}

Tensor BatchNormTrainForward(const Tensor& x, const std::vector<double>& gamma, const std::vector<double>& beta,
                             double eps, int group, BnSaved* saved) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  const int G = N / group;
  const double m = static_cast<double>(group) * H * W;
  Tensor y(x.shape);
  saved->mean.assign(static_cast<size_t>(G) * C, 0);
  saved->inv_std.assign(static_cast<size_t>(G) * C, 0);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      double sum = 0;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) sum += x.at(n, c, h, w);
      const double mean = sum / m;
      double var = 0;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) var += (x.at(n, c, h, w) - mean) * (x.at(n, c, h, w) - mean);
      var /= m;
      const double inv_std = 1.0 / std::sqrt(var + eps);
      saved->mean[g * C + c] = mean;
      saved->inv_std[g * C + c] = inv_std;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) y.at(n, c, h, w) = gamma[c] * (x.at(n, c, h, w) - mean) * inv_std + beta[c];
    }
  return y;
}

Tensor BatchNormBackward(const Tensor& dy, const Tensor& x, const std::vector<double>& gamma, const BnSaved& saved,
                         int group, std::vector<double>* dgamma, std::vector<double>* dbeta) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  const int G = N / group;
  const double m = static_cast<double>(group) * H * W;
  Tensor dx(x.shape);
  dgamma->assign(C, 0);
  dbeta->assign(C, 0);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) {
      const double mean = saved.mean[g * C + c], inv_std = saved.inv_std[g * C + c];
      // With xhat = (x - mean) * inv_std:
      //   dbeta = sum dy;  dgamma = sum dy * xhat
      //   dx = gamma * inv_std / m * (m * dy - sum dy - xhat * sum(dy * xhat))
      double sum_dy = 0, sum_dy_xhat = 0;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) {
            const double xhat = (x.at(n, c, h, w) - mean) * inv_std;
            sum_dy += dy.at(n, c, h, w);
            sum_dy_xhat += dy.at(n, c, h, w) * xhat;
          }
      (*dbeta)[c] += sum_dy;
      (*dgamma)[c] += sum_dy_xhat;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) {
            const double xhat = (x.at(n, c, h, w) - mean) * inv_std;
            dx.at(n, c, h, w) = gamma[c] * inv_std / m * (m * dy.at(n, c, h, w) - sum_dy - xhat * sum_dy_xhat);
          }
    }
  return dx;
}

Tensor BatchNormInference(const Tensor& x, const std::vector<double>& gamma, const std::vector<double>& beta,
                          const std::vector<double>& running_mean, const std::vector<double>& running_var, double eps) {
  Tensor y(x.shape);
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) {
      const double inv_std = 1.0 / std::sqrt(running_var[c] + eps);
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w)
          y.at(n, c, h, w) = gamma[c] * (x.at(n, c, h, w) - running_mean[c]) * inv_std + beta[c];
    }
  return y;
}

void UpdateRunningStats(const Tensor& x, int group, double momentum, std::vector<double>* running_mean,
                        std::vector<double>* running_var) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  const int G = N / group;
  const double m = static_cast<double>(group) * H * W;
  for (int c = 0; c < C; ++c) {
    double mean_avg = 0, var_avg = 0;
    for (int g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) sum += x.at(n, c, h, w);
      const double mean = sum / m;
      for (int n = g * group; n < (g + 1) * group; ++n)
        for (int h = 0; h < H; ++h)
          for (int w = 0; w < W; ++w) sq += (x.at(n, c, h, w) - mean) * (x.at(n, c, h, w) - mean);
      mean_avg += mean / G;
      var_avg += (m > 1 ? sq / (m - 1) : 0.0) / G;
    }
    (*running_mean)[c] = momentum * (*running_mean)[c] + (1 - momentum) * mean_avg;
    (*running_var)[c] = momentum * (*running_var)[c] + (1 - momentum) * var_avg;
  }
}

Tensor ReluForward(const Tensor& x) {
  Tensor y(x.shape);
  for (size_t i = 0; i < x.data.size(); ++i) y.data[i] = std::max(0.0, x.data[i]);
  return y;
}

Tensor ReluBackward(const Tensor& dy, const Tensor& y) {
  Tensor dx(dy.shape);
  for (size_t i = 0; i < dy.data.size(); ++i) dx.data[i] = y.data[i] > 0 ? dy.data[i] : 0.0;
  return dx;
}

Tensor MaxPoolForward(const Tensor& x, int k, int s, int p, std::vector<int64_t>* argmax) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  const int P = (H + 2 * p - k) / s + 1, Q = (W + 2 * p - k) / s + 1;
  Tensor y({N, C, P, Q});
  argmax->assign(static_cast<size_t>(y.numel()), -1);
  int64_t o = 0;
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int oh = 0; oh < P; ++oh)
        for (int ow = 0; ow < Q; ++ow, ++o) {
          double best = -std::numeric_limits<double>::infinity();
          for (int r = 0; r < k; ++r)
            for (int t = 0; t < k; ++t) {
              const int ih = oh * s - p + r, iw = ow * s - p + t;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              if (x.at(n, c, ih, iw) > best) {
                best = x.at(n, c, ih, iw);
                (*argmax)[o] = ((static_cast<int64_t>(n) * C + c) * H + ih) * W + iw;
              }
            }
          y.data[o] = best;
        }
  return y;
}

Tensor MaxPoolBackward(const Tensor& dy, const std::vector<int64_t>& argmax, const std::vector<int>& x_shape) {
  Tensor dx(x_shape);
  for (size_t o = 0; o < dy.data.size(); ++o) dx.data[argmax[o]] += dy.data[o];
  return dx;
}

Tensor GlobalAvgPoolForward(const Tensor& x) {
  const int N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  Tensor y({N, C, 1, 1});
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) {
      double sum = 0;
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) sum += x.at(n, c, h, w);
      y.at(n, c, 0, 0) = sum / (H * W);
    }
  return y;
}

Tensor GlobalAvgPoolBackward(const Tensor& dy, const std::vector<int>& x_shape) {
  Tensor dx(x_shape);
  const int N = x_shape[0], C = x_shape[1], H = x_shape[2], W = x_shape[3];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) dx.at(n, c, h, w) = dy.data[n * C + c] / (H * W);
  return dx;
}

Tensor FcForward(const Tensor& x, const Tensor& w, const std::vector<double>& b) {
  const int N = x.shape[0], O = w.shape[0], I = w.shape[1];
  Tensor y({N, O});
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < O; ++o) {
      double acc = b[o];
      for (int i = 0; i < I; ++i) acc += x.data[static_cast<size_t>(n) * I + i] * w.data[static_cast<size_t>(o) * I + i];
      y.data[static_cast<size_t>(n) * O + o] = acc;
    }
  return y;
}

Tensor FcBackward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dw, std::vector<double>* db) {
  const int N = x.shape[0], O = w.shape[0], I = w.shape[1];
  Tensor dx(x.shape);
  *dw = Tensor(w.shape);
  db->assign(O, 0);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < O; ++o) {
      const double g = dy.data[static_cast<size_t>(n) * O + o];
      (*db)[o] += g;
      for (int i = 0; i < I; ++i) {
        dx.data[static_cast<size_t>(n) * I + i] += g * w.data[static_cast<size_t>(o) * I + i];
        dw->data[static_cast<size_t>(o) * I + i] += g * x.data[static_cast<size_t>(n) * I + i];
      }
    }
  return dx;
}

double SoftmaxCrossEntropy(const Tensor& logits, const std::vector<int>& labels, double normalizer, Tensor* dlogits) {
  const int N = logits.shape[0], K = logits.shape[1];
  *dlogits = Tensor(logits.shape);
  double loss = 0;
  for (int n = 0; n < N; ++n) {
    const double* z = &logits.data[static_cast<size_t>(n) * K];
    const double mx = *std::max_element(z, z + K);
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += std::exp(z[k] - mx);
    const double log_sum = std::log(sum) + mx;
    loss += log_sum - z[labels[n]];
    for (int k = 0; k < K; ++k) {
      const double prob = std::exp(z[k] - log_sum);
      dlogits->data[static_cast<size_t>(n) * K + k] = (prob - (k == labels[n] ? 1.0 : 0.0)) / normalizer;
    }
  }
  return loss / normalizer;
}

Tensor Add(const Tensor& a, const Tensor& b) {
  Tensor y(a.shape);
  for (size_t i = 0; i < a.data.size(); ++i) y.data[i] = a.data[i] + b.data[i];
  return y;
}

}  // namespace lmsgd::backend::reference
