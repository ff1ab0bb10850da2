#include "worker/comm/communicator.h"

#include <set>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"

namespace lmsgd::comm {

std::string FormatCollectiveRecord(const CollectiveRecord& r, absl::Time now) {
  std::string s = absl::StrFormat("#%d %s (%.1f KB)", r.issue, r.what, r.bytes / 1e3);
  if (!r.algorithm.empty()) absl::StrAppend(&s, " ", r.algorithm);
  if (r.seq > 0) absl::StrAppend(&s, " lane ", r.lane, " seq ", r.seq);
  auto seconds = [](absl::Duration d) { return absl::StrFormat("%.3f s", absl::ToDoubleSeconds(d)); };
  switch (r.state) {
    case CollectiveRecord::kQueued: absl::StrAppend(&s, ": queued ", seconds(now - r.enqueued)); break;
    case CollectiveRecord::kRunning: absl::StrAppend(&s, ": running ", seconds(now - r.started)); break;
    case CollectiveRecord::kOk: absl::StrAppend(&s, ": ok in ", seconds(r.finished - r.started)); break;
    case CollectiveRecord::kFailed:
      absl::StrAppend(&s, ": FAILED after ", seconds(r.finished - r.started), " (", r.error, ")");
      break;
  }
  if (r.waited_for >= 0) {
    absl::StrAppend(&s, r.state == CollectiveRecord::kRunning ? ", waiting for rank " : ", last waited for rank ",
                    r.waited_for);
  }
  return s;
}

CollectiveRecord Work::Trace::Snapshot() {
  std::lock_guard<std::mutex> lock(mu);
  CollectiveRecord r = record;
  if (r.state == CollectiveRecord::kRunning) r.waited_for = waiting.load(std::memory_order_relaxed);
  return r;
}

absl::Status Work::Wait(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  // Clamped so that an infinite deadline does not overflow the clock arithmetic.
  const absl::Duration left = std::clamp(deadline - absl::Now(), absl::ZeroDuration(), absl::Hours(24 * 365));
  const auto until = std::chrono::system_clock::now() + absl::ToChronoNanoseconds(left);
  if (!cv_.wait_until(lock, until, [&] { return done_; })) {
    return absl::DeadlineExceededError(
        absl::StrCat("waiting for ", FormatCollectiveRecord(trace_->Snapshot(), absl::Now())));
  }
  return status_;
}

bool Work::Done() {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

void Work::Complete(absl::Status status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    status_ = std::move(status);
  }
  cv_.notify_all();
}

Algorithm ChooseAlgorithm(size_t bytes, int world_size, int hosts, bool shared_memory,
                          size_t halving_doubling_max_bytes) {
  if (hosts > 1 && world_size > hosts) return Algorithm::kHierarchical;
  if (hosts == 1 && shared_memory) return Algorithm::kSharedMemory;
  return RingOrHalvingDoubling(bytes, halving_doubling_max_bytes);
}

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::Create(std::unique_ptr<Transport> transport,
                                                                   const CommunicatorOptions& options) {
  std::vector<std::unique_ptr<Transport>> lanes;
  lanes.push_back(std::move(transport));
  return Create(std::move(lanes), options);
}

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::Create(std::vector<std::unique_ptr<Transport>> transports,
                                                                   const CommunicatorOptions& options) {
  if (transports.empty()) return absl::InvalidArgumentError("a communicator needs at least one transport");
  for (const auto& t : transports) {
    if (t->rank() != transports[0]->rank() || t->size() != transports[0]->size()) {
      return absl::InvalidArgumentError(absl::StrCat("transports disagree: rank ", t->rank(), " of ", t->size(),
                                                     " vs rank ", transports[0]->rank(), " of ",
                                                     transports[0]->size()));
    }
  }
  auto c = std::unique_ptr<Communicator>(new Communicator());
  c->options_ = options;
  const int k = transports[0]->size();
  std::vector<std::string> hosts = options.host_of_rank;
  if (hosts.empty()) hosts.assign(k, "localhost");
  c->num_hosts_ = static_cast<int>(std::set<std::string>(hosts.begin(), hosts.end()).size());
  for (size_t i = 0; i < transports.size(); ++i) {
    auto lane = std::make_unique<Lane>();
    Lane& l = *lane;
    l.index = static_cast<int>(i);
    l.transport = std::move(transports[i]);
    l.ring = std::make_unique<RingAllreduce>(l.transport.get());
    l.halving_doubling = std::make_unique<HalvingDoublingAllreduce>(l.transport.get(), options.recursive_doubling_max_bytes);
    l.bf16_wire = std::make_unique<Bf16WireTransport>(l.transport.get());
    l.bf16_ring = std::make_unique<RingAllreduce>(l.bf16_wire.get());
    l.bf16_halving_doubling =
        std::make_unique<HalvingDoublingAllreduce>(l.bf16_wire.get(), options.recursive_doubling_max_bytes, WireDtype::kBf16);
    auto h = HierarchicalAllreduce::Create(l.transport.get(), hosts, absl::Now() + options.collective_timeout,
                                           options.halving_doubling_max_bytes, options.recursive_doubling_max_bytes);
    if (!h.ok()) return h.status();
    l.hierarchical = std::move(*h);
    // One host: map the lane's shared-memory segment (a collective; sequence 0 is never a
    // collective's). Unavailable shared memory (the same verdict on every rank) leaves the
    // transport algorithms.
    if (c->num_hosts_ == 1 && k > 1) {
      auto shm = SharedMemoryAllreduce::Create(l.transport.get(), /*tag_sequence=*/0,
                                               absl::Now() + options.collective_timeout);
      if (shm.ok()) {
        l.shared_memory = std::move(*shm);
      } else if (shm.status().code() != absl::StatusCode::kFailedPrecondition) {
        return shm.status();
      }
    }
    if (options.algorithm == Algorithm::kSharedMemory && l.shared_memory == nullptr && k > 1) {
      return absl::FailedPreconditionError(
          "allreduce algorithm shared_memory needs every rank on one host and POSIX shared memory");
    }
    c->lanes_.push_back(std::move(lane));
  }
  for (auto& lane : c->lanes_) lane->thread = std::thread([p = c.get(), l = lane.get()] { p->Loop(*l); });
  return c;
}

void Communicator::Lane::AbortTransport() {
  transport->Abort();  // a collective in flight returns promptly
  if (shared_memory) shared_memory->Abort();
  if (hierarchical) hierarchical->Abort();
}

Communicator::~Communicator() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& lane : lanes_) lane->AbortTransport();
  for (auto& lane : lanes_) {
    if (lane->thread.joinable()) lane->thread.join();
  }
}

