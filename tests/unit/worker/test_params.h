// Parameters for backend-vs-reference tests: the paper's initialization, but with every gamma
// non-zero, random betas and non-trivial running statistics, so that every branch carries
// gradient (the paper's zero-gamma init would make residual branches' gradients vanish).
#pragma once

#include <cmath>
#include <cstdint>
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

// A batch for the same tests: N(0, 1) images (batch, channels, hw, hw) from a fixed seed and
// labels (7 i + 3) mod classes.
inline void TestBatch(int batch, int channels, int hw, int classes, std::vector<float>* images,
                      std::vector<int32_t>* labels) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  images->resize(static_cast<size_t>(batch) * channels * hw * hw);
  for (auto& v : *images) v = nd(rng);
  labels->resize(batch);
  for (int i = 0; i < batch; ++i) (*labels)[i] = (i * 7 + 3) % classes;
}

}  // namespace lmsgd::testing
