// libFuzzer target: the JPEG path (libjpeg-turbo decode, then crop/resize/normalize).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "worker/data/image_folder.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> rgb;
  int h = 0, w = 0;
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  if (lmsgd::data::DecodeJpeg(bytes, 8, "fuzz.jpg", &rgb, &h, &w).ok()) {
    std::vector<float> out(3 * 16 * 16);
    lmsgd::data::CropResizeNormalize(rgb.data(), h, w, 0, 0, w, h, 16, true, out.data());
  }
  return 0;
}
