// Asynchronous collectives for one generation of a job (after PyTorch c10d's Backend/Work).
//
// Every call enqueues a collective and returns a Work handle at once. Collectives run on c
// lanes (the paper's bounded number c of concurrent allreduces): the i-th collective issued
// goes to lane i mod c, and each lane, a transport of its own (its own UCX worker and
// endpoints) with its own communication thread, runs its queue in FIFO order. Every rank issues
// collectives in the same order, so every lane runs the same collectives in the same order on
// every rank; at most c run at once. Work::Wait(deadline) returns the collective's Status or
// DEADLINE_EXCEEDED. Each collective also has its own timeout (`collective_timeout`, default
// 60 s): a stalled or dead peer fails it with an error naming the peer, never a hang. After any
// failure the communicator is broken: the other lanes' transports are aborted (a collective in
// flight there returns at once), and every collective not yet finished, and every new call,
// returns the first failure. Abort() unblocks everything (ABORTED). A new generation builds a
// new Communicator; nothing is reused.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/algorithms/allreduce.h"
#include "worker/comm/algorithms/broadcast_barrier.h"
#include "worker/comm/algorithms/halving_doubling.h"
#include "worker/comm/algorithms/hierarchical.h"
#include "worker/comm/algorithms/ring.h"
#include "worker/comm/algorithms/shared_memory.h"
#include "worker/comm/store.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

class Work {
 public:
  absl::Status Wait(absl::Time deadline);
  bool Done();

 private:
  friend class Communicator;
  void Complete(absl::Status status);
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
  std::string what_;
};

struct CommunicatorOptions {
  Algorithm algorithm = Algorithm::kAuto;  // kAuto: ChooseAlgorithm per collective
  absl::Duration collective_timeout = absl::Seconds(60);
  std::vector<std::string> host_of_rank;   // for kHierarchical / kAuto; empty = all on one host
  // Halving/doubling switches to recursive doubling up to this message size (0: never).
  size_t recursive_doubling_max_bytes = HalvingDoublingAllreduce::kDefaultDoublingMaxBytes;
  // Where ring and halving/doubling are chosen by size (kAuto across hosts; the hierarchical
  // allreduce's phase among host leaders): halving/doubling up to this size.
  size_t halving_doubling_max_bytes = kHalvingDoublingMaxBytes;
};

// The AUTO choice (the figures behind it: docs/benchmarks.md, "Allreduce"). Every rank on one
// host with the shared-memory segment mapped: shared memory at every size (one read and one
// write of each buffer against a transport's several copies); otherwise halving/doubling up to
// halving_doubling_max_bytes (latency: recursive doubling's log2 k steps, or 2 log2 k - 1,
// against the ring's 2(k-1)), ring above (bandwidth-optimal, pipelined); hierarchical when the
// ranks span several hosts with more than one rank on some (its leaders then choose between
// halving/doubling and ring by the same size).
Algorithm ChooseAlgorithm(size_t bytes, int world_size, int hosts, bool shared_memory = false,
                          size_t halving_doubling_max_bytes = kHalvingDoublingMaxBytes);

class Communicator {
 public:
  // One lane per transport (already connected; every one over the same ranks, each rank giving
  // them in the same order): c = lanes.size() collectives at most run at once. Takes ownership.
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(std::vector<std::unique_ptr<Transport>> lanes,
                                                              const CommunicatorOptions& options);
  // One lane: one collective at a time.
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(std::unique_ptr<Transport> transport,
                                                              const CommunicatorOptions& options);
  ~Communicator();

  int rank() const { return lanes_[0]->transport->rank(); }
  int size() const { return lanes_[0]->transport->size(); }
  int lanes() const { return static_cast<int>(lanes_.size()); }

  std::shared_ptr<Work> AllreduceAsync(float* data, size_t count);
  std::shared_ptr<Work> BroadcastAsync(float* data, size_t count, int root);
  std::shared_ptr<Work> BarrierAsync();
  // Fails every pending and future collective with ABORTED; returns without waiting for peers.
  void Abort();

 private:
  Communicator() = default;
  struct Lane;
  struct Op {
    std::shared_ptr<Work> work;
    std::function<absl::Status(Lane&, uint64_t, absl::Time)> fn;
  };
  // A transport with its algorithms, queue and thread. Sequence numbers (message tags) count per
  // lane: each lane's transport has its own tag space.
  struct Lane {
    int index = 0;
    std::unique_ptr<Transport> transport;
    std::unique_ptr<AllreduceAlgorithm> ring, halving_doubling;
    std::unique_ptr<HierarchicalAllreduce> hierarchical;
    std::unique_ptr<SharedMemoryAllreduce> shared_memory;  // null unless every rank is on one host
    std::deque<Op> queue;  // guarded by mu_
    uint64_t next_seq = 1;
    std::thread thread;
    void AbortTransport();  // thread-safe
  };
  // `fn` runs on the lane the collective falls to.
  std::shared_ptr<Work> Enqueue(std::string what,
                                std::function<absl::Status(Lane&, uint64_t seq, absl::Time deadline)> fn);
  void Loop(Lane& lane);

  CommunicatorOptions options_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  int num_hosts_ = 1;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  absl::Status broken_;    // first failure; sticky
  uint64_t next_issue_ = 0;  // collectives issued so far: the next goes to lane next_issue_ % c
};

}  // namespace lmsgd::comm
