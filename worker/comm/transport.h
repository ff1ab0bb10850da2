// Point-to-point messaging between the k ranks of one generation: the narrow interface the
// collective algorithms are written against (after Gloo's Pair). The UCX implementation is
// ucx_transport.h.
//
// Messages are matched by (tag, sender): the algorithms put the collective's sequence number and
// the protocol step into `tag`, so messages of different collectives or steps never mix.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace lmsgd::comm {

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Posts a send of `send_bytes` to rank `to` and a receive of exactly `recv_bytes` from rank
  // `from` (to / from = -1: none), then waits for both. Errors (peer failure, Abort(), the
  // deadline) name the peer and `what`; after an error the transport is unusable.
  virtual absl::Status SendRecv(int to, const void* send, size_t send_bytes, int from, void* recv, size_t recv_bytes,
                                uint64_t tag, absl::Time deadline, const char* what) = 0;
  // Makes every pending and future SendRecv fail promptly (ABORTED). Thread-safe.
  virtual void Abort() = 0;
};

// tag = collective sequence (32 bits) | step (16 bits).
inline uint64_t MakeTag(uint64_t sequence, uint32_t step) { return (sequence << 16) | (step & 0xffff); }

}  // namespace lmsgd::comm
