// CUDA kernels of our own for the GPU ResNet (cuDNN does the convolutions, everything else is here):
// batch norm (statistics per group of samples, fused residual add and ReLU), max pool,
// global average pool, softmax cross-entropy, the FC layer (GEMM, bias), layout/precision casts
// and the fused SGD update.
//
// Activations are NHWC ("rows" of C channels, rows = N*H*W) in fp32 or bf16 (DType);
// statistics, scales, parameters, gradients and the optimizer state are fp32; reductions
// (BN statistics and their gradients, the loss) accumulate in fp64 so that fp32 results agree
// with the float64 reference to rounding.
//
// Every launcher enqueues on `stream` and returns the launch status (cudaGetLastError) as a
// Status naming the kernel; nothing here synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace lmsgd::backend::cuda {

enum class DType { kF32, kBF16 };
inline size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// --- batch norm --------------------------------------------------------------------------
// Shapes: x, y (rows, C) with rows = groups * rows_per_group (a group = bn_group samples x HW).
struct BnShape {
  int64_t rows_per_group = 0;  // bn_group * H * W
  int groups = 1;              // batch / bn_group
  int channels = 0;
};

// Scratch the BN launchers need (device): 2 * groups * C doubles.
size_t BnScratchDoubles(const BnShape& s);

// Training forward. Computes per-group mean and inverse std (biased variance, eps) into
// save_mean / save_invstd (groups * C floats, for backward), y = act(gamma * xhat + beta (+
// residual)) with act = ReLU when `relu`. Running statistics (C floats) are updated as
//   first virtual worker (vw_index == 0): r <- momentum * r + w * sum_g s_g
//   later ones:                            r <- r + w * sum_g s_g,   w = (1 - momentum) / (groups * vw_count)
// with s_g the group's mean and UNBIASED variance (the oneDNN backend's rule), so after the
// step's vw_count forwards r = m r + (1 - m) * mean of all group statistics.
absl::Status BnForwardTrain(DType t, const BnShape& s, const void* x, const float* gamma, const float* beta,
                            const void* residual, bool relu, void* y, float* save_mean, float* save_invstd,
                            float* running_mean, float* running_var, double eps, double momentum, int vw_index,
                            int vw_count, double* scratch, cudaStream_t stream);
// Inference: y = act(gamma * (x - rm) / sqrt(rv + eps) + beta (+ residual)). `scale_shift`
// is scratch for 2 * C floats.
absl::Status BnForwardInference(DType t, int64_t rows, int channels, const void* x, const float* gamma,
                                const float* beta, const float* running_mean, const float* running_var, double eps,
                                const void* residual, bool relu, void* y, float* scale_shift, cudaStream_t stream);
// Backward of BnForwardTrain (without the residual: the caller passes dz = dy * [y > 0] for
// an add+ReLU output). With `relu_y` non-null the incoming gradient is first masked by
// relu_y > 0 (BN followed by ReLU). Writes dx (rows, C) and dgamma / dbeta (C), summed over
// groups; with `accumulate` dgamma / dbeta are added to what is there.
absl::Status BnBackward(DType t, const BnShape& s, const void* dy, const void* relu_y, const void* x,
                        const float* gamma, const float* save_mean, const float* save_invstd, void* dx,
                        float* dgamma, float* dbeta, bool accumulate, double* scratch, cudaStream_t stream);
// dz = dy * [y > 0], n elements.
absl::Status ReluMask(DType t, size_t n, const void* dy, const void* y, void* dz, cudaStream_t stream);

// --- pooling -----------------------------------------------------------------------------
struct PoolShape {
  int n = 0, h = 0, w = 0, c = 0;
  int kernel = 3, stride = 2, padding = 1;
  int out_h() const { return (h + 2 * padding - kernel) / stride + 1; }
  int out_w() const { return (w + 2 * padding - kernel) / stride + 1; }
};
// y (n, out_h, out_w, c); argmax: index (0..kernel^2-1) of the winning window position.
absl::Status MaxPoolForward(DType t, const PoolShape& s, const void* x, void* y, uint8_t* argmax, cudaStream_t stream);
// dx (n, h, w, c) = sum of dy over the windows whose argmax is that input (gather: no atomics).
absl::Status MaxPoolBackward(DType t, const PoolShape& s, const void* dy, const uint8_t* argmax, void* dx,
                             cudaStream_t stream);
