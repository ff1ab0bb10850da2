#include "worker/comm/bf16_wire.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace lmsgd::comm {

// The loops are written for the vectorizer (RoundedBf16Bits: NaN inputs take the same integer
// path).

__attribute__((target_clones("avx512f", "avx2", "default"))) void FloatsToBf16(const float* __restrict src,
                                                                                uint16_t* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    dst[i] = static_cast<uint16_t>(RoundedBf16Bits(u) >> 16);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void Bf16ToFloats(const uint16_t* __restrict src,
                                                                                float* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void AddBf16(float* __restrict dst,
                                                                           const uint16_t* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    float v;
    std::memcpy(&v, &u, sizeof(v));
    dst[i] += v;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void RoundToBf16(float* data, size_t n) {
  for (size_t i = 0; i < n; ++i) data[i] = RoundedBf16Value(data[i]);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void RoundedFloats(const float* __restrict src,
                                                                                 float* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = RoundedBf16Value(src[i]);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void AddRoundedFloats(float* __restrict dst,
                                                                                    const float* __restrict src,
                                                                                    size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += RoundedBf16Value(src[i]);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void NarrowAndWiden(const float* __restrict src,
                                                                                  uint16_t* __restrict dst16,
                                                                                  float* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float v = RoundedBf16Value(src[i]);
    dst16[i] = Bf16BitsOf(v);
    dst[i] = v;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void SumPairToBf16(float* mine,
                                                                                 const uint16_t* __restrict peer,
                                                                                 uint16_t* __restrict dst16, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float v = RoundedBf16Value(RoundedBf16Value(mine[i]) + Bf16ToFloat(peer[i]));
    dst16[i] = Bf16BitsOf(v);
    mine[i] = v;
  }
}

namespace {
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16 pieces assume a little-endian float layout");

__attribute__((target_clones("avx512f", "avx2", "default"))) void PackValues(float* __restrict src,
                                                                              unsigned char* __restrict dst, size_t n,
                                                                              bool round) {
  if (round) {
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, src + i, sizeof(u));
      const uint32_t r = RoundedBf16Bits(u) & 0xffff0000u;
      const uint16_t h = static_cast<uint16_t>(r >> 16);
      std::memcpy(dst + 2 * i, &h, sizeof(h));
      std::memcpy(src + i, &r, sizeof(r));
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, src + i, sizeof(u));
      const uint16_t h = static_cast<uint16_t>(RoundedBf16Bits(u) >> 16);
      std::memcpy(dst + 2 * i, &h, sizeof(h));
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void UnpackValues(const unsigned char* __restrict src,
                                                                                float* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, sizeof(h));
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}

// One byte of value i's bf16 (byte j: 0 low, 1 high), rounding it in place with `round`.
unsigned char PackByte(float* src, size_t i, size_t j, bool round) {
  uint32_t u;
  std::memcpy(&u, src + i, sizeof(u));
  const uint32_t r = RoundedBf16Bits(u) & 0xffff0000u;
  if (round) std::memcpy(src + i, &r, sizeof(r));
  return static_cast<unsigned char>(r >> (16 + 8 * j));
}

void UnpackByte(unsigned char v, size_t i, size_t j, float* dst) {
  unsigned char* f = reinterpret_cast<unsigned char*>(dst + i);
  f[0] = 0;
  f[1] = 0;
  f[2 + j] = v;
}
}  // namespace

void PackBf16Piece(float* src, size_t offset, unsigned char* dst, size_t length, bool round) {
  size_t pos = offset;
  const size_t end = offset + length;
  if (pos < end && pos % 2 != 0) {
    *dst++ = PackByte(src, pos / 2, 1, round);
    ++pos;
  }
  const size_t whole = (end - pos) / 2;
  PackValues(src + pos / 2, dst, whole, round);
  dst += 2 * whole;
  pos += 2 * whole;
  if (pos < end) *dst = PackByte(src, pos / 2, 0, round);
}

void UnpackBf16Piece(const unsigned char* src, size_t offset, size_t length, float* dst) {
  size_t pos = offset;
  const size_t end = offset + length;
  if (pos < end && pos % 2 != 0) {
    UnpackByte(*src++, pos / 2, 1, dst);
    ++pos;
  }
  const size_t whole = (end - pos) / 2;
  UnpackValues(src, dst + pos / 2, whole);
  src += 2 * whole;
  pos += 2 * whole;
  if (pos < end) UnpackByte(*src, pos / 2, 0, dst);
}

absl::Status Bf16WireTransport::Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) {
  std::vector<P2POp> wire;
  wire.reserve(ops.size());
  for (const P2POp& op : ops) {
    P2POp w = op;
    switch (op.kind) {
      case P2POp::kSend: w.kind = P2POp::kSendBf16; break;
      case P2POp::kRecv: w.kind = P2POp::kRecvBf16; break;
      case P2POp::kRecvAdd: w.kind = P2POp::kRecvAddBf16; break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(what, ": a bf16 wire carries float32 messages, not bf16 ones"));
    }
    if (op.bytes % sizeof(float) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": a bf16 wire carries float32 data; ", op.bytes, " bytes is not whole floats"));
    }
    w.bytes = op.bytes / sizeof(float) * sizeof(uint16_t);
    wire.push_back(w);
  }
  return inner_->Exchange(wire, deadline, what);
}

}  // namespace lmsgd::comm
