#include "worker/data/dataset.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "worker/data/sampler.h"

namespace lmsgd::data {

uint64_t AugmentSeed(uint64_t job_seed, uint64_t epoch, uint64_t index) {
  SplitMix64 a(job_seed ^ 0x2545f4914f6cdd1dull);
  SplitMix64 b(a.Next() ^ (epoch * 0x9e3779b97f4a7c15ull));
  SplitMix64 c(b.Next() ^ (index * 0xbf58476d1ce4e5b9ull));
  return c.Next();
}

absl::StatusOr<std::unique_ptr<IdxImageDataset>> IdxImageDataset::Load(const std::string& dir, bool train,
                                                                        int num_classes, int pad, bool flip) {
  auto ds = std::unique_ptr<IdxImageDataset>(new IdxImageDataset());
  ds->dir_ = dir;
  ds->prefix_ = train ? "train" : "t10k";
  ds->num_classes_ = num_classes;
  ds->pad_ = pad;
  ds->flip_ = flip;
  auto data = LoadIdxDataset(dir, ds->prefix_, static_cast<uint32_t>(num_classes));
  if (!data.ok()) return data.status();
  ds->data_ = std::move(*data);
  // Normalization statistics always come from the training set, so train and test agree.
  const IdxDataset* stats_src = &ds->data_;
  IdxDataset train_data;
  if (!train) {
    auto t = LoadIdxDataset(dir, "train", static_cast<uint32_t>(num_classes));
    if (!t.ok()) return t.status();
    train_data = std::move(*t);
    stats_src = &train_data;
  }
  double sum = 0, sq = 0;
  for (uint8_t v : stats_src->images) {
    const double x = v / 255.0;
    sum += x;
    sq += x * x;
  }
  const double n = static_cast<double>(stats_src->images.size());
  ds->mean_ = static_cast<float>(sum / n);
  ds->std_ = static_cast<float>(std::sqrt(std::max(1e-12, sq / n - (sum / n) * (sum / n))));
  return ds;
}

absl::Status IdxImageDataset::Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const {
  if (index >= data_.count) {
    return absl::OutOfRangeError(absl::StrCat("example ", index, " of ", Describe(0), ": only ", data_.count));
  }
  const int H = height(), W = width();
  const uint8_t* img = &data_.images[index * H * W];
  int dy = 0, dx = 0;
  bool flip = false;
  if (train) {
    SplitMix64 rng(aug_seed);
    dy = static_cast<int>(rng.Below(2 * pad_ + 1)) - pad_;
    dx = static_cast<int>(rng.Below(2 * pad_ + 1)) - pad_;
    flip = flip_ && (rng.Next() & 1);
  }
  const float scale = 1.0f / (255.0f * std_), zero = -mean_ / std_;
  for (int y = 0; y < H; ++y) {
    for (int x = 0; x < W; ++x) {
      const int sy = y + dy, sx0 = x + dx;
      const int sx = flip ? W - 1 - sx0 : sx0;
      const bool inside = sy >= 0 && sy < H && sx0 >= 0 && sx0 < W;
      out[y * W + x] = inside ? img[sy * W + sx] * scale + zero : zero;
    }
  }
  *label = data_.labels[index];
  return absl::OkStatus();
}

std::string IdxImageDataset::Describe(uint64_t index) const {
  return absl::StrCat(dir_, "/", prefix_, "-images-idx3-ubyte[#", index, "]");
}

absl::Status SyntheticDataset::Get(uint64_t index, bool, uint64_t, float* out, int32_t* label) const {
  if (index >= size_) return absl::OutOfRangeError(absl::StrCat("synthetic example ", index, " of ", size_));
  SplitMix64 rng(index * 0x9e3779b97f4a7c15ull + 1);
  const size_t n = static_cast<size_t>(c_) * h_ * w_;
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<int64_t>(rng.Next() >> 40) - (1 << 23)) / (1 << 23);
  *label = static_cast<int32_t>(index % static_cast<uint64_t>(classes_));
  return absl::OkStatus();
}

std::string SyntheticDataset::Describe(uint64_t index) const { return absl::StrCat("synthetic[#", index, "]"); }

}  // namespace lmsgd::data
