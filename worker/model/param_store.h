// A model's trainable state as flat fp32 arrays: parameters and their gradients in
// torchvision's state_dict order (model::Parameters), BN running statistics
// (model::Buffers without num_batches_tracked), and num_batches_tracked as one counter.
//
// Flat storage is what the rest of the system wants: the optimizer walks it, the gradient
// bucketer allreduces contiguous slices of `grads` in reverse order, checkpoints write it by
// name. Backends (oneDNN, cuDNN) read parameters from here and write gradients here, in
// torchvision's plain layouts (conv OIHW, fc (out, in)); blocked copies are their business.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/resnet.h"
#include "worker/optim/sgd.h"

namespace lmsgd::model {

class ParamStore {
 public:
  explicit ParamStore(const ResNetSpec& spec);

  const std::vector<TensorSpec>& param_specs() const { return param_specs_; }
  const std::vector<TensorSpec>& buffer_specs() const { return buffer_specs_; }
  size_t num_params() const { return param_specs_.size(); }
  int64_t param_offset(size_t i) const { return param_offset_[i]; }
  int64_t buffer_offset(size_t i) const { return buffer_offset_[i]; }

  // Index of a parameter / buffer by torchvision name; NOT_FOUND names it.
  absl::StatusOr<size_t> ParamIndex(const std::string& name) const;
  absl::StatusOr<size_t> BufferIndex(const std::string& name) const;
  float* param(size_t i) { return params_.data() + param_offset_[i]; }
  float* grad(size_t i) { return grads_.data() + param_offset_[i]; }
  float* buffer(size_t i) { return buffers_.data() + buffer_offset_[i]; }
  // Pointer to a parameter or buffer by name; aborts on an unknown name (a programming error).
  float* ParamByName(const std::string& name);
  float* GradByName(const std::string& name);
  float* BufferByName(const std::string& name);

  std::vector<float>& params() { return params_; }
  std::vector<float>& grads() { return grads_; }
  std::vector<float>& buffers() { return buffers_; }
  const std::vector<float>& params() const { return params_; }
  const std::vector<float>& grads() const { return grads_; }
  const std::vector<float>& buffers() const { return buffers_; }
  int64_t num_batches_tracked() const { return num_batches_tracked_; }
  void set_num_batches_tracked(int64_t n) { num_batches_tracked_ = n; }

  // Copies every parameter and buffer from `values` (as InitializeParameters returns);
  // a missing name or a size mismatch is INVALID_ARGUMENT naming the tensor.
  absl::Status Load(const std::map<std::string, std::vector<float>>& values);
  // Parameters and buffers by name (the inverse of Load).
  std::map<std::string, std::vector<float>> ToMap() const;

  // ParamRefs over the flat arrays for the optimizer.
  std::vector<optim::ParamRef> OptimizerParams();

 private:
  std::vector<TensorSpec> param_specs_, buffer_specs_;
  std::vector<int64_t> param_offset_, buffer_offset_;
  std::map<std::string, size_t> param_index_, buffer_index_;
  std::vector<float> params_, grads_, buffers_;
  int64_t num_batches_tracked_ = 0;
};

}  // namespace lmsgd::model
