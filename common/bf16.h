// bf16 (bfloat16), the upper half of an IEEE float32: the one conversion every CPU path uses (the
// oneDNN backend's activations and weight copies, the bf16 gradient wire). Rounding is to nearest
// even; NaN stays NaN (quieted), infinities stay.
#pragma once

#include <cstdint>
#include <cstring>

namespace lmsgd {

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace lmsgd
