// ImageFolder datasets (root/<class>/<image>.jpg; classes are the sorted sub-directory names,
// images sorted within a class, like torchvision.datasets.ImageFolder), decoded with
// libjpeg-turbo.
//
// Training transform (torchvision RandomResizedCrop + RandomHorizontalFlip, the paper's
// scale and aspect-ratio augmentation): a crop covering a uniform fraction in [0.08, 1] of the
// image area with a log-uniform aspect ratio in [3/4, 4/3] (10 attempts, then the central
// crop), resized bilinearly to size x size, flipped with probability 1/2.
// Evaluation transform: shorter side resized to size * 256 / 224, central size x size crop.
// Both normalize per channel with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229,
// 0.224, 0.225). Crop and resize happen in one bilinear pass from the decoded image; the
// decoder's DCT scaling (1/2, 1/4, 1/8) is used when the image is much larger than needed.
//
// A file that cannot be read or decoded is an error naming the file; grayscale and CMYK JPEGs
// are converted to RGB by libjpeg-turbo.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/data/dataset.h"

namespace lmsgd::data {

class ImageFolderDataset final : public Dataset {
 public:
  // Lists `root`. `classes`, when given, fixes the class list (the validation set must use
  // the training set's); a class directory missing from `root` is allowed (no examples).
  static absl::StatusOr<std::unique_ptr<ImageFolderDataset>> Open(const std::string& root, int size,
                                                                  std::vector<std::string> classes = {});
  uint64_t size() const override { return files_.size(); }
  int channels() const override { return 3; }
  int height() const override { return size_; }
  int width() const override { return size_; }
  int num_classes() const override { return static_cast<int>(classes_.size()); }
  const std::vector<std::string>& classes() const { return classes_; }
  absl::Status Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const override;
  std::string Describe(uint64_t index) const override;

 private:
  std::string root_;
  int size_ = 224;
  std::vector<std::string> classes_;
  std::vector<std::pair<std::string, int32_t>> files_;  // path, class
};

// Decodes a JPEG held in memory to interleaved RGB (height * width * 3 bytes), scaled down by
// the largest DCT factor (1, 1/2, 1/4, 1/8) that keeps the shorter side >= min_short_side.
// `name` is used in errors.
absl::Status DecodeJpeg(const std::string& bytes, int min_short_side, const std::string& name,
                        std::vector<uint8_t>* rgb, int* height, int* width);

// Bilinear resample of the source region (x0, y0, w, h) of an RGB image to out_size x out_size,
// optionally mirrored, normalized, into CHW floats.
void CropResizeNormalize(const uint8_t* rgb, int height, int width, double x0, double y0, double w, double h,
                         int out_size, bool flip, float* out);

}  // namespace lmsgd::data
