// Transport over UCX (ucp tagged messages). UCX picks the wire: shared memory between processes
// on one host, TCP across hosts (override with UCX's own variables, e.g. UCX_TLS=tcp).
//
// Bootstrap: every rank creates a ucp worker, publishes its host name and address in the Store
// under "<prefix>/ucx/<rank>" (another lane: "ucx-lane<L>"), reads every other rank's and creates an endpoint to each. Peers on
// other hosts get UCX peer error handling (a dead peer surfaces as an endpoint error at once);
// peers on the same host talk over shared memory, which UCX cannot combine with peer error
// handling, so a dead local peer is caught by the collective's deadline instead. Never a hang.
// Waiting spins for up to 50 us (not at all when the host runs more ranks than cores), then
// yields the core after each poll, and after 2 ms sleeps on the worker's event fd
// (ucp_worker_arm + poll, at most 1 ms), so a waiting communication thread leaves the cores to
// the backward pass. One thread at a time may call SendRecv; Abort() may come from any thread.
//
// Receive-and-add (P2POp::kRecvAdd) up to 256 KiB uses a UCX generic datatype whose unpack adds
// each fragment into the destination as it arrives (StreamAdder), so the data is read once out of
// UCX's receive buffers; larger ones are received whole into a staging buffer, then added.
//
// Wire tag: (tag << 16) | sender rank; receives match the full 64 bits.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/store.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

// Sets the UCX environment variables this project's transports want (TCP's segment size) where
// the user has not: call from main before other threads start (it uses setenv).
void SetUcxEnvironmentDefaults();

class UcxTransport final : public Transport {
 public:
  // Connects to all `size` ranks through `store` (keys under `prefix`, e.g. "job/gen3").
  // `single_host`: every rank runs on this host (the coordinator knows; it selects shared-memory
  // transports only, see the .cc). `host`: this rank's host as the job knows it (the worker's
  // --host; empty: gethostname), compared with the peers' to choose the endpoint mode. `lane`:
  // which of a communicator's transports this is (Communicator lanes); lane L > 0 publishes under
  // "<prefix>/ucx-lane<L>/<rank>".
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(int rank, int size, Store* store,
                                                               const std::string& prefix, absl::Time deadline,
                                                               bool single_host = false,
                                                               const std::string& host = "", int lane = 0);
  ~UcxTransport() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status Exchange(const std::vector<P2POp>& ops, absl::Time deadline, const char* what) override;
  void Abort() override { aborted_.store(true); }

 private:
  struct Impl;
  UcxTransport() = default;
  int rank_ = 0, size_ = 1;
  std::atomic<bool> aborted_{false};
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmsgd::comm
