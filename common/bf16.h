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

// The bits of float `u` rounded to nearest even in its upper half (the lower half is garbage:
// mask it or shift it away). Branch-free, for loops the compiler vectorizes; a NaN whose payload
// sits only in the lower half would become an infinity (gradients hold none in a run that goes on).
inline uint32_t RoundedBf16Bits(uint32_t u) { return u + 0x7fffu + ((u >> 16) & 1u); }

// `f` rounded to bf16 by that rule, as a float32 (its lower half zero).
inline float RoundedBf16Value(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u = RoundedBf16Bits(u) & 0xffff0000u;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The bf16 of a float32 whose lower half is zero (a RoundedBf16Value).
inline uint16_t Bf16BitsOf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace lmsgd
