#include "worker/model/param_store.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace lmsgd::model {

ParamStore::ParamStore(const ResNetSpec& spec) {
  param_specs_ = Parameters(spec);
  int64_t off = 0;
  for (size_t i = 0; i < param_specs_.size(); ++i) {
    param_offset_.push_back(off);
    param_index_[param_specs_[i].name] = i;
    off += param_specs_[i].numel();
  }
  params_.assign(static_cast<size_t>(off), 0.0f);
  grads_.assign(static_cast<size_t>(off), 0.0f);
  off = 0;
  for (const auto& b : Buffers(spec)) {
    if (b.shape.empty()) continue;  // num_batches_tracked: a counter, kept separately
    buffer_index_[b.name] = buffer_specs_.size();
    buffer_specs_.push_back(b);
    buffer_offset_.push_back(off);
    off += b.numel();
  }
  buffers_.assign(static_cast<size_t>(off), 0.0f);
}

absl::StatusOr<size_t> ParamStore::ParamIndex(const std::string& name) const {
  auto it = param_index_.find(name);
  if (it == param_index_.end()) return absl::NotFoundError(absl::StrCat("no parameter named '", name, "'"));
  return it->second;
}

absl::StatusOr<size_t> ParamStore::BufferIndex(const std::string& name) const {
  auto it = buffer_index_.find(name);
  if (it == buffer_index_.end()) return absl::NotFoundError(absl::StrCat("no buffer named '", name, "'"));
  return it->second;
}

float* ParamStore::ParamByName(const std::string& name) {
  auto i = ParamIndex(name);
  if (!i.ok()) LOG(FATAL) << i.status().ToString();
  return param(*i);
}
float* ParamStore::GradByName(const std::string& name) {
  auto i = ParamIndex(name);
  if (!i.ok()) LOG(FATAL) << i.status().ToString();
  return grad(*i);
}
float* ParamStore::BufferByName(const std::string& name) {
  auto i = BufferIndex(name);
  if (!i.ok()) LOG(FATAL) << i.status().ToString();
  return buffer(*i);
}

absl::Status ParamStore::Load(const std::map<std::string, std::vector<float>>& values) {
  auto copy = [&](const TensorSpec& s, float* dst) -> absl::Status {
    auto it = values.find(s.name);
    if (it == values.end()) return absl::InvalidArgumentError(absl::StrCat("missing tensor '", s.name, "'"));
    if (static_cast<int64_t>(it->second.size()) != s.numel()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", s.name, "' has ", it->second.size(), " elements, expected ", s.numel()));
    }
    std::copy(it->second.begin(), it->second.end(), dst);
    return absl::OkStatus();
  };
  for (size_t i = 0; i < param_specs_.size(); ++i) {
    RETURN_IF_ERROR(copy(param_specs_[i], param(i)));
  }
  for (size_t i = 0; i < buffer_specs_.size(); ++i) {
    RETURN_IF_ERROR(copy(buffer_specs_[i], buffer(i)));
  }
  return absl::OkStatus();
}

std::map<std::string, std::vector<float>> ParamStore::ToMap() const {
  std::map<std::string, std::vector<float>> out;
  for (size_t i = 0; i < param_specs_.size(); ++i) {
    const float* p = params_.data() + param_offset_[i];
    out[param_specs_[i].name] = std::vector<float>(p, p + param_specs_[i].numel());
  }
  for (size_t i = 0; i < buffer_specs_.size(); ++i) {
    const float* p = buffers_.data() + buffer_offset_[i];
    out[buffer_specs_[i].name] = std::vector<float>(p, p + buffer_specs_[i].numel());
  }
  return out;
}

std::vector<optim::ParamRef> ParamStore::OptimizerParams() {
  std::vector<optim::ParamRef> refs;
  for (size_t i = 0; i < param_specs_.size(); ++i) {
    refs.push_back({param_specs_[i].name, param(i), grad(i), static_cast<size_t>(param_specs_[i].numel()),
                    param_specs_[i].kind});
  }
  return refs;
}

}  // namespace lmsgd::model
