// Datasets as random-access collections of labelled examples, decoded and augmented on
// demand into a float CHW buffer. Augmentation randomness comes from a per-example seed the
// caller derives from (job seed, epoch, example index), so what a sample looks like never
// depends on which thread decoded it or in what order: runs and resumes are reproducible.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/data/idx.h"
#include "worker/data/resize.h"

namespace lmsgd::data {

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual uint64_t size() const = 0;
  virtual int channels() const = 0;
  virtual int height() const = 0;  // of the produced (cropped) example
  virtual int width() const = 0;
  virtual int num_classes() const = 0;
  // Writes example `index` as (channels, height, width) floats into `out` and its label.
  // `train` selects training augmentation (random, from `aug_seed`) or the deterministic
  // evaluation transform. Errors name the example's source (file, index).
  virtual absl::Status Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const = 0;
  // Datasets of RGB images can also write (height, width, 3) bytes, not normalized: the GPU
  // trainer normalizes on the device, and a quarter of the bytes cross the bus.
  virtual bool SupportsUint8() const { return false; }
  virtual absl::Status GetPixels(uint64_t index, bool train, uint64_t aug_seed, PixelFormat format, void* out,
                                 int32_t* label) const {
    if (format == PixelFormat::kFloatChw) return Get(index, train, aug_seed, static_cast<float*>(out), label);
    return absl::UnimplementedError(absl::StrCat(Describe(index), ": this dataset has no uint8 output"));
  }
  // Where example `index` comes from, for messages.
  virtual std::string Describe(uint64_t index) const = 0;
};

// MNIST / Fashion-MNIST from IDX files. Pixels normalized by the TRAINING set's mean and std.
// Training augmentation: random crop from the image padded by `pad` pixels (zeros) and a
// horizontal flip with probability 1/2.
class IdxImageDataset final : public Dataset {
 public:
  // `dir` holds the four IDX files; `train` selects train-* or t10k-* files.
  static absl::StatusOr<std::unique_ptr<IdxImageDataset>> Load(const std::string& dir, bool train, int num_classes,
                                                               int pad = 2, bool flip = true);
  uint64_t size() const override { return data_.count; }
  int channels() const override { return 1; }
  int height() const override { return static_cast<int>(data_.rows); }
  int width() const override { return static_cast<int>(data_.cols); }
  int num_classes() const override { return num_classes_; }
  absl::Status Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const override;
  std::string Describe(uint64_t index) const override;
  float mean() const { return mean_; }
  float stddev() const { return std_; }

 private:
  IdxDataset data_;
  std::string dir_, prefix_;
  int num_classes_ = 10, pad_ = 2;
  bool flip_ = true;
  float mean_ = 0, std_ = 1;
};

// Deterministic pseudo-random images (a function of the index) for benchmarks; labels are
// index mod num_classes.
class SyntheticDataset final : public Dataset {
 public:
  SyntheticDataset(uint64_t size, int channels, int height, int width, int num_classes)
      : size_(size), c_(channels), h_(height), w_(width), classes_(num_classes) {}
  uint64_t size() const override { return size_; }
  int channels() const override { return c_; }
  int height() const override { return h_; }
  int width() const override { return w_; }
  int num_classes() const override { return classes_; }
  absl::Status Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const override;
  std::string Describe(uint64_t index) const override;

 private:
  uint64_t size_;
  int c_, h_, w_, classes_;
};

// Seed for example `index` in `epoch` (stable across threads, ranks and restarts).
uint64_t AugmentSeed(uint64_t job_seed, uint64_t epoch, uint64_t index);

}  // namespace lmsgd::data
