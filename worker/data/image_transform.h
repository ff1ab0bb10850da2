// The ImageNet transforms on one JPEG, doing only the work the crop needs:
//
// Training (torchvision RandomResizedCrop(size) + RandomHorizontalFlip; the paper's scale and
// aspect-ratio augmentation): the crop is chosen from the JPEG header's size first, covering a
// uniform fraction in [0.08, 1] of the area with a log-uniform aspect ratio in [3/4, 4/3] (10
// attempts, then the central crop with the ratio clamped), and flipped with probability 1/2.
// The draws come from `aug_seed` alone, so a sample never depends on the thread or order.
// Only the crop is decoded, at the smallest DCT scale that keeps it at least size x size, and
// then resized with the antialiased filter of resize.h, fused with the flip and the output.
//
// Evaluation (torchvision Resize(size * 256 / 224) + CenterCrop(size)): the central square
// that the resize would map to size x size, decoded with a margin for the filter, resized
// with taps that may read around it, as when the whole image is resized first.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "worker/data/resize.h"

namespace lmsgd::data {

struct CropChoice {
  int x = 0, y = 0, w = 0, h = 0;
  bool flip = false;
};

// RandomResizedCrop's parameters for an image of width x height, from `aug_seed`.
CropChoice ChooseTrainCrop(int width, int height, uint64_t aug_seed);

// Decodes `bytes` and writes the transformed size x size example in `format` to `out`
// ((3, size, size) floats or (size, size, 3) bytes). `name` is used in errors.
absl::Status TransformJpeg(std::string_view bytes, const std::string& name, bool train, uint64_t aug_seed, int size,
                           PixelFormat format, void* out);

}  // namespace lmsgd::data
