#include "worker/backend/cuda/kernels.h"

#include <cuda_bf16.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "worker/backend/bn_running_stats.h"
#include "worker/backend/cuda/cuda_check.h"
#include "common/status_macros.h"

namespace lmsgd::backend::cuda {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float Load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float Load(const bf16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void Store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void Store(bf16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// A kernel launch's error (cudaGetLastError) as a Status naming the kernel and the launch site.
#define LMSGD_LAUNCHED(kernel) CudaStatus(cudaGetLastError(), "launching " kernel, __FILE__, __LINE__)

unsigned Blocks(size_t n, int threads, size_t cap = 65535u * 32u) {
  size_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<size_t>(1, std::min(b, cap)));
}

// Dispatch on the activation type: F(tag) with T = float or bf16.
#define LMSGD_DISPATCH(t, ...)                 \
  do {                                         \
    if ((t) == DType::kF32) {                  \
      using T = float;                         \
      __VA_ARGS__;                             \
    } else {                                   \
      using T = bf16;                          \
      __VA_ARGS__;                             \
    }                                          \
  } while (false)

// ---- BN reductions ----------------------------------------------------------------------
// Block (32, 8): 32 consecutive channels x 8 rows; grid (ceil(C/32), chunks, groups). Each
// block sums its chunk of rows and adds its partial to acc[(g*C + c)*2 + {0,1}] (fp64).
constexpr int kBnRowsPerBlock = 8;

// Adds the block's column sums of (a, b) over its kBnRowsPerBlock rows to acc[index],
// acc[index + 1] (fp64 atomics); `active`: this thread's channel exists.
__device__ __forceinline__ void BlockSumPairInto(double a, double b, bool active, double* acc, size_t index) {
  __shared__ double sh[2][kBnRowsPerBlock][32];
  sh[0][threadIdx.y][threadIdx.x] = a;
  sh[1][threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (int k = 1; k < kBnRowsPerBlock; ++k) {
      a += sh[0][k][threadIdx.x];
      b += sh[1][k][threadIdx.x];
    }
    atomicAdd(&acc[index], a);
    atomicAdd(&acc[index + 1], b);
  }
}

int BnChunks(const BnShape& s) {
  const int cblocks = (s.channels + 31) / 32;
  const int64_t target = std::max<int64_t>(1, 2048 / (static_cast<int64_t>(cblocks) * s.groups));
  const int64_t by_rows = (s.rows_per_group + 255) / 256;
  return static_cast<int>(std::max<int64_t>(1, std::min(target, by_rows)));
}

template <typename T>
__global__ void BnStatsKernel(const T* __restrict__ x, int64_t rows_per_group, int C, int64_t chunk_rows,
                              double* __restrict__ acc) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int g = blockIdx.z;
  const int64_t r0 = blockIdx.y * chunk_rows;
  const int64_t r1 = min(r0 + chunk_rows, rows_per_group);
  double s = 0, q = 0;
  if (c < C) {
    const T* base = x + static_cast<size_t>(g) * rows_per_group * C;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBnRowsPerBlock) {
      const double v = Load(base, static_cast<size_t>(r) * C + c);
      s += v;
      q += v * v;
    }
  }
  BlockSumPairInto(s, q, c < C, acc, (static_cast<size_t>(g) * C + c) * 2);
}