void Communicator::Abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok()) broken_ = absl::AbortedError("communicator aborted");
  }
  for (auto& lane : lanes_) lane->AbortTransport();
  cv_.notify_all();
}

std::shared_ptr<Work> Communicator::Enqueue(std::string what, size_t bytes, OpFn fn) {
  auto work = std::make_shared<Work>();
  work->trace_ = std::make_shared<Work::Trace>();
  CollectiveRecord& r = work->trace_->record;  // nobody else sees the trace yet
  r.what = std::move(what);
  r.bytes = bytes;
  r.enqueued = absl::Now();
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_.ok() || stop_) {
    work->Complete(broken_.ok() ? absl::AbortedError("communicator shut down") : broken_);
    return work;
  }
  r.issue = next_issue_ + 1;
  r.lane = static_cast<int>(next_issue_ % lanes_.size());
  lanes_[next_issue_++ % lanes_.size()]->queue.push_back(Op{work, std::move(fn)});
  recent_.push_back(work->trace_);
  if (recent_.size() > kFlightRecorderSize) recent_.pop_front();
  cv_.notify_all();
  return work;
}

void Communicator::Finished(const Work::Trace& trace, bool ok) {
  if (!ok) return;
  completed_ahead_.insert(trace.record.issue);
  while (!completed_ahead_.empty() && *completed_ahead_.begin() == completed_ + 1) {
    completed_ahead_.erase(completed_ahead_.begin());
    ++completed_;
  }
}

bool Communicator::failed() {
  std::lock_guard<std::mutex> lock(mu_);
  return !broken_.ok();
}

uint64_t Communicator::completed() {
  std::lock_guard<std::mutex> lock(mu_);
  return completed_;
}

std::vector<CollectiveRecord> Communicator::Recent() {
  std::vector<std::shared_ptr<Work::Trace>> traces;
  {
    std::lock_guard<std::mutex> lock(mu_);
    traces.assign(recent_.begin(), recent_.end());
  }
  std::vector<CollectiveRecord> out;
  for (const auto& t : traces) out.push_back(t->Snapshot());
  return out;
}

std::string Communicator::FlightRecord(size_t n) {
  const std::vector<CollectiveRecord> recent = Recent();
  const absl::Time now = absl::Now();
  std::string s = absl::StrCat("flight recorder of rank ", rank(), ": the last ", std::min(n, recent.size()),
                               " collectives (every one up to #", completed(), " succeeded)");
  for (size_t i = recent.size() > n ? recent.size() - n : 0; i < recent.size(); ++i) {
    absl::StrAppend(&s, "\n  ", FormatCollectiveRecord(recent[i], now));
  }
  return s;
}

