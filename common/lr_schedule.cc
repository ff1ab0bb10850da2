#include "common/lr_schedule.h"

#include <cmath>

namespace lmsgd {

double PeakLearningRate(const LrScheduleParams& p) {
  const double ratio = static_cast<double>(p.global_batch) / static_cast<double>(p.reference_batch);
  switch (p.scaling) {
    case LrScaling::kNone: return p.base_lr;
    case LrScaling::kSqrt: return p.base_lr * std::sqrt(ratio);
    case LrScaling::kLinear: break;
  }
  return p.base_lr * ratio;
}

uint64_t WarmupIterations(const LrScheduleParams& p) {
  if (p.warmup == Warmup::kNone || p.warmup_epochs <= 0) return 0;
  return static_cast<uint64_t>(
      std::llround(p.warmup_epochs * static_cast<double>(p.iterations_per_epoch)));
}

double LearningRate(const LrScheduleParams& p, uint64_t iteration) {
  const double peak = PeakLearningRate(p);
  double decay = 1.0;
  for (uint32_t e : p.decay_epochs) {
    if (iteration >= static_cast<uint64_t>(e) * p.iterations_per_epoch) decay *= p.decay_factor;
  }
  const uint64_t warmup = WarmupIterations(p);
  double lr = peak;
  if (iteration < warmup && peak > p.base_lr) {
    if (p.warmup == Warmup::kGradual) {
      const double alpha = static_cast<double>(iteration) / static_cast<double>(warmup);
      lr = p.base_lr + (peak - p.base_lr) * alpha;
    } else if (p.warmup == Warmup::kConstant) {
      lr = p.base_lr;
    }
  }
  lr *= decay;
  if (p.rewarm_iterations > 0 && iteration >= p.rewarm_start && iteration < p.rewarm_start + p.rewarm_iterations) {
    const double alpha = static_cast<double>(iteration - p.rewarm_start) / static_cast<double>(p.rewarm_iterations);
    lr = p.rewarm_from + (lr - p.rewarm_from) * alpha;
  }
  return lr;
}

double MomentumCorrection(const LrScheduleParams& p, uint64_t iteration) {
  if (iteration == 0) return 1.0;
  const double prev = LearningRate(p, iteration - 1);
  if (prev == 0.0) return 1.0;
  return LearningRate(p, iteration) / prev;
}

}  // namespace lmsgd