// One thread per channel: statistics of every group, the scale/shift the apply kernel uses
// (written over the group's two fp64 sums as four floats: scale, shift), running statistics.
__global__ void BnFinalizeForwardKernel(double* acc, int groups, int C, int64_t rows_per_group, const float* gamma,
                                        const float* beta, float* save_mean, float* save_invstd, float* running_mean,
                                        float* running_var, double eps, double momentum, int vw_index, int vw_count) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double M = static_cast<double>(rows_per_group);
  const double unbias = ::lmsgd::backend::UnbiasFactor(M);
  double sum_mean = 0, sum_var = 0;
  for (int g = 0; g < groups; ++g) {
    const size_t e = static_cast<size_t>(g) * C + c;
    const double mean = acc[e * 2] / M;
    const double var = fmax(acc[e * 2 + 1] / M - mean * mean, 0.0);
    const double invstd = 1.0 / sqrt(var + eps);
    save_mean[e] = static_cast<float>(mean);
    save_invstd[e] = static_cast<float>(invstd);
    const double scale = gamma[c] * invstd;
    float* f = reinterpret_cast<float*>(acc + e * 2);
    f[0] = static_cast<float>(scale);
    f[1] = static_cast<float>(beta[c] - mean * scale);
    sum_mean += mean;
    sum_var += var * unbias;
  }
  const double w = ::lmsgd::backend::RunningStatWeight(momentum, groups, vw_count);
  running_mean[c] = ::lmsgd::backend::UpdateRunningStat(running_mean[c], momentum, w * sum_mean, vw_index);
  running_var[c] = ::lmsgd::backend::UpdateRunningStat(running_var[c], momentum, w * sum_var, vw_index);
}

// y = act(x * scale[g][c] + shift[g][c] (+ residual)); scale/shift as 4 floats per (g, c)
// (stride 4) so that the forward scratch can be reused.
template <typename T>
__global__ void BnApplyKernel(const T* __restrict__ x, const float* __restrict__ ss, int ss_stride,
                              const T* __restrict__ residual, bool relu, T* __restrict__ y, size_t total, int C,
                              int64_t rows_per_group) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / C;
    const int c = static_cast<int>(i - row * C);
    const size_t g = row / rows_per_group;
    const float* e = ss + (g * C + c) * ss_stride;
    float v = Load(x, i) * e[0] + e[1];
    if (residual) v += Load(residual, i);
    if (relu) v = fmaxf(v, 0.0f);
    Store(y, i, v);
  }
}

__global__ void BnInferenceScaleKernel(int C, const float* gamma, const float* beta, const float* rm, const float* rv,
                                       double eps, float* ss) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double scale = gamma[c] / sqrt(static_cast<double>(rv[c]) + eps);
  ss[c * 2] = static_cast<float>(scale);
  ss[c * 2 + 1] = static_cast<float>(beta[c] - rm[c] * scale);
}

template <typename T>
__device__ __forceinline__ float MaskedGrad(const T* dy, const T* relu_y, size_t i) {
  float d = Load(dy, i);
  if (relu_y && !(Load(relu_y, i) > 0.0f)) d = 0.0f;
  return d;
}

template <typename T>
__global__ void BnBackwardReduceKernel(const T* __restrict__ dy, const T* __restrict__ relu_y, const T* __restrict__ x,
                                       const float* __restrict__ save_mean, const float* __restrict__ save_invstd,
                                       int64_t rows_per_group, int C, int64_t chunk_rows, double* __restrict__ acc) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int g = blockIdx.z;
  const int64_t r0 = blockIdx.y * chunk_rows;
  const int64_t r1 = min(r0 + chunk_rows, rows_per_group);
  double s1 = 0, s2 = 0;
  if (c < C) {
    const size_t e = static_cast<size_t>(g) * C + c;
    const float mean = save_mean[e], invstd = save_invstd[e];
    const size_t base = static_cast<size_t>(g) * rows_per_group * C;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBnRowsPerBlock) {
      const size_t i = base + static_cast<size_t>(r) * C + c;
      const float d = MaskedGrad(dy, relu_y, i);
      const float xhat = (Load(x, i) - mean) * invstd;
      s1 += d;
      s2 += static_cast<double>(d) * xhat;
    }
  }
  BlockSumPairInto(s1, s2, c < C, acc, (static_cast<size_t>(g) * C + c) * 2);
}

