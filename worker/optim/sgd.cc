#include "worker/optim/sgd.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace lmsgd::optim {

Sgd::Sgd(SgdConfig config, std::vector<ParamRef> params) : config_(config), params_(std::move(params)) {
  velocity_.reserve(params_.size());
  for (const auto& p : params_) velocity_.emplace_back(p.size, 0.0f);
}

bool DecaysKind(ParamKind kind, const SgdConfig& config) {
  if (kind == ParamKind::kBnGamma || kind == ParamKind::kBnBeta) return config.weight_decay_on_bn;
  return true;
}

bool Sgd::DecaysParam(size_t i) const { return DecaysKind(params_[i].kind, config_); }

absl::Status Sgd::Step(double lr, double correction) {
  if (!std::isfinite(lr) || !std::isfinite(correction)) {
    return absl::InvalidArgumentError(absl::StrCat("Sgd::Step: lr=", lr, " correction=", correction,
                                                   " must be finite"));
  }
  const float m = static_cast<float>(config_.momentum);
  const float c = static_cast<float>(correction);
  const float eta = static_cast<float>(lr);
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamRef& p = params_[i];
    const float wd = DecaysParam(i) ? static_cast<float>(config_.weight_decay) : 0.0f;
    float* w = p.value;
    const float* g = p.grad;
    float* v = velocity_[i].data();
    if (config_.nesterov) {
      for (size_t j = 0; j < p.size; ++j) {
        const float v_scaled = m * c * v[j];
        const float v_new = v_scaled + eta * (g[j] + wd * w[j]);
        w[j] -= (1.0f + m) * v_new - m * v_scaled;
        v[j] = v_new;
      }
    } else {
      for (size_t j = 0; j < p.size; ++j) {
        const float v_new = m * c * v[j] + eta * (g[j] + wd * w[j]);
        w[j] -= v_new;
        v[j] = v_new;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Sgd::SetVelocity(const std::vector<std::vector<float>>& velocity) {
  if (velocity.size() != params_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer state has ", velocity.size(),
                                                   " velocity tensors, the model has ", params_.size()));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (velocity[i].size() != params_[i].size) {
      return absl::InvalidArgumentError(absl::StrCat("velocity of '", params_[i].name, "' has ",
                                                     velocity[i].size(), " elements, expected ", params_[i].size));
    }
  }
  velocity_ = velocity;
  return absl::OkStatus();
}

}  // namespace lmsgd::optim