// x (n, hw, c) -> y (n, c) fp32 mean over hw.
absl::Status GlobalAvgPoolForward(DType t, int n, int hw, int c, const void* x, float* y, cudaStream_t stream);
// dy (n, c) fp32 -> dx (n, hw, c) = dy / hw.
absl::Status GlobalAvgPoolBackward(DType t, int n, int hw, int c, const float* dy, void* dx, cudaStream_t stream);

// --- head --------------------------------------------------------------------------------
// logits (n, k) fp32, labels (n) in [0, k): *loss = sum_i (logsumexp_i - logit_i[label]) /
// normalizer (fp64, deterministic), dlogits = (softmax - onehot) / normalizer.
// `row_loss` is scratch for n doubles.
absl::Status SoftmaxCrossEntropy(int n, int k, const float* logits, const int32_t* labels, double normalizer,
                                 float* dlogits, double* row_loss, double* loss, cudaStream_t stream);
// db (k) = sum over n of dlogits (n, k) (+= with accumulate).
absl::Status BiasGradient(int n, int k, const float* dlogits, float* db, bool accumulate, cudaStream_t stream);
// Row-major fp32 GEMM for the FC layer: C (m x n) = op(A) (m x k) * op(B) (k x n) + beta * C,
// op(A)[i][p] = trans_a ? A[p * lda + i] : A[i * lda + p], likewise B. Our own tiled kernel
// rather than cuBLAS: libcublasLt's 94 KB of static TLS does not fit the 100 KB thread stacks
// of civetweb (the Prometheus endpoint of lmsgd-worker), and the FC is < 1% of a step.
absl::Status Sgemm(bool trans_a, bool trans_b, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                   float beta, float* c, int ldc, cudaStream_t stream);
// y (n, k) += bias (k) broadcast over rows.
absl::Status AddBias(int n, int k, const float* bias, float* y, cudaStream_t stream);

// --- layouts and precisions --------------------------------------------------------------
// images (n, c, h, w) fp32 -> (n, h, w, c_out) in t, channels c..c_out-1 zero (c_out >= c: the
// stem's input padded to an aligned channel count).
absl::Status NchwToNhwc(DType t, int n, int c, int h, int w, int c_out, const float* in, void* out,
                        cudaStream_t stream);
// Per-channel affine map of 8-bit pixels: value * mul[c] + add[c] (normalization).
struct PixelAffine {
  float mul[4] = {1, 1, 1, 1};
  float add[4] = {0, 0, 0, 0};
};
// out (n, h, w, c_out) in t = in (n, h, w, c) uint8 mapped by `affine` (c <= 4), channels
// c..c_out-1 zero: the GPU side of uint8 input staging.
absl::Status PixelsToNhwc(DType t, size_t pixels, int c, int c_out, const PixelAffine& affine, const uint8_t* in,
                          void* out, cudaStream_t stream);
// dst (rows, cp) in t = src (rows, c) fp32, channels c..cp-1 zero (padded stem weights).
absl::Status PadChannels(DType t, size_t rows, int c, int cp, const float* src, void* dst, cudaStream_t stream);
// dst (rows, c) fp32 = (or += with accumulate) src (rows, cp) in t; channels c..cp-1 dropped.
absl::Status UnpadChannels(DType t, size_t rows, int c, int cp, const void* src, float* dst, bool accumulate,
                           cudaStream_t stream);
// out (t) = in (fp32), n elements.
absl::Status CastFromFloat(DType t, size_t n, const float* in, void* out, cudaStream_t stream);
// out (fp32) = in (t), or out += in with accumulate.
absl::Status CastToFloat(DType t, size_t n, const void* in, float* out, bool accumulate, cudaStream_t stream);

// --- optimizer ---------------------------------------------------------------------------
// One chunk of at most kSgdChunk elements of one parameter tensor, with its weight decay.
struct SgdChunk {
  int64_t offset = 0;
  int32_t count = 0;
  float weight_decay = 0;
};
constexpr int kSgdChunk = 1 << 16;
// The paper's SGD (worker/optim/sgd.h) over every chunk in one launch, each element touched
// once: u = g + wd w; v' = m c v + lr u; w -= v' (Nesterov: w -= (1 + m) v' - m c v); v = v'.
absl::Status SgdUpdate(const SgdChunk* chunks, int num_chunks, float* params, const float* grads, float* velocity,
                       float lr, float momentum, float correction, bool nesterov, cudaStream_t stream);

}  // namespace lmsgd::backend::cuda
