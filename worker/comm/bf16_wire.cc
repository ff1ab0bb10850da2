#include "worker/comm/bf16_wire.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace lmsgd::comm {

// The loops are written for the vectorizer: NaN inputs (gradients never hold them in a run that
// goes on) take the same integer path and stay NaN unless their payload sits in the low half only.
namespace {
inline uint32_t RoundedBits(uint32_t u) { return u + 0x7fffu + ((u >> 16) & 1u); }
}  // namespace

__attribute__((target_clones("avx512f", "avx2", "default"))) void FloatsToBf16(const float* __restrict src,
                                                                                uint16_t* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    dst[i] = static_cast<uint16_t>(RoundedBits(u) >> 16);
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
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, data + i, sizeof(u));
    u = RoundedBits(u) & 0xffff0000u;
    std::memcpy(data + i, &u, sizeof(u));
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void RoundAndPackBf16(float* __restrict data,
                                                                                    uint16_t* __restrict dst,
                                                                                    size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, data + i, sizeof(u));
    const uint32_t r = RoundedBits(u) & 0xffff0000u;
    dst[i] = static_cast<uint16_t>(r >> 16);
    std::memcpy(data + i, &r, sizeof(r));
  }
}

absl::Status Bf16WireTransport::Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) {
  size_t total = 0;
  for (const P2POp& op : ops) {
    if (op.bytes % sizeof(float) != 0 || op.kind == P2POp::kRecvAddBf16) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": a bf16 wire carries float32 data; ", op.bytes, " bytes is not whole floats"));
    }
    if (op.kind != P2POp::kRecvAdd) total += op.bytes / sizeof(float);
  }
  if (staging_.size() < total) staging_.resize(total);
  std::vector<P2POp> wire;
  wire.reserve(ops.size());
  size_t at = 0;
  for (const P2POp& op : ops) {
    const size_t n = op.bytes / sizeof(float);
    if (op.kind == P2POp::kRecvAdd) {  // added by the transport as it arrives, widened
      wire.push_back({P2POp::kRecvAddBf16, op.peer, op.buf, n * sizeof(uint16_t), op.tag});
      continue;
    }
    uint16_t* s = staging_.data() + at;
    if (op.kind == P2POp::kSend) {
      RoundAndPackBf16(static_cast<float*>(op.buf), s, n);  // the sender keeps what its peer receives
    }
    wire.push_back({op.kind, op.peer, s, n * sizeof(uint16_t), op.tag});
    at += n;
  }
  if (auto st = inner_->Exchange(wire, deadline, what); !st.ok()) return st;
  at = 0;
  for (const P2POp& op : ops) {
    if (op.kind == P2POp::kRecvAdd) continue;
    const size_t n = op.bytes / sizeof(float);
    if (op.kind == P2POp::kRecv) Bf16ToFloats(staging_.data() + at, static_cast<float*>(op.buf), n);
    at += n;
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
