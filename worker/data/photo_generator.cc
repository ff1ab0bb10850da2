#include "worker/data/photo_generator.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "worker/data/jpeg.h"
#include "worker/data/sampler.h"

namespace lmsgd::data {
namespace {

uint64_t ImageSeed(uint64_t seed, int cls, int index) {
  SplitMix64 a(seed ^ 0x6a09e667f3bcc908ull);
  SplitMix64 b(a.Next() ^ (static_cast<uint64_t>(cls) * 0x9e3779b97f4a7c15ull));
  SplitMix64 c(b.Next() ^ (static_cast<uint64_t>(index) * 0xbf58476d1ce4e5b9ull));
  return c.Next();
}

double Unit(SplitMix64& rng) { return static_cast<double>(rng.Next() >> 11) * 0x1.0p-53; }

// Smoothly interpolated lattice noise in [-1, 1] with cells of `cell` pixels.
class ValueNoise {
 public:
  ValueNoise(SplitMix64& rng, int width, int height, double cell) : cell_(cell) {
    gw_ = static_cast<int>(width / cell) + 2;
    gh_ = static_cast<int>(height / cell) + 2;
    grid_.resize(static_cast<size_t>(gw_) * gh_);
    for (float& v : grid_) v = static_cast<float>(2 * Unit(rng) - 1);
  }
  float At(int x, int y) const {
    const double fx = x / cell_, fy = y / cell_;
    const int ix = static_cast<int>(fx), iy = static_cast<int>(fy);
    const float tx = Smooth(static_cast<float>(fx - ix)), ty = Smooth(static_cast<float>(fy - iy));
    const float* g = &grid_[static_cast<size_t>(iy) * gw_ + ix];
    const float top = g[0] + (g[1] - g[0]) * tx, bottom = g[gw_] + (g[gw_ + 1] - g[gw_]) * tx;
    return top + (bottom - top) * ty;
  }

