// Antialiased crop-and-resize of RGB images, fused with the horizontal flip and the output
// conversion, as PIL's Image.resize(BILINEAR, box) does it (what torchvision's
// RandomResizedCrop and Resize run on PIL images):
//   - separable: a horizontal pass over the rows the vertical filter needs, then a vertical
//     pass;
//   - a triangle filter whose support widens with the shrink factor (support = max(1, scale)
//     source pixels), so shrinking averages every source pixel instead of sampling two, and
//     a fine pattern becomes its mean rather than an alias;
//   - the same coefficients as PIL: centre = box0 + (i + 0.5) * scale, taps normalized to 1.
//
// Outputs: float CHW normalized per channel with ImageNet's mean and std (the CPU trainer's
// input), or uint8 HWC rounded as PIL does (the GPU normalizes on the device); both come from
// the same filtered values, so they agree to the uint8 rounding.
#pragma once

#include <cstdint>

namespace lmsgd::data {

enum class PixelFormat {
  kFloatChw,  // (3, H, W) floats, normalized
  kUint8Hwc,  // (H, W, 3) bytes
};

constexpr float kImageNetMean[3] = {0.485f, 0.456f, 0.406f};
constexpr float kImageNetStd[3] = {0.229f, 0.224f, 0.225f};

struct CropBox {
  double x = 0, y = 0, w = 0, h = 0;  // in source pixels
  // Filter taps stay inside the box (as when the image is cropped before it is resized, like
  // torchvision's resized_crop), or may read source pixels around it (a resize of the whole
  // image, then a crop: the evaluation transform).
  bool clamp_to_box = true;
};

// Resamples `box` of the RGB image (height rows of `stride` bytes) to out_width x out_height,
// mirrored horizontally if `flip`, into `out` in `format`.
void ResizeCrop(const uint8_t* rgb, int height, int width, int stride, const CropBox& box, int out_width,
                int out_height, bool flip, PixelFormat format, void* out);

// The same filter evaluated in float64 with no fusion: the definition ResizeCrop is tested
// against. Writes (out_height, out_width, 3) doubles in [0, 255].
void ResizeCropReference(const uint8_t* rgb, int height, int width, int stride, const CropBox& box, int out_width,
                         int out_height, bool flip, double* out);

}  // namespace lmsgd::data
