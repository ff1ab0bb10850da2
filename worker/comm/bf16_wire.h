// bf16 on the wire (JobSpec gradient_exchange_dtype: GRADIENT_EXCHANGE_BF16): half the bytes of a
// float32 allreduce, with float32 arithmetic.
//
// Bf16WireTransport carries another transport's float32 messages as bf16 (the upper half of an
// IEEE float, rounded to nearest even): a send becomes the inner transport's kSendBf16, which
// rounds each value in place as it packs it into its send buffers (so the sender holds exactly
// what its peer receives; an algorithm's hint may spare that), a receive its kRecvBf16, which
// widens the values as they arrive, and a receive-and-add its kRecvAddBf16, which adds the
// widened values in float32 as they arrive: no pass of its own over the data, no staging. So
// every hop of an algorithm adds in float32 and rounds once, when it sends its partial sum on.
// The algorithms compute each final element on one rank and send it from there (rounded as it
// goes: the owner keeps the rounded value), or (recursive doubling) on partners adding the same
// two values, both rounded, to the same sum, which the algorithm then rounds (a folded-in rank
// gets it rounded by the send): every rank ends bitwise identical. Every message through it must be float32 data (an allreduce
// algorithm's): never setup bytes.
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
// dst[i] = bf16-rounded src[i] (as float32).
void RoundedFloats(const float* __restrict src, float* __restrict dst, size_t n);
// dst[i] += bf16-rounded src[i].
void AddRoundedFloats(float* __restrict dst, const float* __restrict src, size_t n);
// dst16[i] = bf16 of src[i] and dst[i] = that value widened: one pass for a sum that is both
// published and kept.
void NarrowAndWiden(const float* __restrict src, uint16_t* __restrict dst16, float* __restrict dst, size_t n);
// Two ranks' sum in one pass: s = bf16-rounded mine[i] + widened peer[i] (either order: float
// addition commutes), dst16[i] = bf16 of s and mine[i] = that value widened.
void SumPairToBf16(float* mine, const uint16_t* __restrict peer, uint16_t* __restrict dst16, size_t n);

// A transport's piece of a bf16 message, at any byte offset and length (UCX packs and unpacks
// generic datatypes fragment by fragment). The message of n values is 2n bytes, value i's bf16
// at bytes 2i (low) and 2i + 1 (high). Each is a pure function of the position, so pieces may come
// in any order, and a value split over two pieces comes out whole.
// Packs message bytes [offset, offset + length) from float32 `src` into `dst`; with `round`,
// every value touched is also rounded in place (idempotent: a value split over two pieces, or a
// piece packed twice, packs the same bytes).
void PackBf16Piece(float* src, size_t offset, unsigned char* dst, size_t length, bool round);
// Widens message bytes [offset, offset + length) at `src` into float32 `dst` (a split value's
// bytes are written one at a time into its upper half, its lower half zeroed).
void UnpackBf16Piece(const unsigned char* src, size_t offset, size_t length, float* dst);

class Bf16WireTransport final : public Transport {
 public:
  explicit Bf16WireTransport(Transport* inner) : inner_(inner) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) override;
  void Abort() override { inner_->Abort(); }

 private:
  Transport* inner_;
};

}  // namespace lmsgd::comm
