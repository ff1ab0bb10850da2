// The element-wise sum every allreduce algorithm and the transport's receive-and-add use: one
// definition, so that every path adds in the same way (dst[i] = dst[i] + src[i], float32).
#pragma once

#include <cstddef>
#include <vector>

namespace lmsgd::comm {

// dst[i] += src[i] for i < n.
void AddFloats(float* __restrict dst, const float* __restrict src, size_t n);
// The same with `src` given as bytes at any alignment (n float32 values in host byte order).
void AddFloatBytes(float* __restrict dst, const unsigned char* __restrict src, size_t n);
// dst[i] += the bf16 value at src + 2i (any alignment), widened: the bf16 wire's addition; with
// `round`, each sum is then rounded to bf16 (to nearest even).
void AddBf16Bytes(float* __restrict dst, const unsigned char* __restrict src, size_t n, bool round = false);

// Adds a message of float32 (or bf16) values into `dst` as it arrives in pieces (a transport's
// fragments) at any byte offsets, in any order: whole values are added straight from the piece;
// the bytes of a value split across pieces are gathered until all have arrived. Each value is
// added exactly once, with the same addition as AddFloats.
class StreamAdder {
 public:
  // Starts a message of `bytes` (a multiple of 4) to be added into dst[0 .. bytes / 4); with
  // `bf16`, of bf16 values (a multiple of 2) added, widened, into dst[0 .. bytes / 2), each sum
  // rounded to bf16 with `round`.
  void Reset(float* dst, size_t bytes, bool bf16 = false, bool round = false);
  // Later pieces are ignored (the receive failed; the destination is no longer ours).
  void Detach() { dst_ = nullptr; }
  // The piece of the message at byte `offset`. A piece reaching past the end is not added and
  // makes the message incomplete.
  void Add(size_t offset, const unsigned char* src, size_t length);
  // Every byte arrived (once) and every float was added.
  bool complete() const { return !overflow_ && received_ == bytes_ && partials_.empty(); }
  size_t received() const { return received_; }
  size_t expected() const { return bytes_; }
  bool overflow() const { return overflow_; }

 private:
  void Byte(size_t pos, unsigned char v);
  struct Partial {
    size_t index;
    unsigned char b[4];
    unsigned mask;
  };
  float* dst_ = nullptr;
  size_t elem_ = 4;  // bytes per value on the wire: 4 (float32) or 2 (bf16)
  bool round_ = false;
  size_t bytes_ = 0, received_ = 0;
  bool overflow_ = false;
  std::vector<Partial> partials_;
};

}  // namespace lmsgd::comm