// Per channel: dgamma = sum_g s2, dbeta = sum_g s1; per (g, c) the dx coefficients
// (gamma*invstd, s1/M, s2/M) written over the fp64 sums as floats [0..2] of 4.
__global__ void BnFinalizeBackwardKernel(double* acc, int groups, int C, int64_t rows_per_group, const float* gamma,
                                         const float* save_invstd, float* dgamma, float* dbeta, bool accumulate) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double M = static_cast<double>(rows_per_group);
  double dg = 0, db = 0;
  for (int g = 0; g < groups; ++g) {
    const size_t e = static_cast<size_t>(g) * C + c;
    const double s1 = acc[e * 2], s2 = acc[e * 2 + 1];
    dg += s2;
    db += s1;
    float* f = reinterpret_cast<float*>(acc + e * 2);
    f[0] = static_cast<float>(gamma[c] * static_cast<double>(save_invstd[e]));
    f[1] = static_cast<float>(s1 / M);
    f[2] = static_cast<float>(s2 / M);
  }
  dgamma[c] = static_cast<float>(accumulate ? dgamma[c] + dg : dg);
  dbeta[c] = static_cast<float>(accumulate ? dbeta[c] + db : db);
}

template <typename T>
__global__ void BnBackwardDataKernel(const T* __restrict__ dy, const T* __restrict__ relu_y, const T* __restrict__ x,
                                     const float* __restrict__ save_mean, const float* __restrict__ save_invstd,
                                     const float* __restrict__ coef, T* __restrict__ dx, size_t total, int C,
                                     int64_t rows_per_group) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / C;
    const int c = static_cast<int>(i - row * C);
    const size_t e = (row / rows_per_group) * C + c;
    const float* k = coef + e * 4;
    const float xhat = (Load(x, i) - save_mean[e]) * save_invstd[e];
    const float d = MaskedGrad(dy, relu_y, i);
    Store(dx, i, k[0] * (d - k[1] - xhat * k[2]));
  }
}

template <typename T>
__global__ void ReluMaskKernel(size_t n, const T* dy, const T* y, T* dz) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    Store(dz, i, Load(y, i) > 0.0f ? Load(dy, i) : 0.0f);
  }
}

// ---- pooling ----------------------------------------------------------------------------
template <typename T>
__global__ void MaxPoolForwardKernel(PoolShape s, const T* __restrict__ x, T* __restrict__ y, uint8_t* argmax,
                                     size_t total) {
  const int OH = (s.h + 2 * s.padding - s.kernel) / s.stride + 1, OW = (s.w + 2 * s.padding - s.kernel) / s.stride + 1;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % s.c);
    size_t r = i / s.c;
    const int ow = static_cast<int>(r % OW);
    r /= OW;
    const int oh = static_cast<int>(r % OH);
    const int n = static_cast<int>(r / OH);
    float best = -INFINITY;
    int best_k = 0;
    bool found = false;
    for (int kh = 0; kh < s.kernel; ++kh) {
      const int h = oh * s.stride - s.padding + kh;
      if (h < 0 || h >= s.h) continue;
      for (int kw = 0; kw < s.kernel; ++kw) {
        const int w = ow * s.stride - s.padding + kw;
        if (w < 0 || w >= s.w) continue;
        const float v = Load(x, ((static_cast<size_t>(n) * s.h + h) * s.w + w) * s.c + c);
        if (!found || v > best) {
          best = v;
          best_k = kh * s.kernel + kw;
          found = true;
        }
      }
    }
    Store(y, i, best);
    argmax[i] = static_cast<uint8_t>(best_k);
  }
}

template <typename T>
__global__ void MaxPoolBackwardKernel(PoolShape s, const T* __restrict__ dy, const uint8_t* __restrict__ argmax,
                                      T* __restrict__ dx, size_t total) {
  const int OH = (s.h + 2 * s.padding - s.kernel) / s.stride + 1, OW = (s.w + 2 * s.padding - s.kernel) / s.stride + 1;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % s.c);
    size_t r = i / s.c;
    const int w = static_cast<int>(r % s.w);
    r /= s.w;
    const int h = static_cast<int>(r % s.h);
    const int n = static_cast<int>(r / s.h);
    // Outputs whose window covers (h, w): oh * stride - padding <= h <= oh * stride - padding + kernel - 1.
    const int oh_lo = max(0, (h + s.padding - s.kernel + s.stride) / s.stride);
    const int oh_hi = min(OH - 1, (h + s.padding) / s.stride);
    const int ow_lo = max(0, (w + s.padding - s.kernel + s.stride) / s.stride);
    const int ow_hi = min(OW - 1, (w + s.padding) / s.stride);
    float sum = 0;
    for (int oh = oh_lo; oh <= oh_hi; ++oh) {
      const int kh = h - (oh * s.stride - s.padding);
      if (kh < 0 || kh >= s.kernel) continue;
      for (int ow = ow_lo; ow <= ow_hi; ++ow) {
        const int kw = w - (ow * s.stride - s.padding);
        if (kw < 0 || kw >= s.kernel) continue;
        const size_t o = ((static_cast<size_t>(n) * OH + oh) * OW + ow) * s.c + c;
        if (argmax[o] == kh * s.kernel + kw) sum += Load(dy, o);
      }
    }
    Store(dx, i, sum);
  }
}

