// Parameters for backend-vs-reference tests: the paper's initialization, but with every gamma
// non-zero, random betas and non-trivial running statistics, so that every branch carries
// gradient (the paper's zero-gamma init would make residual branches' gradients vanish).
#pragma once

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "worker/model/resnet.h"

namespace lmsgd::testing {

inline std::map<std::string, std::vector<float>> TestParams(const model::ResNetSpec& spec, uint64_t seed) {
  auto p = model::InitializeParameters(spec, {seed, /*zero_init_last_bn_gamma=*/false});
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> u(-0.2f, 0.2f);
  for (auto& [name, v] : p) {
    if (name.find(".bias") != std::string::npos && name != "fc.bias") {
      for (auto& x : v) x = u(rng);
    }
    if (name.find("bn") != std::string::npos && name.find(".weight") != std::string::npos) {
      for (auto& x : v) x = 1.0f + u(rng);
    }
    if (name.find("running_var") != std::string::npos) {
      for (auto& x : v) x = 1.0f + 2 * std::abs(u(rng));
    }
    if (name.find("running_mean") != std::string::npos) {
      for (auto& x : v) x = u(rng);
    }
  }
  return p;
}

}  // namespace lmsgd::testing
