#include "worker/data/resize.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace lmsgd::data {
namespace {

double Triangle(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// One axis's filter: output i reads source [start[i], start[i] + count[i]) with weights
// w[i * max_taps + t], which sum to 1.
template <typename T>
struct Taps {
  std::vector<int> start, count;
  std::vector<T> w;
  int max_taps = 0;
};

template <typename T>
Taps<T> ComputeTaps(double box0, double box_size, int out_size, int lo, int hi) {
  Taps<T> taps;
  const double scale = box_size / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = filterscale;
  taps.max_taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  taps.start.resize(out_size);
  taps.count.resize(out_size);
  taps.w.assign(static_cast<size_t>(out_size) * taps.max_taps, T(0));
  std::vector<double> w(taps.max_taps);
  for (int i = 0; i < out_size; ++i) {
    const double center = box0 + (i + 0.5) * scale;
    int xmin = std::max(static_cast<int>(std::floor(center - support + 0.5)), lo);
    int xmax = std::min(static_cast<int>(std::floor(center + support + 0.5)), hi);
    xmax = std::min(xmax, xmin + taps.max_taps);
    double total = 0;
    for (int x = xmin; x < xmax; ++x) total += (w[x - xmin] = Triangle((x - center + 0.5) / filterscale));
    if (xmax <= xmin || total <= 0) {  // a box narrower than a pixel at an edge: nearest pixel
      xmin = std::clamp(static_cast<int>(std::floor(center)), lo, hi - 1);
      xmax = xmin + 1;
      w[0] = total = 1;
    }
    taps.start[i] = xmin;
    taps.count[i] = xmax - xmin;
    for (int x = 0; x < xmax - xmin; ++x) taps.w[static_cast<size_t>(i) * taps.max_taps + x] = static_cast<T>(w[x] / total);
  }
  return taps;
}

// The source range the filter may read along one axis.
void Bounds(double box0, double box_size, int size, bool clamp, int* lo, int* hi) {
  if (!clamp) {
    *lo = 0;
    *hi = size;
    return;
  }
  *lo = std::clamp(static_cast<int>(std::floor(box0 + 1e-6)), 0, size - 1);
  *hi = std::clamp(static_cast<int>(std::ceil(box0 + box_size - 1e-6)), *lo + 1, size);
}

// Vertical: out[k] = sum_t w[t] * rows[t][k] over n contiguous (interleaved RGB) bytes.
void VerticalRowScalar(const uint8_t* const* rows, const float* w, int taps, int n, float* out) {
  for (int k = 0; k < n; ++k) out[k] = w[0] * rows[0][k];
  for (int t = 1; t < taps; ++t) {
    for (int k = 0; k < n; ++k) out[k] += w[t] * rows[t][k];
  }
}

// Horizontal, one channel: out[j] = (sum_t w[t][j] * in[3 * (start[j] + t) + c]) * mul + add,
// with exactly `taps` (zero-padded) taps per output.
void HorizontalScalarFrom(const float* in, int c, const int* start, const float* w, int taps, int out_width,
                          int from, float mul, float add, float* out) {
  for (int j = from; j < out_width; ++j) {
    float v = 0;
    for (int t = 0; t < taps; ++t) v += w[t * out_width + j] * in[3 * (start[j] + t) + c];
    out[j] = v * mul + add;
  }
}

// Rounds half up, clamped to [0, 255], pixels [from, n) of three planes into interleaved RGB.
void PackRgbScalar(const float* r, const float* g, const float* b, int from, int n, uint8_t* out) {
  for (int j = from; j < n; ++j) {
    out[3 * j] = static_cast<uint8_t>(std::clamp(r[j], 0.0f, 255.0f) + 0.5f);
    out[3 * j + 1] = static_cast<uint8_t>(std::clamp(g[j], 0.0f, 255.0f) + 0.5f);
    out[3 * j + 2] = static_cast<uint8_t>(std::clamp(b[j], 0.0f, 255.0f) + 0.5f);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LMSGD_HAVE_X86_PATHS 1
__attribute__((target("avx2,fma"))) void VerticalRowAvx2(const uint8_t* const* rows, const float* w, int taps,
                                                            int n, float* out) {
  int k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int t = 0; t < taps; ++t) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[t] + k));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), acc);
    }
    _mm256_storeu_ps(out + k, acc);
  }
  for (; k < n; ++k) {
    float v = 0;
    for (int t = 0; t < taps; ++t) v += w[t] * rows[t][k];
    out[k] = v;
  }
}