template <typename T>
__global__ void GapForwardKernel(int n, int hw, int c, const T* __restrict__ x, float* __restrict__ y) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(n) * c) return;
  const size_t s = i / c;
  const int ch = static_cast<int>(i - s * c);
  float sum = 0;
  for (int p = 0; p < hw; ++p) sum += Load(x, (s * hw + p) * c + ch);
  y[i] = sum / static_cast<float>(hw);
}

template <typename T>
__global__ void GapBackwardKernel(int n, int hw, int c, const float* __restrict__ dy, T* __restrict__ dx) {
  const size_t total = static_cast<size_t>(n) * hw * c;
  const float inv = 1.0f / static_cast<float>(hw);
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int ch = static_cast<int>(i % c);
    const size_t s = i / (static_cast<size_t>(hw) * c);
    Store(dx, i, dy[s * c + ch] * inv);
  }
}

// ---- head -------------------------------------------------------------------------------
template <typename V, typename Op>
__device__ V BlockReduce(V v, Op op, V identity, V* shared /* 32 */) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  v = lane < warps ? shared[lane] : identity;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

// One block per row.
__global__ void SoftmaxCeKernel(int k, const float* __restrict__ logits, const int32_t* __restrict__ labels,
                                double normalizer, float* __restrict__ dlogits, double* __restrict__ row_loss) {
  __shared__ float shf[32];
  __shared__ double shd[32];
  const int row = blockIdx.x;
  const float* z = logits + static_cast<size_t>(row) * k;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < k; j += blockDim.x) mx = fmaxf(mx, z[j]);
  mx = BlockReduce(mx, [](float a, float b) { return fmaxf(a, b); }, -INFINITY, shf);
  double sum = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) sum += exp(static_cast<double>(z[j]) - mx);
  sum = BlockReduce(sum, [](double a, double b) { return a + b; }, 0.0, shd);
  const double log_sum = log(sum) + mx;
  const int label = labels[row];
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const double p = exp(static_cast<double>(z[j]) - log_sum);
    dlogits[static_cast<size_t>(row) * k + j] = static_cast<float>((p - (j == label ? 1.0 : 0.0)) / normalizer);
  }
  if (threadIdx.x == 0) row_loss[row] = log_sum - z[label];
}

// One thread: the rows' losses summed in order (deterministic).
__global__ void SumLossKernel(int n, const double* row_loss, double normalizer, double* loss) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += row_loss[i];
  *loss = s / normalizer;
}

__global__ void BiasGradKernel(int n, int k, const float* dlogits, float* db, bool accumulate) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= k) return;
  float s = 0;
  for (int i = 0; i < n; ++i) s += dlogits[static_cast<size_t>(i) * k + j];
  db[j] = accumulate ? db[j] + s : s;
}

