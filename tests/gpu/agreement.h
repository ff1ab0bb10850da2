// GPU vs float64-reference agreement for one small ResNet and precision: the loss, every
// parameter's gradient (relative error per tensor, ||gpu - ref|| / ||ref||), the stem BN's
// running statistics, inference logits, and one full GpuTrainer step (forward, backward,
// fused SGD) against the paper's update computed on the host from the reference gradients.
// Shared by the GPU unit test (tests/unit/worker/cuda_resnet_test.cc) and lmsgd-gpu-check.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "worker/backend/cuda/resnet.h"
#include "worker/model/resnet.h"

namespace lmsgd::gpucheck {

struct AgreementCase {
  model::Arch arch = model::Arch::kResNet8;
  int channels = 3, classes = 10, hw = 16, batch = 8, bn_group = 4;
  backend::cuda::Precision precision = backend::cuda::Precision::kFp32;
  std::string Name() const;
};

struct Agreement {
  double loss_gpu = 0, loss_ref = 0;
  double loss_rel = 0;        // |gpu - ref| / |ref|
  double grad_rel_max = 0;    // max over tensors of ||gpu - ref|| / ||ref||
  std::string grad_worst;     // the tensor where it happens
  int tensors = 0;
  double running_rel = 0;     // stem BN running mean/var
  double logits_rel = 0;      // inference logits after the step's running-stat update
  double step_rel = 0;        // GpuTrainer's parameter update vs the host's from reference grads
};

// Tolerances of issue 6: fp32 loss 1e-4, gradients 1e-3; bf16 2e-2 for both. tf32 is held to
// the bf16 bounds (10-bit mantissa inputs).
struct Tolerance {
  double loss = 1e-4, grad = 1e-3, other = 1e-4;
};
Tolerance ToleranceFor(backend::cuda::Precision p);
bool Passes(const Agreement& a, const Tolerance& t);

absl::StatusOr<Agreement> RunAgreement(const AgreementCase& c, int device = 0);

// The fused SGD kernel against optim::Sgd on random data over several steps with changing
// learning rate (momentum correction), plain and Nesterov: max relative error of the weights.
absl::StatusOr<double> SgdKernelAgreement(int device = 0);

}  // namespace lmsgd::gpucheck
