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
  return bytes <= halving_doubling_max_bytes ? Algorithm::kHalvingDoubling : Algorithm::kRing;
}

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::Create(std::unique_ptr<Transport> transport,
                                                                   const CommunicatorOptions& options) {
  auto c = std::unique_ptr<Communicator>(new Communicator());
  c->transport_ = std::move(transport);
  c->options_ = options;
  c->ring_ = std::make_unique<RingAllreduce>(c->transport_.get());
  c->halving_doubling_ =
      std::make_unique<HalvingDoublingAllreduce>(c->transport_.get(), options.recursive_doubling_max_bytes);
  std::vector<std::string> hosts = options.host_of_rank;
  if (hosts.empty()) hosts.assign(c->transport_->size(), "localhost");
  c->num_hosts_ = static_cast<int>(std::set<std::string>(hosts.begin(), hosts.end()).size());
  auto h = HierarchicalAllreduce::Create(c->transport_.get(), hosts, absl::Now() + options.collective_timeout,
                                         options.halving_doubling_max_bytes, options.recursive_doubling_max_bytes);
  if (!h.ok()) return h.status();
  c->hierarchical_ = std::move(*h);
  // One host: map the shared-memory segment (a collective; sequence 0 is never a collective's).
  // Unavailable shared memory (the same verdict on every rank) leaves the transport algorithms.
  if (c->num_hosts_ == 1 && c->transport_->size() > 1) {
    auto shm = SharedMemoryAllreduce::Create(c->transport_.get(), /*tag_sequence=*/0,
                                             absl::Now() + options.collective_timeout);
    if (shm.ok()) {
      c->shared_memory_ = std::move(*shm);
    } else if (shm.status().code() != absl::StatusCode::kFailedPrecondition) {
      return shm.status();
    }
  }
  if (options.algorithm == Algorithm::kSharedMemory && c->shared_memory_ == nullptr && c->transport_->size() > 1) {
    return absl::FailedPreconditionError(
        "allreduce algorithm shared_memory needs every rank on one host and POSIX shared memory");
  }
  c->thread_ = std::thread([p = c.get()] { p->Loop(); });
  return c;
}

Communicator::~Communicator() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  transport_->Abort();  // a collective in flight returns promptly
  if (shared_memory_) shared_memory_->Abort();
  if (hierarchical_) hierarchical_->Abort();
  if (thread_.joinable()) thread_.join();
}

void Communicator::Abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.ok()) broken_ = absl::AbortedError("communicator aborted");
  }
  transport_->Abort();
  if (shared_memory_) shared_memory_->Abort();
  if (hierarchical_) hierarchical_->Abort();
  cv_.notify_all();
}

std::shared_ptr<Work> Communicator::Enqueue(std::string what,
                                            std::function<absl::Status(uint64_t, absl::Time)> fn) {
  auto work = std::make_shared<Work>();
  work->what_ = std::move(what);
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_.ok() || stop_) {
    work->Complete(broken_.ok() ? absl::AbortedError("communicator shut down") : broken_);
    return work;
  }
  queue_.push_back(Op{work, std::move(fn)});
  cv_.notify_all();
  return work;
}

void Communicator::Loop() {
  for (;;) {
    Op op;
    uint64_t seq;
    absl::Status broken;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      op = std::move(queue_.front());
      queue_.pop_front();
      seq = next_seq_++;
      broken = broken_;
    }
    if (!broken.ok()) {
      op.work->Complete(broken);
      continue;
    }
    absl::Status st = op.fn(seq, absl::Now() + options_.collective_timeout);
    if (!st.ok()) {
      st = absl::Status(st.code(), absl::StrCat("rank ", transport_->rank(), ": ", op.work->what_, " #", seq, ": ",
                                                st.message()));
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_.ok()) broken_ = st;
    }
    op.work->Complete(st);
  }
}

std::shared_ptr<Work> Communicator::AllreduceAsync(float* data, size_t count) {
  Algorithm choice = options_.algorithm;
  if (choice == Algorithm::kAuto) {
    choice = ChooseAlgorithm(count * sizeof(float), size(), num_hosts_, shared_memory_ != nullptr,
                             options_.halving_doubling_max_bytes);
  }
  AllreduceAlgorithm* algo = ring_.get();
  if (choice == Algorithm::kHalvingDoubling) algo = halving_doubling_.get();
  if (choice == Algorithm::kHierarchical) algo = hierarchical_.get();
  if (choice == Algorithm::kSharedMemory && shared_memory_) algo = shared_memory_.get();
  return Enqueue(absl::StrCat("allreduce of ", count, " floats"),
                 [algo, data, count](uint64_t seq, absl::Time deadline) { return algo->Run(data, count, seq, deadline); });
}

std::shared_ptr<Work> Communicator::BroadcastAsync(float* data, size_t count, int root) {
  return Enqueue(absl::StrCat("broadcast of ", count, " floats from rank ", root),
                 [this, data, count, root](uint64_t seq, absl::Time deadline) {
                   return Broadcast(transport_.get(), data, count, root, seq, deadline);
                 });
}

std::shared_ptr<Work> Communicator::BarrierAsync() {
  return Enqueue("barrier", [this](uint64_t seq, absl::Time deadline) { return Barrier(transport_.get(), seq, deadline); });
}

}  // namespace lmsgd::comm