// 64 x 64 tile of C per block of 256 threads, 4 x 4 outputs per thread, k in steps of 16.
constexpr int kGemmTile = 64, kGemmK = 16;
__global__ void SgemmKernel(bool trans_a, bool trans_b, int M, int N, int K, const float* __restrict__ A, int lda,
                            const float* __restrict__ B, int ldb, float beta, float* __restrict__ C, int ldc) {
  __shared__ float as[kGemmK][kGemmTile + 1];  // as[p][i] = op(A)[row0 + i][k0 + p]
  __shared__ float bs[kGemmK][kGemmTile + 1];  // bs[p][j] = op(B)[k0 + p][col0 + j]
  const int row0 = blockIdx.y * kGemmTile, col0 = blockIdx.x * kGemmTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // this thread: rows ty + 16 r, cols tx + 16 c
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kGemmK) {
    for (int e = threadIdx.x; e < kGemmTile * kGemmK; e += blockDim.x) {
      const int i = e % kGemmTile, p = e / kGemmTile;
      const int gi = row0 + i, gp = k0 + p;
      float va = 0;
      if (gi < M && gp < K) va = trans_a ? A[static_cast<size_t>(gp) * lda + gi] : A[static_cast<size_t>(gi) * lda + gp];
      as[p][i] = va;
      const int gj = col0 + i;
      float vb = 0;
      if (gj < N && gp < K) vb = trans_b ? B[static_cast<size_t>(gj) * ldb + gp] : B[static_cast<size_t>(gp) * ldb + gj];
      bs[p][i] = vb;
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < kGemmK; ++p) {
      float a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = as[p][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = bs[p][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int i = row0 + ty + 16 * r, j = col0 + tx + 16 * c;
      if (i < M && j < N) {
        float* out = C + static_cast<size_t>(i) * ldc + j;
        *out = beta == 0.0f ? acc[r][c] : acc[r][c] + beta * *out;
      }
    }
  }
}

__global__ void AddBiasKernel(int n, int k, const float* bias, float* y) {
  const size_t total = static_cast<size_t>(n) * k;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    y[i] += bias[i % k];
  }
}

// ---- layouts, casts ---------------------------------------------------------------------
template <typename T>
__global__ void NchwToNhwcKernel(int n, int c, int h, int w, int c_out, const float* __restrict__ in,
                                 T* __restrict__ out) {
  const size_t total = static_cast<size_t>(n) * c_out * h * w;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    // i indexes the output (n, h, w, c_out).
    const int ch = static_cast<int>(i % c_out);
    size_t r = i / c_out;
    const int x = static_cast<int>(r % w);
    r /= w;
    const int y = static_cast<int>(r % h);
    const size_t s = r / h;
    Store(out, i, ch < c ? in[((s * c + ch) * h + y) * w + x] : 0.0f);
  }
}

template <typename T>
__global__ void PixelsToNhwcKernel(size_t pixels, int c, int c_out, PixelAffine affine,
                                   const uint8_t* __restrict__ in, T* __restrict__ out) {
  const size_t total = pixels * c_out;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t px = i / c_out;
    const int ch = static_cast<int>(i - px * c_out);
    Store(out, i, ch < c ? in[px * c + ch] * affine.mul[ch] + affine.add[ch] : 0.0f);
  }
}

template <typename T>
__global__ void PadChannelsKernel(size_t rows, int c, int cp, const float* __restrict__ src, T* __restrict__ dst) {
  const size_t total = rows * cp;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / cp;
    const int ch = static_cast<int>(i - row * cp);
    Store(dst, i, ch < c ? src[row * c + ch] : 0.0f);
  }
}

template <typename T>
__global__ void UnpadChannelsKernel(size_t rows, int c, int cp, const T* __restrict__ src, float* __restrict__ dst,
                                    bool accumulate) {
  const size_t total = rows * c;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / c;
    const int ch = static_cast<int>(i - row * c);
    const float v = Load(src, row * cp + ch);
    dst[i] = accumulate ? dst[i] + v : v;
  }
}

template <typename T>
__global__ void CastFromFloatKernel(size_t n, const float* __restrict__ in, T* __restrict__ out) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    Store(out, i, in[i]);
  }
}

template <typename T>
__global__ void CastToFloatKernel(size_t n, const T* __restrict__ in, float* __restrict__ out, bool accumulate) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float v = Load(in, i);
    out[i] = accumulate ? out[i] + v : v;
  }
}

