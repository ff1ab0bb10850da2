#include "worker/comm/communicator.h"

#include <set>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lmsgd::comm {

absl::Status Work::Wait(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  // Clamped so that an infinite deadline does not overflow the clock arithmetic.
  const absl::Duration left = std::clamp(deadline - absl::Now(), absl::ZeroDuration(), absl::Hours(24 * 365));
  const auto until = std::chrono::system_clock::now() + absl::ToChronoNanoseconds(left);
  if (!cv_.wait_until(lock, until, [&] { return done_; })) {
    return absl::DeadlineExceededError(absl::StrCat("waiting for ", what_));
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

std::shared_ptr<Work> Communicator::Enqueue(std::string what,
                                            std::function<absl::Status(Lane&, uint64_t, absl::Time)> fn) {
  auto work = std::make_shared<Work>();
  work->what_ = std::move(what);
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_.ok() || stop_) {
    work->Complete(broken_.ok() ? absl::AbortedError("communicator shut down") : broken_);
    return work;
  }
  lanes_[next_issue_++ % lanes_.size()]->queue.push_back(Op{work, std::move(fn)});
  cv_.notify_all();
  return work;
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
    if (!broken.ok()) {
      op.work->Complete(broken);
      continue;
    }
    absl::Status st = op.fn(lane, seq, absl::Now() + options_.collective_timeout);
    if (!st.ok()) {
      bool first = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (broken_.ok()) {
          broken_ = absl::Status(st.code(), absl::StrCat("rank ", lane.transport->rank(), ": ", op.work->what_, " #",
                                                         seq, lanes_.size() > 1 ? absl::StrCat(" on lane ", lane.index) : "",
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
      }
    }
    op.work->Complete(st);
  }
}

std::shared_ptr<Work> Communicator::AllreduceAsync(float* data, size_t count) {
  const CommunicatorOptions& o = options_;
  const int hosts = num_hosts_;
  return Enqueue(absl::StrCat("allreduce of ", count, " floats"),
                 [data, count, &o, hosts](Lane& l, uint64_t seq, absl::Time deadline) {
                   Algorithm choice = o.algorithm;
                   if (choice == Algorithm::kAuto) {
                     choice = ChooseAlgorithm(count * sizeof(float), l.transport->size(), hosts,
                                              l.shared_memory != nullptr, o.halving_doubling_max_bytes);
                   }
                   AllreduceAlgorithm* algo = l.ring.get();
                   if (choice == Algorithm::kHalvingDoubling) algo = l.halving_doubling.get();
                   if (choice == Algorithm::kHierarchical) algo = l.hierarchical.get();
                   if (choice == Algorithm::kSharedMemory && l.shared_memory) algo = l.shared_memory.get();
                   return algo->Run(data, count, seq, deadline);
                 });
}

std::shared_ptr<Work> Communicator::BroadcastAsync(float* data, size_t count, int root) {
  return Enqueue(absl::StrCat("broadcast of ", count, " floats from rank ", root),
                 [data, count, root](Lane& l, uint64_t seq, absl::Time deadline) {
                   return Broadcast(l.transport.get(), data, count, root, seq, deadline);
                 });
}

std::shared_ptr<Work> Communicator::BarrierAsync() {
  return Enqueue("barrier", [](Lane& l, uint64_t seq, absl::Time deadline) {
    return Barrier(l.transport.get(), seq, deadline);
  });
}

}  // namespace lmsgd::comm
