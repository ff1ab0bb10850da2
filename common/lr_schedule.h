// The learning-rate schedule of Goyal et al. (2017), as a pure function of its parameters
// and the iteration. No protobuf, gRPC or I/O here: the GPU training core uses it as is.
//
//   peak    = base_lr * global_batch / reference_batch          (linear scaling rule, the default)
//             base_lr                                           (scaling kNone)
//             base_lr * sqrt(global_batch / reference_batch)   (scaling kSqrt)
//   warmup  = round(warmup_epochs * iterations_per_epoch) iterations
//   GRADUAL : lr(t) = base_lr + (peak - base_lr) * t / warmup    for t < warmup
//             (a constant increment every iteration; reaches peak at t = warmup)
//   CONSTANT: lr(t) = base_lr                                    for t < warmup
//   NONE    : no warmup
//   After warmup lr(t) = peak; every decay epoch e with t >= e * iterations_per_epoch
//   multiplies the rate by decay_factor (0.1 at 30, 60, 80 in the paper).
//   When peak <= base_lr (kn <= reference_batch) there is nothing to warm up: lr = peak.
//
// Momentum correction (paper section 2.1): with the velocity holding lr-scaled updates,
//   v <- m * (lr(t) / lr(t-1)) * v + lr(t) * (g + wd * w)
// MomentumCorrection(t) returns lr(t) / lr(t-1) (1 at t = 0).
//
// Elastic jobs: when a generation re-forms with k' workers the coordinator recomputes the
// schedule for kn' (linear scaling rule) and adds a short linear ramp ("re-warmup") from the
// rate the old generation had reached to the new one (rewarm_* fields).
#pragma once

#include <cstdint>
#include <vector>

namespace lmsgd {

enum class Warmup { kNone, kConstant, kGradual };
enum class LrScaling { kLinear, kNone, kSqrt };

struct LrScheduleParams {
  double base_lr = 0.1;
  uint64_t reference_batch = 256;
  uint64_t global_batch = 256;
  LrScaling scaling = LrScaling::kLinear;
  Warmup warmup = Warmup::kGradual;
  double warmup_epochs = 5;
  std::vector<uint32_t> decay_epochs = {30, 60, 80};
  double decay_factor = 0.1;
  uint64_t iterations_per_epoch = 1;
  // Elastic re-formation (kn changed): for t in [rewarm_start, rewarm_start + rewarm_iterations)
  // lr(t) = rewarm_from + (lr_schedule(t) - rewarm_from) * (t - rewarm_start) / rewarm_iterations.
  uint64_t rewarm_start = 0;
  uint64_t rewarm_iterations = 0;
  double rewarm_from = 0;
};

// base_lr scaled to global_batch by `scaling` (see the top of this file).
double PeakLearningRate(const LrScheduleParams& p);
// Number of warmup iterations: round(warmup_epochs * iterations_per_epoch).
uint64_t WarmupIterations(const LrScheduleParams& p);
// The rate used for the update of (0-based) iteration t.
double LearningRate(const LrScheduleParams& p, uint64_t iteration);
// lr(t) / lr(t-1), 1 for t = 0.
double MomentumCorrection(const LrScheduleParams& p, uint64_t iteration);

}  // namespace lmsgd