__attribute__((target("avx2,fma"))) void HorizontalAvx2(const float* in, int c, const int* start, const float* w,
                                                         int taps, int out_width, float mul, float add,
                                                         float* out) {
  const __m256i three = _mm256_set1_epi32(3), chan = _mm256_set1_epi32(c);
  const __m256 vmul = _mm256_set1_ps(mul), vadd = _mm256_set1_ps(add);
  int j = 0;
  for (; j + 8 <= out_width; j += 8) {
    __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start + j));
    idx = _mm256_add_epi32(_mm256_mullo_epi32(idx, three), chan);
    __m256 acc = _mm256_setzero_ps();
    for (int t = 0; t < taps; ++t) {
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + static_cast<size_t>(t) * out_width + j),
                            _mm256_i32gather_ps(in, idx, 4), acc);
      idx = _mm256_add_epi32(idx, three);
    }
    _mm256_storeu_ps(out + j, _mm256_fmadd_ps(acc, vmul, vadd));
  }
  if (j < out_width) HorizontalScalarFrom(in, c, start, w, taps, out_width, j, mul, add, out);
}

// Rounds three float planes (half up, clamped to [0, 255]) into interleaved RGB bytes: each
// pixel packed in a 32-bit word, written 4 bytes at a time with the next pixel overwriting the
// spare byte (the last pixel is written byte by byte).
__attribute__((target("avx2,fma"))) void PackRgbAvx2(const float* r, const float* g, const float* b, int n,
                                                      uint8_t* out) {
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.0f), half = _mm256_set1_ps(0.5f);
  alignas(32) uint32_t px[8];
  int j = 0;
  for (; j + 8 <= n - 1; j += 8) {
    const __m256i vr = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(r + j), lo), hi), half));
    const __m256i vg = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(g + j), lo), hi), half));
    const __m256i vb = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(b + j), lo), hi), half));
    const __m256i p = _mm256_or_si256(vr, _mm256_or_si256(_mm256_slli_epi32(vg, 8), _mm256_slli_epi32(vb, 16)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(px), p);
    for (int k = 0; k < 8; ++k) std::memcpy(out + 3 * (j + k), &px[k], 4);
  }
  PackRgbScalar(r, g, b, j, n, out);
}

bool HaveAvx2() {
  static const bool have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return have;
}
#endif

void VerticalRow(const uint8_t* const* rows, const float* w, int taps, int n, float* out) {
#ifdef LMSGD_HAVE_X86_PATHS
  if (HaveAvx2()) return VerticalRowAvx2(rows, w, taps, n, out);
#endif
  VerticalRowScalar(rows, w, taps, n, out);
}

void PackRgb(const float* r, const float* g, const float* b, int n, uint8_t* out) {
#ifdef LMSGD_HAVE_X86_PATHS
  if (HaveAvx2()) return PackRgbAvx2(r, g, b, n, out);
#endif
  PackRgbScalar(r, g, b, 0, n, out);
}

void Horizontal(const float* in, int c, const int* start, const float* w, int taps, int out_width, float mul,
                float add, float* out) {
#ifdef LMSGD_HAVE_X86_PATHS
  if (HaveAvx2()) return HorizontalAvx2(in, c, start, w, taps, out_width, mul, add, out);
#endif
  HorizontalScalarFrom(in, c, start, w, taps, out_width, 0, mul, add, out);
}

}  // namespace

