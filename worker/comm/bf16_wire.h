// bf16 on the wire (JobSpec gradient_exchange_dtype: GRADIENT_EXCHANGE_BF16): half the bytes of a
// float32 allreduce, with float32 arithmetic.
//
// Bf16WireTransport carries another transport's float32 messages as bf16 (the upper half of an
// IEEE float, rounded to nearest even). A send first rounds its float32 values to bf16 in place,
// so the sender holds exactly what its peer receives, then sends them packed; a receive unpacks;
// a receive-and-add becomes the inner transport's kRecvAddBf16, which adds the widened values in
// float32 as they arrive. So every hop of an algorithm adds in float32 and rounds once, when it
// sends its partial sum on. The algorithms compute each final
// element on one rank and send it from there (rounded as it goes: the owner keeps the rounded
// value), or (recursive doubling) on partners adding the same two values, both rounded, to the
// same unrounded sum: after the Communicator rounds a halving/doubling result once more
// (RoundToBf16: a folded-in rank got it rounded) every rank ends bitwise identical. Every message
// through it must be float32 data (an allreduce algorithm's): never setup bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/bf16.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

using ::lmsgd::Bf16ToFloat;  // common/bf16.h: round to nearest even
using ::lmsgd::FloatToBf16;
void FloatsToBf16(const float* __restrict src, uint16_t* __restrict dst, size_t n);
void Bf16ToFloats(const uint16_t* __restrict src, float* __restrict dst, size_t n);
// dst[i] += widened src[i] (float32 addition).
void AddBf16(float* __restrict dst, const uint16_t* __restrict src, size_t n);
// data[i] = bf16-rounded data[i], in place.
void RoundToBf16(float* data, size_t n);
// Both at once, in one pass: dst[i] = bf16 of data[i], and data[i] rounded to it.
void RoundAndPackBf16(float* __restrict data, uint16_t* __restrict dst, size_t n);

class Bf16WireTransport final : public Transport {
 public:
  explicit Bf16WireTransport(Transport* inner) : inner_(inner) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) override;
  void Abort() override { inner_->Abort(); }

 private:
  Transport* inner_;
  std::vector<uint16_t> staging_;  // every op's bf16 message, grown to the largest Exchange
};

}  // namespace lmsgd::comm
