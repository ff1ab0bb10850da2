// ImageFolder datasets (root/<class>/<image>.jpg; classes are the sorted sub-directory names,
// images sorted within a class, like torchvision.datasets.ImageFolder), decoded with
// libjpeg-turbo.
//
// Examples go through image_transform.h (crop-aware decode, antialiased resize, flip and
// output in one pass); they are available as normalized floats or as uint8 HWC.
//
// A file that cannot be read or decoded is an error naming the file; grayscale JPEGs are
// expanded to RGB and Adobe CMYK/YCCK ones converted.
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
  int32_t label(uint64_t index) const { return files_.at(index).second; }
  absl::Status Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const override;
  bool SupportsUint8() const override { return true; }
  absl::Status GetPixels(uint64_t index, bool train, uint64_t aug_seed, PixelFormat format, void* out,
                         int32_t* label) const override;
  std::string Describe(uint64_t index) const override;

 private:
  std::string root_;
  int size_ = 224;
  std::vector<std::string> classes_;
  std::vector<std::pair<std::string, int32_t>> files_;  // path, class
};

}  // namespace lmsgd::data
