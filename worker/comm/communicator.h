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
//
// Flight recorder (after NCCL's and PyTorch's): the last kFlightRecorderSize collectives are kept
// with their issue number (the same collective has the same number on every rank), lane and
// sequence, algorithm, bytes, times, outcome and the peer each waited for (live while it runs).
// The first failure logs the recent ones; a Work that times out names its collective's state.
// completed() is the issue number up to which every collective succeeded: comparing it across
// ranks tells which rank fell behind (the worker reports it with a failure).
#pragma once

#include <atomic>
#include <condition_variable>
#include <set>
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
#include "worker/comm/bf16_wire.h"
#include "worker/comm/store.h"
#include "worker/comm/transport.h"

namespace lmsgd::comm {

// One collective as the flight recorder holds it.
struct CollectiveRecord {
  enum State { kQueued, kRunning, kOk, kFailed };
  uint64_t issue = 0;      // 1-based place in the order collectives were issued
  std::string what;        // "allreduce of 77754 floats", "broadcast of ...", "barrier"
  std::string algorithm;   // "ring", "halving_doubling", "hierarchical", "shared_memory", ... ("" while queued)
  size_t bytes = 0;
  int lane = 0;
  uint64_t seq = 0;        // its sequence on its lane (its message tags); 0 while queued
  absl::Time enqueued = absl::InfinitePast(), started = absl::InfinitePast(), finished = absl::InfinitePast();
  int waited_for = -1;     // running: the peer it waits for; finished: the last it waited for (-1: none known)
  State state = kQueued;
  std::string error;       // kFailed
};
// "#412 allreduce of 77754 floats (311.0 KB) ring lane 0 seq 137: running 40.02 s, waiting for rank 1"
std::string FormatCollectiveRecord(const CollectiveRecord& record, absl::Time now);

class Work {
 public:
  absl::Status Wait(absl::Time deadline);
  bool Done();

 private:
  friend class Communicator;
  struct Trace {
    std::mutex mu;
    CollectiveRecord record;
    std::atomic<int> waiting{-1};  // written by the transport while the collective runs
    CollectiveRecord Snapshot();
  };
  void Complete(absl::Status status);
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
  std::shared_ptr<Trace> trace_;
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

  // kBf16: on the wire as bf16 (bf16_wire.h), float32 additions; the result is bitwise the same
  // on every rank.
  std::shared_ptr<Work> AllreduceAsync(float* data, size_t count, WireDtype wire = WireDtype::kFp32);
  std::shared_ptr<Work> BroadcastAsync(float* data, size_t count, int root);
  std::shared_ptr<Work> BarrierAsync();
  // Every collective up to this issue number succeeded (0: none yet).
  uint64_t completed();
  // A collective failed or Abort() was called: every later one fails.
  bool failed();
  // The flight recorder: the last kFlightRecorderSize collectives, oldest first; and the last
  // `n` of them, one formatted line each.
  static constexpr size_t kFlightRecorderSize = 64;
  std::vector<CollectiveRecord> Recent();
  std::string FlightRecord(size_t n = 16);
  // Fails every pending and future collective with ABORTED; returns without waiting for peers.
  void Abort();

 private:
  Communicator() = default;
  struct Lane;
  // Runs the collective on its lane with its sequence; names the algorithm it chose.
  using OpFn = std::function<absl::Status(Lane&, uint64_t seq, absl::Time deadline, std::string* algorithm)>;
  struct Op {
    std::shared_ptr<Work> work;
    OpFn fn;
  };
  // A transport with its algorithms, queue and thread. Sequence numbers (message tags) count per
  // lane: each lane's transport has its own tag space.
  struct Lane {
    int index = 0;
    std::unique_ptr<Transport> transport;
    std::unique_ptr<AllreduceAlgorithm> ring, halving_doubling;
    std::unique_ptr<Transport> bf16_wire;  // over `transport`
    std::unique_ptr<AllreduceAlgorithm> bf16_ring, bf16_halving_doubling;
    std::unique_ptr<HierarchicalAllreduce> hierarchical;
    std::unique_ptr<SharedMemoryAllreduce> shared_memory;  // null unless every rank is on one host
    std::deque<Op> queue;  // guarded by mu_
    uint64_t next_seq = 1;
    std::thread thread;
    void AbortTransport();  // thread-safe
  };
  // `fn` runs on the lane the collective falls to.
  std::shared_ptr<Work> Enqueue(std::string what, size_t bytes, OpFn fn);
  void Loop(Lane& lane);
  void Finished(const Work::Trace& trace, bool ok);  // under mu_

  CommunicatorOptions options_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  int num_hosts_ = 1;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  absl::Status broken_;    // first failure; sticky
  uint64_t next_issue_ = 0;  // collectives issued so far: the next goes to lane next_issue_ % c
  std::deque<std::shared_ptr<Work::Trace>> recent_;  // the flight recorder, oldest first
  uint64_t completed_ = 0;             // every collective up to this issue succeeded
  std::set<uint64_t> completed_ahead_;  // succeeded ones beyond completed_ + 1 (other lanes)
};

}  // namespace lmsgd::comm
