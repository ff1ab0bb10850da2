#include "worker/data/image_transform.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/data/jpeg.h"
#include "worker/data/sampler.h"

namespace lmsgd::data {
namespace {

double Uniform(SplitMix64& rng, double lo, double hi) {
  return lo + (hi - lo) * static_cast<double>(rng.Next() >> 11) * 0x1.0p-53;
}

}  // namespace

CropChoice ChooseTrainCrop(int width, int height, uint64_t aug_seed) {
  SplitMix64 rng(aug_seed);
  const double w = width, h = height, area = w * h;
  CropChoice c{0, 0, width, height, false};
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {
    const double target = area * Uniform(rng, 0.08, 1.0);
    const double ratio = std::exp(Uniform(rng, std::log(3.0 / 4), std::log(4.0 / 3)));
    const double tw = std::round(std::sqrt(target * ratio)), th = std::round(std::sqrt(target / ratio));
    if (tw >= 1 && th >= 1 && tw <= w && th <= h) {
      c.x = static_cast<int>(std::floor(Uniform(rng, 0, w - tw + 1)));
      c.y = static_cast<int>(std::floor(Uniform(rng, 0, h - th + 1)));
      c.w = static_cast<int>(tw);
      c.h = static_cast<int>(th);
      found = true;
    }
  }
  if (!found) {  // central crop with the ratio clamped to [3/4, 4/3]
    const double r = w / h;
    if (r < 3.0 / 4) {
      c.h = static_cast<int>(std::round(w / (3.0 / 4)));
    } else if (r > 4.0 / 3) {
      c.w = static_cast<int>(std::round(h * (4.0 / 3)));
    }
    c.x = (width - c.w) / 2;
    c.y = (height - c.h) / 2;
  }
  c.flip = rng.Next() & 1;
  return c;
}

absl::Status TransformJpeg(std::string_view bytes, const std::string& name, bool train, uint64_t aug_seed, int size,
                           PixelFormat format, void* out) {
  bool flip = false;
  double x0 = 0, y0 = 0, crop = 0;  // evaluation: the central square, full-resolution pixels
  RegionRequest req;
  auto choose = [&](const JpegHeader& header) {
    req = RegionRequest();
    req.min_width = req.min_height = size;
    if (train) {
      const CropChoice c = ChooseTrainCrop(header.width, header.height, aug_seed);
      req.x = c.x;
      req.y = c.y;
      req.w = c.w;
      req.h = c.h;
      flip = c.flip;
    } else {
      // Full-resolution pixels per resized pixel, and the square the resize maps to size x size.
      const double scale = std::min(header.width, header.height) / (size * 256.0 / 224.0);
      crop = size * scale;
      x0 = (header.width - crop) / 2;
      y0 = (header.height - crop) / 2;
      req.x = static_cast<int>(std::floor(x0));
      req.y = static_cast<int>(std::floor(y0));
      req.w = static_cast<int>(std::ceil(x0 + crop)) - req.x;
      req.h = static_cast<int>(std::ceil(y0 + crop)) - req.y;
      req.margin = static_cast<int>(std::ceil(2 * std::max(scale, 1.0))) + 8;
    }
    return req;
  };
  thread_local DecodedRegion region;
  RETURN_IF_ERROR(DecodeJpegRegion(bytes, name, RegionChooser(choose), &region));
  CropBox box{region.box_x, region.box_y, region.box_w, region.box_h, train};
  if (!train) {
    // The exact (fractional) square, not the whole-pixel region that was decoded.
    const double k = region.scale_num / 8.0;
    box.x += (x0 - req.x) * k;
    box.y += (y0 - req.y) * k;
    box.w = box.h = crop * k;
  }
  ResizeCrop(region.rgb.data(), region.height, region.width, region.width * 3, box, size, size, flip, format, out);
  return absl::OkStatus();
}

}  // namespace lmsgd::data
