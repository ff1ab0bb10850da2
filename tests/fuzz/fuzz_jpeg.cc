// libFuzzer target: the JPEG path (header, crop-aware decode, antialiased resize) in both
// transforms and both output formats.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "worker/data/image_transform.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  std::vector<float> f(3 * 16 * 16);
  std::vector<uint8_t> u(3 * 16 * 16);
  const uint64_t seed = size;
  (void)lmsgd::data::TransformJpeg(bytes, "fuzz.jpg", true, seed, 16, lmsgd::data::PixelFormat::kFloatChw, f.data());
  (void)lmsgd::data::TransformJpeg(bytes, "fuzz.jpg", false, seed, 16, lmsgd::data::PixelFormat::kUint8Hwc, u.data());
  return 0;
}
