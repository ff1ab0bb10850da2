// Batch-norm running statistics, one rule for every backend (host code and CUDA kernels).
//
// Per-worker BN (the paper): each BN group g of each of a step's `vw_count` virtual workers j
// computes its batch statistics s_{j,g} over `count` values; the running value moves as
//   r <- m r + (1 - m) mean_{j,g}(s_{j,g})        (variance: unbiased, times count/(count-1))
// applied piecewise, one virtual worker at a time: the first decays r and adds its share, the
// others add theirs, each share = RunningStatWeight * sum_g s_{j,g}.
#pragma once

#if defined(__CUDACC__)
#define LMSGD_HOST_DEVICE __host__ __device__
#else
#define LMSGD_HOST_DEVICE
#endif

namespace lmsgd::backend {

// Bessel's correction for a variance over `count` values (0 when count <= 1).
LMSGD_HOST_DEVICE inline double UnbiasFactor(double count) { return count > 1 ? count / (count - 1) : 0.0; }

// The weight of one group's statistic in the running mean of a step.
LMSGD_HOST_DEVICE inline double RunningStatWeight(double momentum, int groups, int vw_count) {
  return (1.0 - momentum) / (static_cast<double>(groups) * vw_count);
}

// `running` after virtual worker `vw_index` adds its share `weighted_sum`.
LMSGD_HOST_DEVICE inline float UpdateRunningStat(float running, double momentum, double weighted_sum, int vw_index) {
  return static_cast<float>(vw_index == 0 ? momentum * running + weighted_sum : running + weighted_sum);
}

}  // namespace lmsgd::backend
