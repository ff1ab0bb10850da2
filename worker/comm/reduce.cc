#include "worker/comm/reduce.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/bf16.h"

namespace lmsgd::comm {

// Compiled for AVX-512, AVX2 and baseline x86-64; the loader picks the best.
__attribute__((target_clones("avx512f", "avx2", "default"))) void AddFloats(float* __restrict dst,
                                                                             const float* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

// memcpy into a float is the defined way to read a possibly unaligned value; the compiler turns
// the loop into unaligned vector loads.
__attribute__((target_clones("avx512f", "avx2", "default"))) void AddFloatBytes(float* __restrict dst,
                                                                                 const unsigned char* __restrict src,
                                                                                 size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float v;
    std::memcpy(&v, src + 4 * i, sizeof(float));
    dst[i] += v;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void AddBf16Bytes(float* __restrict dst,
                                                                                const unsigned char* __restrict src,
                                                                                size_t n, bool round) {
  auto widened = [src](size_t i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, sizeof(h));
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  };
  if (!round) {
    for (size_t i = 0; i < n; ++i) dst[i] += widened(i);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const float sum = dst[i] + widened(i);
    uint32_t u;
    std::memcpy(&u, &sum, sizeof(u));
    u = RoundedBf16Bits(u) & 0xffff0000u;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}

void StreamAdder::Reset(float* dst, size_t bytes, bool bf16, bool round) {
  dst_ = dst;
  elem_ = bf16 ? 2 : 4;
  round_ = bf16 && round;
  bytes_ = bytes;
  received_ = 0;
  overflow_ = false;
  partials_.clear();
}

void StreamAdder::Byte(size_t pos, unsigned char v) {
  const size_t index = pos / elem_;
  auto it = std::find_if(partials_.begin(), partials_.end(), [&](const Partial& p) { return p.index == index; });
  if (it == partials_.end()) it = partials_.insert(partials_.end(), Partial{index, {0, 0, 0, 0}, 0});
  it->b[pos % elem_] = v;
  it->mask |= 1u << (pos % elem_);
  if (it->mask == (1u << elem_) - 1) {
    if (elem_ == 4) {
      AddFloatBytes(dst_ + index, it->b, 1);
    } else {
      AddBf16Bytes(dst_ + index, it->b, 1, round_);
    }
    partials_.erase(it);
  }
}

void StreamAdder::Add(size_t offset, const unsigned char* src, size_t length) {
  if (dst_ == nullptr) return;
  if (offset > bytes_ || length > bytes_ - offset) {
    overflow_ = true;
    return;
  }
  const size_t end = offset + length;
  size_t pos = offset;
  for (; pos < end && pos % elem_ != 0; ++pos) Byte(pos, src[pos - offset]);
  const size_t whole = (end - pos) / elem_;
  if (elem_ == 4) {
    AddFloatBytes(dst_ + pos / 4, src + (pos - offset), whole);
  } else {
    AddBf16Bytes(dst_ + pos / 2, src + (pos - offset), whole, round_);
  }
  pos += elem_ * whole;
  for (; pos < end; ++pos) Byte(pos, src[pos - offset]);
  received_ += length;
}

}  // namespace lmsgd::comm
