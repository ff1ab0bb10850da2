// Deterministic photo-like JPEGs for benchmarks and tests: what a JPEG pipeline meets on
// ImageNet, without ImageNet.
//
// Sizes follow ImageNet's training set: mostly 500 pixels on the long side at 4:3 or 3:2
// (landscape about four times as often as portrait), some square, some small (200-400) and
// some large (up to 1200). Content compresses like a photograph at quality 90 (about
// 100-130 KB at 500x375): value noise at six scales from 96 to 3 pixels with a 1/f fall-off,
// correlated across channels like luminance and chroma, overlaid with shapes that have sharp
// edges and linear gradients, and a little sensor grain. Flat colours would compress ten times
// too well and make decoding look cheap.
//
// Everything is a function of (seed, class, index): the same folder on every machine.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmsgd::data {

struct PhotoSize {
  int width = 0, height = 0;
};

// The size of image `index` of class `cls`.
PhotoSize PhotoSizeFor(uint64_t seed, int cls, int index);

// Image (cls, index) as interleaved RGB of PhotoSizeFor's size.
std::vector<uint8_t> MakePhoto(uint64_t seed, int cls, int index, PhotoSize size);

struct PhotoFolderOptions {
  int classes = 10;
  int per_class = 100;
  uint64_t seed = 1;
  int quality = 90;
  int threads = 1;
};

struct PhotoFolderStats {
  int64_t images = 0;
  int64_t bytes = 0;
  double mean_width = 0, mean_height = 0;
};

// Writes out_dir/class_<c>/img_<c>_<i>.jpg (an ImageFolder); existing files are rewritten.
absl::StatusOr<PhotoFolderStats> WritePhotoFolder(const std::string& out_dir, const PhotoFolderOptions& options);

}  // namespace lmsgd::data