__global__ void SgdKernel(const SgdChunk* __restrict__ chunks, float* __restrict__ w, const float* __restrict__ g,
                          float* __restrict__ v, float lr, float m, float c, bool nesterov) {
  const SgdChunk ch = chunks[blockIdx.x];
  const float mc = m * c;
  for (int j = threadIdx.x; j < ch.count; j += blockDim.x) {
    const size_t i = static_cast<size_t>(ch.offset) + j;
    const float wi = w[i];
    const float v_scaled = mc * v[i];
    const float v_new = v_scaled + lr * (g[i] + ch.weight_decay * wi);
    w[i] = nesterov ? wi - ((1.0f + m) * v_new - m * v_scaled) : wi - v_new;
    v[i] = v_new;
  }
}

}  // namespace

size_t BnScratchDoubles(const BnShape& s) { return 2 * static_cast<size_t>(s.groups) * s.channels; }

absl::Status BnForwardTrain(DType t, const BnShape& s, const void* x, const float* gamma, const float* beta,
                            const void* residual, bool relu, void* y, float* save_mean, float* save_invstd,
                            float* running_mean, float* running_var, double eps, double momentum, int vw_index,
                            int vw_count, double* scratch, cudaStream_t stream) {
  const int C = s.channels;
  RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(scratch, 0, BnScratchDoubles(s) * sizeof(double), stream), "cudaMemsetAsync (BN statistics)", __FILE__, __LINE__));
  const int chunks = BnChunks(s);
  const int64_t chunk_rows = (s.rows_per_group + chunks - 1) / chunks;
  const dim3 grid((C + 31) / 32, chunks, s.groups), block(32, kBnRowsPerBlock);
  LMSGD_DISPATCH(t, BnStatsKernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(x), s.rows_per_group, C,
                                                                  chunk_rows, scratch));
  RETURN_IF_ERROR(LMSGD_LAUNCHED("BnStatsKernel"));
  BnFinalizeForwardKernel<<<(C + 127) / 128, 128, 0, stream>>>(scratch, s.groups, C, s.rows_per_group, gamma, beta,
                                                               save_mean, save_invstd, running_mean, running_var, eps,
                                                               momentum, vw_index, vw_count);
  RETURN_IF_ERROR(LMSGD_LAUNCHED("BnFinalizeForwardKernel"));
  const size_t total = static_cast<size_t>(s.rows_per_group) * s.groups * C;
  LMSGD_DISPATCH(t, BnApplyKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(
                        static_cast<const T*>(x), reinterpret_cast<const float*>(scratch), 4,
                        static_cast<const T*>(residual), relu, static_cast<T*>(y), total, C, s.rows_per_group));
  return LMSGD_LAUNCHED("BnApplyKernel (forward)");
}

absl::Status BnForwardInference(DType t, int64_t rows, int channels, const void* x, const float* gamma,
                                const float* beta, const float* running_mean, const float* running_var, double eps,
                                const void* residual, bool relu, void* y, float* scale_shift, cudaStream_t stream) {
  BnInferenceScaleKernel<<<(channels + 127) / 128, 128, 0, stream>>>(channels, gamma, beta, running_mean,
                                                                     running_var, eps, scale_shift);
  RETURN_IF_ERROR(LMSGD_LAUNCHED("BnInferenceScaleKernel"));
  const size_t total = static_cast<size_t>(rows) * channels;
  // One "group" spanning every row: scale/shift per channel with stride 2.
  LMSGD_DISPATCH(t, BnApplyKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(
                        static_cast<const T*>(x), scale_shift, 2, static_cast<const T*>(residual), relu,
                        static_cast<T*>(y), total, channels, rows));
  return LMSGD_LAUNCHED("BnApplyKernel (inference)");
}