// Vertical pass first (contiguous bytes, over the columns the horizontal filter reads), then
// the horizontal pass per channel with the flip folded into its tables; AVX2 + FMA where the
// CPU has them (an AVX-512 variant could not be run here, so there is none). In exact arithmetic the order of a separable filter does not matter, and the
// intermediate stays float.
void ResizeCrop(const uint8_t* rgb, int height, int width, int stride, const CropBox& box, int out_width,
                int out_height, bool flip, PixelFormat format, void* out) {
  int xlo, xhi, ylo, yhi;
  Bounds(box.x, box.w, width, box.clamp_to_box, &xlo, &xhi);
  Bounds(box.y, box.h, height, box.clamp_to_box, &ylo, &yhi);
  const Taps<float> tx = ComputeTaps<float>(box.x, box.w, out_width, xlo, xhi);
  const Taps<float> ty = ComputeTaps<float>(box.y, box.h, out_height, ylo, yhi);
  // Horizontal tables: the same number of taps for every output (the widest count),
  // zero-padded, the start moved left where a window would run past the last column;
  // transposed (w[t][j]) and in output order (mirrored when flipping).
  int taps = 1, c0 = xhi, c1 = xlo;
  for (int j = 0; j < out_width; ++j) {
    taps = std::max(taps, tx.count[j]);
    c0 = std::min(c0, tx.start[j]);
    c1 = std::max(c1, tx.start[j] + tx.count[j]);
  }
  taps = std::min(taps, c1 - c0);
  thread_local std::vector<int> hstart;
  thread_local std::vector<float> hw;
  hstart.resize(out_width);
  hw.assign(static_cast<size_t>(taps) * out_width, 0.0f);
  for (int j = 0; j < out_width; ++j) {
    const int src = flip ? out_width - 1 - j : j;
    const int s0 = std::min(tx.start[src], c1 - taps);
    hstart[j] = s0 - c0;
    for (int t = 0; t < tx.count[src]; ++t) {
      hw[static_cast<size_t>(tx.start[src] - s0 + t) * out_width + j] = tx.w[static_cast<size_t>(src) * tx.max_taps + t];
    }
  }
  const int n = (c1 - c0) * 3;
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(n));
  thread_local std::vector<const uint8_t*> rows;
  rows.resize(ty.max_taps);
  thread_local std::vector<float> line;
  line.resize(static_cast<size_t>(out_width) * 3);
  const bool u8 = format == PixelFormat::kUint8Hwc;
  float mul[3], add[3];
  for (int c = 0; c < 3; ++c) {
    mul[c] = u8 ? 1.0f : 1.0f / (255.0f * kImageNetStd[c]);
    add[c] = u8 ? 0.0f : -kImageNetMean[c] / kImageNetStd[c];
  }
  const size_t plane = static_cast<size_t>(out_width) * out_height;
  for (int i = 0; i < out_height; ++i) {
    for (int t = 0; t < ty.count[i]; ++t) {
      rows[t] = rgb + static_cast<size_t>(ty.start[i] + t) * stride + static_cast<size_t>(c0) * 3;
    }
    VerticalRow(rows.data(), &ty.w[static_cast<size_t>(i) * ty.max_taps], ty.count[i], n, row.data());
    for (int c = 0; c < 3; ++c) {
      float* dst = u8 ? line.data() + static_cast<size_t>(c) * out_width
                      : static_cast<float*>(out) + c * plane + static_cast<size_t>(i) * out_width;
      Horizontal(row.data(), c, hstart.data(), hw.data(), taps, out_width, mul[c], add[c], dst);
    }
    if (u8) {  // interleave and round half up, as PIL stores its result
      PackRgb(line.data(), line.data() + out_width, line.data() + 2 * out_width, out_width,
              static_cast<uint8_t*>(out) + static_cast<size_t>(i) * out_width * 3);
    }
  }
}

void ResizeCropReference(const uint8_t* rgb, int height, int width, int stride, const CropBox& box, int out_width,
                         int out_height, bool flip, double* out) {
  int xlo, xhi, ylo, yhi;
  Bounds(box.x, box.w, width, box.clamp_to_box, &xlo, &xhi);
  Bounds(box.y, box.h, height, box.clamp_to_box, &ylo, &yhi);
  const Taps<double> tx = ComputeTaps<double>(box.x, box.w, out_width, xlo, xhi);
  const Taps<double> ty = ComputeTaps<double>(box.y, box.h, out_height, ylo, yhi);
  for (int i = 0; i < out_height; ++i) {
    for (int j = 0; j < out_width; ++j) {
      const int jj = flip ? out_width - 1 - j : j;
      for (int c = 0; c < 3; ++c) {
        double v = 0;
        for (int s = 0; s < ty.count[i]; ++s) {
          for (int t = 0; t < tx.count[jj]; ++t) {
            const int y = ty.start[i] + s, x = tx.start[jj] + t;
            v += ty.w[static_cast<size_t>(i) * ty.max_taps + s] * tx.w[static_cast<size_t>(jj) * tx.max_taps + t] *
                 rgb[static_cast<size_t>(y) * stride + static_cast<size_t>(x) * 3 + c];
          }
        }
        out[(static_cast<size_t>(i) * out_width + j) * 3 + c] = v;
      }
    }
  }
}

}  // namespace lmsgd::data
