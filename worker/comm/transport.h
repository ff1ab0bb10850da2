// Point-to-point messaging between the k ranks of one generation: the narrow interface the
// collective algorithms are written against (after Gloo's Pair). The UCX implementation is
// ucx_transport.h.
//
// Messages are matched by (tag, sender): the algorithms put the collective's sequence number and
// the protocol step into `tag`, so messages of different collectives or steps never mix.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace lmsgd::comm {

// One point-to-point operation of an Exchange. A receive must get exactly `bytes`.
// kRecvAdd receives `bytes` / 4 float32 values and adds them into `buf` (buf[i] += value i,
// the same float addition as AddFloats): a transport may add straight out of its receive
// buffers, sparing the copy into a scratch buffer and the second pass over it. `buf` must not
// be read by a send of the same Exchange (the addition may happen while that send is still
// reading it).
// The bf16 wire (bf16_wire.h): a message of `bytes` / 2 bf16 values, `buf` holding float32 ones.
// kSendBf16 rounds each float32 value of `buf` to bf16 in place and sends the bf16 (the transport
// converts as it fills its send buffers; with a hint, kFinal or kDiscard, it leaves `buf` as it
// is); kRecvBf16 widens the values into `buf`; kRecvAddBf16 adds the widened values into `buf`
// (float32 addition), with kFinal rounding each sum to bf16.
struct P2POp {
  enum Kind { kSend, kRecv, kRecvAdd, kSendBf16, kRecvBf16, kRecvAddBf16 } kind;
  bool is_send() const { return kind == kSend || kind == kSendBf16; }
  int peer;
  void* buf;
  size_t bytes;
  uint64_t tag;
  // What the algorithm knows of the values; a bf16 wire uses it to skip work, other transports
  // ignore it. kFinal: a receive-and-add's sums are final results of the allreduce (nothing more
  // is added to them); a send's values are final results that this rank received or summed with
  // a kFinal receive-and-add. kDiscard: a send's values are overwritten by this rank before it
  // reads them again.
  enum Hint : uint8_t { kNoHint = 0, kFinal = 1, kDiscard = 2 };
  uint8_t hint = kNoHint;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Posts every operation (receives first), then waits for all of them; a kRecvAdd's addition
  // happens as its data arrives, while the other operations are still in flight (how the
  // algorithms overlap reduction with transfer). Errors (peer failure, Abort(), the deadline)
  // name the peer and `what`; after an error the transport is unusable.
  virtual absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) = 0;
  // A send to `to` and a receive from `from` (-1: none) as one Exchange.
  absl::Status SendRecv(int to, const void* send, size_t send_bytes, int from, void* recv, size_t recv_bytes,
                        uint64_t tag, absl::Time deadline, const char* what) {
    std::vector<P2POp> ops;
    if (from >= 0) ops.push_back({P2POp::kRecv, from, recv, recv_bytes, tag});
    if (to >= 0) ops.push_back({P2POp::kSend, to, const_cast<void*>(send), send_bytes, tag});
    return Exchange(ops, deadline, what);
  }
  // Makes every pending and future SendRecv fail promptly (ABORTED). Thread-safe.
  virtual void Abort() = 0;
  // Where Exchange reports whom it waits for (the communicator's flight recorder): while an
  // Exchange waits, the peer of its first unfinished operation; when it ends, the peer of the
  // operation that finished last, or that failed. Null: no reports. Set between Exchanges.
  void set_wait_observer(std::atomic<int>* observer) { wait_observer_ = observer; }

 protected:
  void ReportWaitingFor(int peer) {
    if (wait_observer_ != nullptr) wait_observer_->store(peer, std::memory_order_relaxed);
  }

 private:
  std::atomic<int>* wait_observer_ = nullptr;
};

// tag = collective sequence (32 bits) | step (16 bits).
inline uint64_t MakeTag(uint64_t sequence, uint32_t step) { return (sequence << 16) | (step & 0xffff); }

}  // namespace lmsgd::comm