absl::Status BnBackward(DType t, const BnShape& s, const void* dy, const void* relu_y, const void* x,
                        const float* gamma, const float* save_mean, const float* save_invstd, void* dx,
                        float* dgamma, float* dbeta, bool accumulate, double* scratch, cudaStream_t stream) {
  const int C = s.channels;
  RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(scratch, 0, BnScratchDoubles(s) * sizeof(double), stream), "cudaMemsetAsync (BN gradient sums)", __FILE__, __LINE__));
  const int chunks = BnChunks(s);
  const int64_t chunk_rows = (s.rows_per_group + chunks - 1) / chunks;
  const dim3 grid((C + 31) / 32, chunks, s.groups), block(32, kBnRowsPerBlock);
  LMSGD_DISPATCH(t, BnBackwardReduceKernel<T><<<grid, block, 0, stream>>>(
                        static_cast<const T*>(dy), static_cast<const T*>(relu_y), static_cast<const T*>(x), save_mean,
                        save_invstd, s.rows_per_group, C, chunk_rows, scratch));
  RETURN_IF_ERROR(LMSGD_LAUNCHED("BnBackwardReduceKernel"));
  BnFinalizeBackwardKernel<<<(C + 127) / 128, 128, 0, stream>>>(scratch, s.groups, C, s.rows_per_group, gamma,
                                                                save_invstd, dgamma, dbeta, accumulate);
  RETURN_IF_ERROR(LMSGD_LAUNCHED("BnFinalizeBackwardKernel"));
  const size_t total = static_cast<size_t>(s.rows_per_group) * s.groups * C;
  LMSGD_DISPATCH(t, BnBackwardDataKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(
                        static_cast<const T*>(dy), static_cast<const T*>(relu_y), static_cast<const T*>(x), save_mean,
                        save_invstd, reinterpret_cast<const float*>(scratch), static_cast<T*>(dx), total, C,
                        s.rows_per_group));
  return LMSGD_LAUNCHED("BnBackwardDataKernel");
}

absl::Status ReluMask(DType t, size_t n, const void* dy, const void* y, void* dz, cudaStream_t stream) {
  LMSGD_DISPATCH(t, ReluMaskKernel<T><<<Blocks(n, 256), 256, 0, stream>>>(n, static_cast<const T*>(dy),
                                                                          static_cast<const T*>(y), static_cast<T*>(dz)));
  return LMSGD_LAUNCHED("ReluMaskKernel");
}

absl::Status MaxPoolForward(DType t, const PoolShape& s, const void* x, void* y, uint8_t* argmax, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(s.n) * s.out_h() * s.out_w() * s.c;
  LMSGD_DISPATCH(t, MaxPoolForwardKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(
                        s, static_cast<const T*>(x), static_cast<T*>(y), argmax, total));
  return LMSGD_LAUNCHED("MaxPoolForwardKernel");
}

absl::Status MaxPoolBackward(DType t, const PoolShape& s, const void* dy, const uint8_t* argmax, void* dx,
                             cudaStream_t stream) {
  const size_t total = static_cast<size_t>(s.n) * s.h * s.w * s.c;
  LMSGD_DISPATCH(t, MaxPoolBackwardKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(
                        s, static_cast<const T*>(dy), argmax, static_cast<T*>(dx), total));
  return LMSGD_LAUNCHED("MaxPoolBackwardKernel");
}

absl::Status GlobalAvgPoolForward(DType t, int n, int hw, int c, const void* x, float* y, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(n) * c;
  LMSGD_DISPATCH(t, GapForwardKernel<T><<<Blocks(total, 256, 1u << 30), 256, 0, stream>>>(
                        n, hw, c, static_cast<const T*>(x), y));
  return LMSGD_LAUNCHED("GapForwardKernel");
}

absl::Status GlobalAvgPoolBackward(DType t, int n, int hw, int c, const float* dy, void* dx, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(n) * hw * c;
  LMSGD_DISPATCH(t, GapBackwardKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(n, hw, c, dy, static_cast<T*>(dx)));
  return LMSGD_LAUNCHED("GapBackwardKernel");
}

absl::Status SoftmaxCrossEntropy(int n, int k, const float* logits, const int32_t* labels, double normalizer,
                                 float* dlogits, double* row_loss, double* loss, cudaStream_t stream) {
  SoftmaxCeKernel<<<n, 256, 0, stream>>>(k, logits, labels, normalizer, dlogits, row_loss);
  RETURN_IF_ERROR(LMSGD_LAUNCHED("SoftmaxCeKernel"));
  SumLossKernel<<<1, 1, 0, stream>>>(n, row_loss, normalizer, loss);
  return LMSGD_LAUNCHED("SumLossKernel");
}

absl::Status BiasGradient(int n, int k, const float* dlogits, float* db, bool accumulate, cudaStream_t stream) {
  BiasGradKernel<<<(k + 127) / 128, 128, 0, stream>>>(n, k, dlogits, db, accumulate);
  return LMSGD_LAUNCHED("BiasGradKernel");
}