void Communicator::Loop(Lane& lane) {
  for (;;) {
    Op op;
    uint64_t seq;
    absl::Status broken;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !lane.queue.empty(); });
      if (lane.queue.empty()) return;
      op = std::move(lane.queue.front());
      lane.queue.pop_front();
      seq = lane.next_seq++;
      broken = broken_;
    }
    Work::Trace& trace = *op.work->trace_;
    if (!broken.ok()) {
      {
        std::lock_guard<std::mutex> tl(trace.mu);
        trace.record.state = CollectiveRecord::kFailed;
        trace.record.error = "not run: the communicator had failed";
        trace.record.started = trace.record.finished = absl::Now();
      }
      op.work->Complete(broken);
      continue;
    }
    {
      std::lock_guard<std::mutex> tl(trace.mu);
      trace.record.seq = seq;
      trace.record.started = absl::Now();
      trace.record.state = CollectiveRecord::kRunning;
    }
    std::string algorithm;
    lane.transport->set_wait_observer(&trace.waiting);
    absl::Status st = op.fn(lane, seq, absl::Now() + options_.collective_timeout, &algorithm);
    lane.transport->set_wait_observer(nullptr);
    {
      std::lock_guard<std::mutex> tl(trace.mu);
      trace.record.algorithm = algorithm;
      trace.record.finished = absl::Now();
      trace.record.waited_for = trace.waiting.load(std::memory_order_relaxed);
      trace.record.state = st.ok() ? CollectiveRecord::kOk : CollectiveRecord::kFailed;
      if (!st.ok()) trace.record.error = std::string(st.message());
    }
    if (!st.ok()) {
      bool first = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (broken_.ok()) {
          broken_ = absl::Status(st.code(), absl::StrCat("rank ", lane.transport->rank(), ": ", trace.record.what,
                                                         " #", seq,
                                                         lanes_.size() > 1 ? absl::StrCat(" on lane ", lane.index) : "",
                                                         ": ", st.message()));
          first = true;
        }
        st = broken_;  // a collective that another lane's failure aborted reports that failure
      }
      // The other lanes' collectives in flight cannot succeed now: unblock them.
      if (first) {
        for (auto& other : lanes_) {
          if (other.get() != &lane) other->AbortTransport();
        }
        LOG(WARNING) << FlightRecord();
      }
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      Finished(trace, true);
    }
    op.work->Complete(st);
  }
}

std::shared_ptr<Work> Communicator::AllreduceAsync(float* data, size_t count, WireDtype wire) {
  const CommunicatorOptions& o = options_;
  const int hosts = num_hosts_;
  const bool bf16 = wire == WireDtype::kBf16;
  // The choice is by the bytes on the wire.
  const size_t bytes = count * (bf16 ? sizeof(uint16_t) : sizeof(float));
  return Enqueue(absl::StrCat("allreduce of ", count, bf16 ? " floats as bf16" : " floats"), bytes,
                 [data, count, bytes, wire, bf16, &o, hosts](Lane& l, uint64_t seq, absl::Time deadline,
                                                           std::string* name) {
                   Algorithm choice = o.algorithm;
                   if (choice == Algorithm::kAuto) {
                     choice = ChooseAlgorithm(bytes, l.transport->size(), hosts, l.shared_memory != nullptr,
                                              o.halving_doubling_max_bytes);
                   }
                   if (choice == Algorithm::kSharedMemory && !l.shared_memory) choice = Algorithm::kRing;
                   *name = AlgorithmName(choice);
                   absl::Status st;
                   switch (choice) {
                     case Algorithm::kHalvingDoubling:
                       st = (bf16 ? l.bf16_halving_doubling : l.halving_doubling)->Run(data, count, seq, deadline);
                       break;
                     case Algorithm::kHierarchical: st = l.hierarchical->Run(data, count, seq, deadline, wire); break;
                     case Algorithm::kSharedMemory: st = l.shared_memory->Run(data, count, seq, deadline, wire); break;
                     default: st = (bf16 ? l.bf16_ring : l.ring)->Run(data, count, seq, deadline); break;
                   }
                   return st;
                 });
}

std::shared_ptr<Work> Communicator::BroadcastAsync(float* data, size_t count, int root) {
  return Enqueue(absl::StrCat("broadcast of ", count, " floats from rank ", root), count * sizeof(float),
                 [data, count, root](Lane& l, uint64_t seq, absl::Time deadline, std::string* name) {
                   *name = "broadcast";
                   return Broadcast(l.transport.get(), data, count, root, seq, deadline);
                 });
}

std::shared_ptr<Work> Communicator::BarrierAsync() {
  return Enqueue("barrier", 0, [](Lane& l, uint64_t seq, absl::Time deadline, std::string* name) {
    *name = "barrier";
    return Barrier(l.transport.get(), seq, deadline);
  });
}

}  // namespace lmsgd::comm
