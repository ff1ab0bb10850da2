// SGD with momentum in the form of Goyal et al. (2017), section 2.1 and appendix B.
//
// The velocity holds lr-scaled updates, so a change of learning rate needs the momentum
// correction factor c = lr(t) / lr(t-1) (common/lr_schedule.h, MomentumCorrection):
//   u      = g + wd * w                     (wd = 0 for BN gamma/beta unless configured)
//   v_new  = m * c * v + lr * u
//   w     <- w - v_new                                  (plain momentum)
//   w     <- w - ((1 + m) * v_new - m * c * v)          (Nesterov, Caffe2's form)
// Weight decay is added to the gradient here, outside backprop: the loss is never scaled to
// fold it in. `g` must already be the gradient of the loss normalized by the global minibatch
// kn and summed over workers (the allreduce sums).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmsgd::optim {

enum class ParamKind { kWeight, kBias, kBnGamma, kBnBeta };

// A parameter tensor as flat fp32 storage; the optimizer does not own the memory.
struct ParamRef {
  std::string name;  // torchvision name, e.g. "layer1.0.bn3.weight"
  float* value = nullptr;
  const float* grad = nullptr;
  size_t size = 0;
  ParamKind kind = ParamKind::kWeight;
};

struct SgdConfig {
  double momentum = 0.9;
  bool nesterov = false;
  double weight_decay = 1e-4;
  bool weight_decay_on_bn = false;  // the paper: no decay on BN gamma and beta
};

// Whether a parameter of `kind` gets weight decay under `config` (the paper: none on BN gamma and
// beta unless configured). The one rule, for this optimizer and the GPU's fused update.
bool DecaysKind(ParamKind kind, const SgdConfig& config);

class Sgd {
 public:
  Sgd(SgdConfig config, std::vector<ParamRef> params);

  // One update with learning rate `lr` and momentum correction `correction` (= lr / previous
  // lr; 1 when the rate did not change). INVALID_ARGUMENT for a non-finite lr or correction.
  absl::Status Step(double lr, double correction);

  // Whether parameter i gets weight decay under this config.
  bool DecaysParam(size_t i) const;

  // Velocity buffers, one per parameter in construction order (checkpointing).
  const std::vector<std::vector<float>>& velocity() const { return velocity_; }
  // Restores velocities; the sizes must match (errors name the parameter).
  absl::Status SetVelocity(const std::vector<std::vector<float>>& velocity);
  const std::vector<ParamRef>& params() const { return params_; }

 private:
  SgdConfig config_;
  std::vector<ParamRef> params_;
  std::vector<std::vector<float>> velocity_;
};

}  // namespace lmsgd::optim
