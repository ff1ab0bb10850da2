// The backend-neutral training network: one ResNet (a model::ResNetSpec) at a fixed batch
// shape, reading parameters from and writing gradients to a model::ParamStore.
//
// Backends: onednn/ (CPU, oneDNN primitives in blocked layouts) and cuda/ (GpuResNet: cuDNN + our kernels).
// Each is built from the same ops as the float64 reference (backend/reference/ops.h), with
// the same names: ConvForward / ConvBackwardData / ConvBackwardWeights, BatchNormTrainForward
// / BatchNormBackward / BatchNormInference, ReluForward / ReluBackward, MaxPoolForward /
// MaxPoolBackward, GlobalAvgPoolForward / GlobalAvgPoolBackward, FcForward / FcBackward,
// SoftmaxCrossEntropy, Add. OpTimes reports where a step's time goes under those names.
//
// Semantics (the paper's, pinned by tests against the reference):
//   * loss = sum over the batch of cross-entropy / normalizer, normalizer = the GLOBAL
//     minibatch kn, so gradients summed over workers are the gradient of the mean loss;
//   * BN statistics per group of `bn_group` consecutive samples (never across workers);
//     running stats: r <- momentum * r + (1 - momentum) * (mean over groups of the group
//     statistic), variance unbiased; num_batches_tracked += 1 per training forward;
//   * Backward OVERWRITES the gradients in the ParamStore and calls `on_ready(i)` as soon as
//     parameter i's gradient is final, in reverse layer order (for overlapped allreduce).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/backend/precision.h"

namespace lmsgd::backend {

struct NetworkOptions {
  int batch = 32;
  int height = 224;
  int width = 224;
  int bn_group = 32;      // batch % bn_group == 0
  bool training = true;   // false: inference only (Predict), BN with running statistics
  double bn_momentum = 0.9;
  double bn_eps = 1e-5;
  // Activations and the per-step weight copy in bf16 (kBf16), or fp32; master weights,
  // gradients, BN statistics and the loss stay fp32 either way (precision.h).
  Precision precision = Precision::kFp32;
};

// Seconds spent per op since the last Reset, summed over layers.
struct OpTimes {
  double conv_forward = 0, conv_backward_data = 0, conv_backward_weights = 0;
  double batch_norm_forward = 0, batch_norm_backward = 0;
  double add_relu_forward = 0, add_relu_backward = 0;  // residual Add + ReLU and their gradients
  double max_pool = 0, global_avg_pool = 0, fc = 0, softmax_cross_entropy = 0;
  double weight_reorder = 0;  // plain <-> backend layouts of weights and weight gradients
  OpTimes& operator+=(const OpTimes& o);
  double Total() const;
};

// Every OpTimes field with its name, in the order reports list them: the one list that sums,
// totals and per-op tables go through.
inline constexpr std::array<std::pair<const char*, double OpTimes::*>, 12> kOpTimeFields = {{
    {"conv_forward", &OpTimes::conv_forward},
    {"conv_backward_data", &OpTimes::conv_backward_data},
    {"conv_backward_weights", &OpTimes::conv_backward_weights},
    {"batch_norm_forward", &OpTimes::batch_norm_forward},
    {"batch_norm_backward", &OpTimes::batch_norm_backward},
    {"add_relu_forward", &OpTimes::add_relu_forward},
    {"add_relu_backward", &OpTimes::add_relu_backward},
    {"max_pool", &OpTimes::max_pool},
    {"global_avg_pool", &OpTimes::global_avg_pool},
    {"fc", &OpTimes::fc},
    {"softmax_cross_entropy", &OpTimes::softmax_cross_entropy},
    {"weight_reorder", &OpTimes::weight_reorder},
}};

inline OpTimes& OpTimes::operator+=(const OpTimes& o) {
  for (const auto& f : kOpTimeFields) this->*(f.second) += o.*(f.second);
  return *this;
}

inline double OpTimes::Total() const {
  double total = 0;
  for (const auto& f : kOpTimeFields) total += this->*(f.second);
  return total;
}

using GradReadyFn = std::function<void(size_t param_index)>;

class Network {
 public:
  virtual ~Network() = default;
  // images (batch, C, H, W) plain NCHW fp32; labels (batch) in [0, classes).
  // Virtual workers: the step's m forwards pass group = 0..m-1 and groups = m; the running
  // statistics then get ONE momentum update with the mean of all m*batch/bn_group group
  // statistics (= the mean of m independent workers' running stats), and
  // num_batches_tracked grows by one per step.
  virtual absl::StatusOr<double> ForwardTrain(const float* images, const int32_t* labels, double normalizer,
                                              int group = 0, int groups = 1) = 0;
  virtual absl::Status Backward(const GradReadyFn& on_ready) = 0;
  // Inference-mode logits (batch, classes), row-major.
  virtual absl::Status Predict(const float* images, float* logits) = 0;
  virtual const OpTimes& times() const = 0;
  virtual void ResetTimes() = 0;
  virtual std::string Describe() const = 0;  // backend, layouts, threads (logged at start)
};

}  // namespace lmsgd::backend