 private:
  static float Smooth(float t) { return t * t * (3 - 2 * t); }
  double cell_;
  int gw_ = 0, gh_ = 0;
  std::vector<float> grid_;
};

}  // namespace

PhotoSize PhotoSizeFor(uint64_t seed, int cls, int index) {
  SplitMix64 rng(ImageSeed(seed, cls, index) ^ 0x5a5a5a5aull);
  const double u = Unit(rng), v = Unit(rng);
  int long_side = 500;
  double aspect = v < 0.6 ? 4.0 / 3 : (v < 0.85 ? 3.0 / 2 : 1.0 + 0.8 * Unit(rng));
  if (u >= 0.80 && u < 0.92) long_side = 200 + static_cast<int>(200 * Unit(rng));        // small
  else if (u >= 0.92) long_side = 500 + static_cast<int>(700 * Unit(rng));                // large
  if (Unit(rng) < 0.07) aspect = 1.0;                                                      // square
  const int short_side = std::max(1, static_cast<int>(std::lround(long_side / aspect)));
  const bool portrait = Unit(rng) < 0.2;
  return portrait ? PhotoSize{short_side, long_side} : PhotoSize{long_side, short_side};
}

std::vector<uint8_t> MakePhoto(uint64_t seed, int cls, int index, PhotoSize size) {
  SplitMix64 rng(ImageSeed(seed, cls, index));
  const int W = size.width, H = size.height;
  // A class-dependent palette, so classes differ in colour statistics too.
  SplitMix64 class_rng(seed * 31 + static_cast<uint64_t>(cls) + 7);
  double base[3], tint[3];
  for (int c = 0; c < 3; ++c) {
    base[c] = 70 + 110 * Unit(class_rng);
    tint[c] = 0.5 + Unit(class_rng);
  }
  // Luminance noise at six scales (1/f amplitudes) and two coarse chroma fields.
  constexpr double kCells[] = {96, 48, 24, 12, 6, 3, 1.5};
  constexpr float kAmp[] = {60, 40, 32, 28, 28, 30, 30};
  std::vector<ValueNoise> lum;
  for (double cell : kCells) lum.emplace_back(rng, W, H, cell);
  ValueNoise chroma_a(rng, W, H, 80), chroma_b(rng, W, H, 40);
  std::vector<float> img(static_cast<size_t>(W) * H * 3);
  for (int y = 0; y < H; ++y) {
    for (int x = 0; x < W; ++x) {
      float l = 0;
      for (size_t o = 0; o < lum.size(); ++o) l += kAmp[o] * lum[o].At(x, y);
      const float ca = 30 * chroma_a.At(x, y), cb = 18 * chroma_b.At(x, y);
      float* p = &img[(static_cast<size_t>(y) * W + x) * 3];
      p[0] = static_cast<float>(base[0] + tint[0] * l + ca);
      p[1] = static_cast<float>(base[1] + tint[1] * l - 0.5f * ca + cb);
      p[2] = static_cast<float>(base[2] + tint[2] * l - cb);
    }
  }
  // Objects: ellipses and rectangles with sharp edges, filled with a linear gradient that
  // keeps some of the texture underneath.
  const int objects = 3 + static_cast<int>(rng.Below(6));
  for (int k = 0; k < objects; ++k) {
    const double cx = Unit(rng) * W, cy = Unit(rng) * H;
    const double rx = (0.05 + 0.3 * Unit(rng)) * W, ry = (0.05 + 0.3 * Unit(rng)) * H;
    const bool ellipse = rng.Next() & 1;
    float c0[3], c1[3];
    for (int c = 0; c < 3; ++c) {
      c0[c] = static_cast<float>(255 * Unit(rng));
      c1[c] = static_cast<float>(255 * Unit(rng));
    }
    const double angle = 2 * M_PI * Unit(rng), gx = std::cos(angle), gy = std::sin(angle);
    const float keep = static_cast<float>(0.2 + 0.4 * Unit(rng));
    const int y0 = std::max(0, static_cast<int>(cy - ry)), y1 = std::min(H, static_cast<int>(cy + ry) + 1);
    const int x0 = std::max(0, static_cast<int>(cx - rx)), x1 = std::min(W, static_cast<int>(cx + rx) + 1);
    for (int y = y0; y < y1; ++y) {
      for (int x = x0; x < x1; ++x) {
        const double dx = (x - cx) / rx, dy = (y - cy) / ry;
        if (ellipse ? dx * dx + dy * dy > 1 : std::max(std::fabs(dx), std::fabs(dy)) > 1) continue;
        const float t = static_cast<float>(0.5 + 0.5 * std::clamp(dx * gx + dy * gy, -1.0, 1.0));
        float* p = &img[(static_cast<size_t>(y) * W + x) * 3];
        for (int c = 0; c < 3; ++c) p[c] = keep * p[c] + (1 - keep) * (c0[c] + (c1[c] - c0[c]) * t);
      }
    }
  }
  // Sensor grain: mostly luminance (+-22), a little per channel (+-4).
  std::vector<uint8_t> out(img.size());
  for (size_t i = 0; i < img.size(); i += 3) {
    const float lgrain = static_cast<float>(static_cast<int>(rng.Below(45)) - 22);
    for (size_t c = 0; c < 3; ++c) {
      const float grain = lgrain + static_cast<float>(static_cast<int>(rng.Below(9)) - 4);
      out[i + c] = static_cast<uint8_t>(std::clamp(std::lround(img[i + c] + grain), 0L, 255L));
    }
  }
  return out;
}

absl::StatusOr<PhotoFolderStats> WritePhotoFolder(const std::string& out_dir, const PhotoFolderOptions& o) {
  if (o.classes < 1 || o.per_class < 1) {
    return absl::InvalidArgumentError(absl::StrCat("classes (", o.classes, ") and per_class (", o.per_class,
                                                   ") must be at least 1"));
  }
  if (o.quality < 1 || o.quality > 100) {
    return absl::InvalidArgumentError(absl::StrCat("quality ", o.quality, " is not in [1, 100]"));
  }
  for (int c = 0; c < o.classes; ++c) {
    absl::Status st = MakeDirs(absl::StrFormat("%s/class_%03d", out_dir, c));
    if (!st.ok()) return st;
  }
  const int64_t total = static_cast<int64_t>(o.classes) * o.per_class;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  int64_t bytes = 0;
  double sum_w = 0, sum_h = 0;
  absl::Status first_error;
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      const int cls = static_cast<int>(i / o.per_class), idx = static_cast<int>(i % o.per_class);
      const PhotoSize size = PhotoSizeFor(o.seed, cls, idx);
      const std::vector<uint8_t> rgb = MakePhoto(o.seed, cls, idx, size);
      auto jpeg = EncodeJpeg(rgb.data(), size.width, size.height, o.quality);
      absl::Status st = jpeg.status();
      if (st.ok()) {
        st = WriteFileAtomically(absl::StrFormat("%s/class_%03d/img_%03d_%05d.jpg", out_dir, cls, cls, idx), *jpeg);
        std::lock_guard<std::mutex> lock(mu);
        bytes += static_cast<int64_t>(jpeg->size());
        sum_w += size.width;
        sum_h += size.height;
      }
      if (!st.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.ok()) first_error = st;
        next = total;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < std::max(1, o.threads); ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (!first_error.ok()) return first_error;
  PhotoFolderStats stats;
  stats.images = total;
  stats.bytes = bytes;
  stats.mean_width = sum_w / total;
  stats.mean_height = sum_h / total;
  return stats;
}

}  // namespace lmsgd::data