absl::Status Sgemm(bool trans_a, bool trans_b, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                   float beta, float* c, int ldc, cudaStream_t stream) {
  const dim3 grid((n + kGemmTile - 1) / kGemmTile, (m + kGemmTile - 1) / kGemmTile);
  SgemmKernel<<<grid, 256, 0, stream>>>(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
  return LMSGD_LAUNCHED("SgemmKernel");
}

absl::Status AddBias(int n, int k, const float* bias, float* y, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(n) * k;
  AddBiasKernel<<<Blocks(total, 256), 256, 0, stream>>>(n, k, bias, y);
  return LMSGD_LAUNCHED("AddBiasKernel");
}

absl::Status NchwToNhwc(DType t, int n, int c, int h, int w, int c_out, const float* in, void* out,
                        cudaStream_t stream) {
  const size_t total = static_cast<size_t>(n) * c_out * h * w;
  LMSGD_DISPATCH(t, NchwToNhwcKernel<T><<<Blocks(total, 256), 256, 0, stream>>>(n, c, h, w, c_out, in,
                                                                                static_cast<T*>(out)));
  return LMSGD_LAUNCHED("NchwToNhwcKernel");
}

absl::Status PixelsToNhwc(DType t, size_t pixels, int c, int c_out, const PixelAffine& affine, const uint8_t* in,
                          void* out, cudaStream_t stream) {
  if (c < 1 || c > 4 || c_out < c) return absl::InvalidArgumentError(absl::StrCat("PixelsToNhwc: ", c, " -> ", c_out, " channels"));
  LMSGD_DISPATCH(t, PixelsToNhwcKernel<T><<<Blocks(pixels * c_out, 256), 256, 0, stream>>>(
                        pixels, c, c_out, affine, in, static_cast<T*>(out)));
  return LMSGD_LAUNCHED("PixelsToNhwcKernel");
}

absl::Status PadChannels(DType t, size_t rows, int c, int cp, const float* src, void* dst, cudaStream_t stream) {
  LMSGD_DISPATCH(t, PadChannelsKernel<T><<<Blocks(rows * cp, 256), 256, 0, stream>>>(rows, c, cp, src,
                                                                                     static_cast<T*>(dst)));
  return LMSGD_LAUNCHED("PadChannelsKernel");
}

absl::Status UnpadChannels(DType t, size_t rows, int c, int cp, const void* src, float* dst, bool accumulate,
                           cudaStream_t stream) {
  LMSGD_DISPATCH(t, UnpadChannelsKernel<T><<<Blocks(rows * c, 256), 256, 0, stream>>>(
                        rows, c, cp, static_cast<const T*>(src), dst, accumulate));
  return LMSGD_LAUNCHED("UnpadChannelsKernel");
}

absl::Status CastFromFloat(DType t, size_t n, const float* in, void* out, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  LMSGD_DISPATCH(t, CastFromFloatKernel<T><<<Blocks(n, 256), 256, 0, stream>>>(n, in, static_cast<T*>(out)));
  return LMSGD_LAUNCHED("CastFromFloatKernel");
}

absl::Status CastToFloat(DType t, size_t n, const void* in, float* out, bool accumulate, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  LMSGD_DISPATCH(t, CastToFloatKernel<T><<<Blocks(n, 256), 256, 0, stream>>>(n, static_cast<const T*>(in), out,
                                                                             accumulate));
  return LMSGD_LAUNCHED("CastToFloatKernel");
}

absl::Status SgdUpdate(const SgdChunk* chunks, int num_chunks, float* params, const float* grads, float* velocity,
                       float lr, float momentum, float correction, bool nesterov, cudaStream_t stream) {
  if (num_chunks == 0) return absl::OkStatus();
  SgdKernel<<<num_chunks, 256, 0, stream>>>(chunks, params, grads, velocity, lr, momentum, correction, nesterov);
  return LMSGD_LAUNCHED("SgdKernel");
}

}  // namespace lmsgd::backend::cuda
