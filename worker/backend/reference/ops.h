// Plain reference implementations of every training op, in float64 with simple loops, NCHW.
// They define what the fast backends (oneDNN, cuDNN) must compute and are used by tests only:
// clarity over speed. Shapes are written in each function's comment.
//
// Batch norm works on groups of `group` consecutive samples: statistics are computed per group
// (the paper's per-worker BN over n samples; virtual workers and bn_group_size split a batch
// into several groups). Variance in the normalization is biased (divide by m); the running
// variance is updated with the unbiased one (divide by m - 1), like PyTorch and cuDNN.
#pragma once

#include <cstdint>
#include <vector>

namespace lmsgd::backend::reference {

struct Tensor {
  std::vector<int> shape;
  std::vector<double> data;
  Tensor() = default;
  explicit Tensor(std::vector<int> s, double fill = 0.0);
  int64_t numel() const;
  double& at(int a, int b, int c, int d) { return data[((static_cast<int64_t>(a) * shape[1] + b) * shape[2] + c) * shape[3] + d]; }
  double at(int a, int b, int c, int d) const { return data[((static_cast<int64_t>(a) * shape[1] + b) * shape[2] + c) * shape[3] + d]; }
};

struct ConvParams {
  int stride = 1;
  int padding = 0;
};

// x (N,C,H,W), w (K,C,R,S) -> y (N,K,P,Q), P = (H + 2p - R) / stride + 1.
Tensor ConvForward(const Tensor& x, const Tensor& w, ConvParams p);
// dy (N,K,P,Q), w (K,C,R,S) -> dx (N,C,H,W) for the given input height/width.
Tensor ConvBackwardData(const Tensor& dy, const Tensor& w, ConvParams p, int h, int w_in);
// x (N,C,H,W), dy (N,K,P,Q) -> dw (K,C,R,S).
Tensor ConvBackwardWeights(const Tensor& x, const Tensor& dy, ConvParams p, int r, int s);

struct BnSaved {
  std::vector<double> mean;     // (groups * C)
  std::vector<double> inv_std;  // (groups * C)
};
// x (N,C,H,W), gamma/beta (C) -> y; statistics per group of `group` samples (N % group == 0).
Tensor BatchNormTrainForward(const Tensor& x, const std::vector<double>& gamma, const std::vector<double>& beta,
                             double eps, int group, BnSaved* saved);
// Gradients of BatchNormTrainForward: dx (N,C,H,W), dgamma, dbeta (C, summed over groups).
Tensor BatchNormBackward(const Tensor& dy, const Tensor& x, const std::vector<double>& gamma, const BnSaved& saved,
                         int group, std::vector<double>* dgamma, std::vector<double>* dbeta);
// Inference: y = gamma * (x - mean) / sqrt(var + eps) + beta with running statistics.
Tensor BatchNormInference(const Tensor& x, const std::vector<double>& gamma, const std::vector<double>& beta,
                          const std::vector<double>& running_mean, const std::vector<double>& running_var, double eps);
// running <- momentum * running + (1 - momentum) * batch statistic, averaged over the groups
// (paper: momentum 0.9). Uses the unbiased variance.
void UpdateRunningStats(const Tensor& x, int group, double momentum, std::vector<double>* running_mean,
                        std::vector<double>* running_var);

Tensor ReluForward(const Tensor& x);
// dx = dy where y > 0.
Tensor ReluBackward(const Tensor& dy, const Tensor& y);
// Max pool, kernel k, stride s, padding p (padding never wins). Returns y and the argmax flat
// input index per output element.
Tensor MaxPoolForward(const Tensor& x, int k, int s, int p, std::vector<int64_t>* argmax);
Tensor MaxPoolBackward(const Tensor& dy, const std::vector<int64_t>& argmax, const std::vector<int>& x_shape);
// x (N,C,H,W) -> y (N,C,1,1) mean over H,W.
Tensor GlobalAvgPoolForward(const Tensor& x);
Tensor GlobalAvgPoolBackward(const Tensor& dy, const std::vector<int>& x_shape);
// x (N,I,1,1) or (N,I), w (O,I), b (O) -> y (N,O): y = x w^T + b.
Tensor FcForward(const Tensor& x, const Tensor& w, const std::vector<double>& b);
// dx (x's shape), dw (O,I), db (O).
Tensor FcBackward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dw, std::vector<double>* db);
// logits (N,K), labels (N): loss = sum_i -log softmax(logits_i)[label_i] / normalizer; the
// normalizer is the GLOBAL minibatch kn (paper section 2.2), so that the allreduce sums.
// Fills dlogits = (softmax - onehot) / normalizer.
double SoftmaxCrossEntropy(const Tensor& logits, const std::vector<int>& labels, double normalizer, Tensor* dlogits);
Tensor Add(const Tensor& a, const Tensor& b);

}  // namespace lmsgd::backend::reference
