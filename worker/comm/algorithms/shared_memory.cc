#include "worker/comm/algorithms/shared_memory.h"

#include "worker/comm/bf16_wire.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/comm/algorithms/tags.h"
#include "worker/comm/reduce.h"

namespace lmsgd::comm {

namespace {
constexpr int kShmMaxRanks = 64;
constexpr uint64_t kShmMagic = 0x6c6d7367642d7368ull;  // "lmsgd-sh"
struct alignas(64) ShmCounter {
  std::atomic<uint64_t> v;
  char pad[64 - sizeof(std::atomic<uint64_t>)];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "cross-process atomics must be lock-free");
const char* const kShmPhase[3] = {"publish its input", "reduce its slice", "copy the result out"};
}  // namespace

// flags[phase][rank] = the last chunk step rank has completed that phase for; pid / pid_ns:
// each rank's process id and pid namespace (to tell a peer that died from a slow one).
struct SharedMemoryAllreduce::Header {
  uint64_t magic;
  uint32_t size;
  uint32_t chunk;
  char pad[48];
  ShmCounter flags[3][kShmMaxRanks];
  int32_t pid[kShmMaxRanks];
  uint64_t pid_ns[kShmMaxRanks];
};

namespace {
uint64_t PidNamespace() {
  struct stat sb {};
  return stat("/proc/self/ns/pid", &sb) == 0 ? static_cast<uint64_t>(sb.st_ino) : 0;
}

// Whether process `pid` (in our pid namespace) has exited: gone, or a zombie not yet reaped.
bool ProcessExited(int pid) {
  if (kill(pid, 0) != 0) return errno == ESRCH;
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  const int fd = open(path, O_RDONLY);
  if (fd < 0) return false;
  char buf[256];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return false;
  buf[n] = 0;
  const char* paren = strrchr(buf, ')');  // "pid (comm) S ...": the state follows the last ')'
  return paren != nullptr && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}
}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemoryAllreduce>> SharedMemoryAllreduce::Create(Transport* t,
                                                                                     uint64_t tag_sequence,
                                                                                     absl::Time deadline,
                                                                                     size_t chunk_floats) {
  const int k = t->size(), r = t->rank();
  if (k > kShmMaxRanks) {
    return absl::FailedPreconditionError(absl::StrCat("shared-memory allreduce supports up to ", kShmMaxRanks,
                                                      " ranks on a host, not ", k));
  }
  auto a = std::unique_ptr<SharedMemoryAllreduce>(new SharedMemoryAllreduce());
  a->rank_ = r;
  a->size_ = k;
  if (chunk_floats == 0) {
    // Both slots of k inputs and a result within ~8 MiB (cache-resident), at most 1 MiB a rank.
    chunk_floats = std::min<size_t>(256 * 1024, (size_t{8} << 20) / (2 * static_cast<size_t>(k + 1) * sizeof(float)));
    chunk_floats = std::max<size_t>(16, chunk_floats / 16 * 16);
  }
  a->chunk_ = chunk_floats;
  const size_t header_bytes = (sizeof(Header) + 4095) / 4096 * 4096;
  a->bytes_ = header_bytes + 2 * static_cast<size_t>(k + 1) * chunk_floats * sizeof(float);
  char name[64] = {0};
  std::string error;
  // 1. Rank 0 creates the segment; its name (empty on failure) goes to every rank.
  if (r == 0) {
    std::random_device rd;
    snprintf(name, sizeof(name), "/lmsgd-allreduce-%d-%08x%08x", static_cast<int>(getpid()), rd(), rd());
    // The space is reserved up front (posix_fallocate): a full /dev/shm (containers default to
    // 64 MiB) is then this error, and the transport algorithms, not a SIGBUS at first touch.
    const int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    int err = fd < 0 ? errno : 0;
    if (fd >= 0 && ftruncate(fd, static_cast<off_t>(a->bytes_)) != 0) err = errno;
    if (fd >= 0 && err == 0) err = posix_fallocate(fd, 0, static_cast<off_t>(a->bytes_));
    if (err != 0) {
      error = absl::StrCat("creating shared memory ", name, " of ", a->bytes_, " bytes: ", strerror(err));
      if (fd >= 0) {
        close(fd);
        shm_unlink(name);
      }
      name[0] = 0;
    } else {
      void* p = mmap(nullptr, a->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      close(fd);
      if (p == MAP_FAILED) {
        error = absl::StrCat("mapping shared memory ", name, ": ", strerror(errno));
        shm_unlink(name);
        name[0] = 0;
      } else {
        a->base_ = p;
        Header* h = new (p) Header();
        h->magic = kShmMagic;
        h->size = static_cast<uint32_t>(k);
        h->chunk = static_cast<uint32_t>(chunk_floats);
        for (auto& phase : h->flags) {
          for (auto& c : phase) c.v.store(0, std::memory_order_relaxed);
        }
      }
    }
    std::vector<P2POp> ops;
    for (int q = 1; q < k; ++q) ops.push_back({P2POp::kSend, q, name, sizeof(name), MakeTag(tag_sequence, tags::kShmSegmentName)});
    if (auto st = t->Exchange(ops, deadline, "shared-memory allreduce setup (segment name)"); !st.ok()) {
      if (name[0]) shm_unlink(name);
      return st;
    }
  } else {
    RETURN_IF_ERROR(t->SendRecv(-1, nullptr, 0, 0, name, sizeof(name), MakeTag(tag_sequence, tags::kShmSegmentName), deadline, "shared-memory allreduce setup (segment name)"));
    name[sizeof(name) - 1] = 0;
    if (name[0] == 0) {
      error = "rank 0 could not create the shared-memory segment";
    } else {
      const int fd = shm_open(name, O_RDWR, 0600);
      struct stat sb {};
      if (fd < 0 || fstat(fd, &sb) != 0 || static_cast<size_t>(sb.st_size) != a->bytes_) {
        error = absl::StrCat("opening shared memory ", name, ": ", fd < 0 ? strerror(errno) : "unexpected size");
      } else {
        void* p = mmap(nullptr, a->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
          error = absl::StrCat("mapping shared memory ", name, ": ", strerror(errno));
        } else {
          a->base_ = p;
        }
      }
      if (fd >= 0) close(fd);
    }
  }
  if (a->base_ != nullptr) {
    Header* h = static_cast<Header*>(a->base_);
    h->pid[r] = static_cast<int32_t>(getpid());
    h->pid_ns[r] = PidNamespace();
  }
  // 2. Everyone reports to rank 0, which unlinks the name and tells all whether every rank
  //    mapped it, so the outcome is the same on every rank.
  uint8_t ok = error.empty() ? 1 : 0;
  if (r == 0) {
    std::vector<uint8_t> oks(k, 1);
    std::vector<P2POp> ops;
    for (int q = 1; q < k; ++q) ops.push_back({P2POp::kRecv, q, &oks[q], 1, MakeTag(tag_sequence, tags::kShmMapped)});
    absl::Status st = t->Exchange(ops, deadline, "shared-memory allreduce setup (status)");
    if (name[0]) shm_unlink(name);
    if (!st.ok()) return st;
    for (int q = 1; q < k; ++q) ok = ok && oks[q];
    ops.clear();
    for (int q = 1; q < k; ++q) ops.push_back({P2POp::kSend, q, &ok, 1, MakeTag(tag_sequence, tags::kShmGo)});
    RETURN_IF_ERROR(t->Exchange(ops, deadline, "shared-memory allreduce setup (verdict)"));
  } else {
    RETURN_IF_ERROR(t->SendRecv(0, &ok, 1, -1, nullptr, 0, MakeTag(tag_sequence, tags::kShmMapped), deadline,
                                "shared-memory allreduce setup (status)"));
    RETURN_IF_ERROR(t->SendRecv(-1, nullptr, 0, 0, &ok, 1, MakeTag(tag_sequence, tags::kShmGo), deadline,
                                "shared-memory allreduce setup (verdict)"));
  }
  if (!ok) {
    return absl::FailedPreconditionError(
        absl::StrCat("shared memory unavailable", error.empty() ? " on another rank" : ": " + error));
  }
  a->header_ = static_cast<Header*>(a->base_);
  if (a->header_->magic != kShmMagic || a->header_->size != static_cast<uint32_t>(k)) {
    return absl::InternalError("shared-memory allreduce: segment header mismatch");
  }
  a->slots_ = reinterpret_cast<float*>(static_cast<char*>(a->base_) + header_bytes);
  a->my_pid_ns_ = PidNamespace();
  return a;
}

SharedMemoryAllreduce::~SharedMemoryAllreduce() {
  if (base_ != nullptr) munmap(base_, bytes_);
}

void SharedMemoryAllreduce::Abort() { aborted_.store(true); }

// Waits until rank q has completed `phase` for chunk `step`: spin briefly, then yield (ranks
// may outnumber cores), then sleep in short naps, checking the deadline and Abort().
absl::Status SharedMemoryAllreduce::WaitOne(int phase, int q, uint64_t step, absl::Time deadline) {
  const std::atomic<uint64_t>& f = header_->flags[phase][q].v;
  for (uint64_t spins = 0; f.load(std::memory_order_acquire) < step; ++spins) {
    if (spins < 64) {
      __builtin_ia32_pause();
      continue;
    }
    if ((spins & 63) == 0) {
      if (aborted_.load(std::memory_order_relaxed)) return absl::AbortedError("shared-memory allreduce aborted");
      // A peer in our pid namespace that has exited will never come: fail now, not at the deadline.
      if ((spins & 4095) == 0 && header_->pid_ns[q] == my_pid_ns_ && my_pid_ns_ != 0 &&
          ProcessExited(header_->pid[q])) {
        return absl::UnavailableError(absl::StrFormat(
            "shared-memory allreduce: rank %d (pid %d) exited while this rank waited for it to %s (chunk %d)", q,
            header_->pid[q], kShmPhase[phase], step));
      }
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrFormat(
            "shared-memory allreduce: timed out waiting for rank %d to %s (chunk %d)", q, kShmPhase[phase], step));
      }
    }
    if (spins < 20000) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryAllreduce::WaitAll(int phase, uint64_t step, absl::Time deadline) {
  for (int q = 0; q < size_; ++q) {
    if (q != rank_) RETURN_IF_ERROR(WaitOne(phase, q, step, deadline));
  }
  return absl::OkStatus();
}

absl::Status SharedMemoryAllreduce::Run(float* data, size_t count, uint64_t /*sequence*/, absl::Time deadline,
                                        WireDtype wire) {
  const bool bf16 = wire == WireDtype::kBf16;
  const int k = size_, r = rank_;
  if (k == 1 || count == 0) return absl::OkStatus();
  if (aborted_.load()) return absl::AbortedError("shared-memory allreduce aborted");
  // Values per chunk: bf16 fills the same slots with twice as many (half the steps). Slices
  // start on cache-line boundaries of the buffer and (bf16) of the segment.
  const size_t chunk = bf16 ? 2 * chunk_ : chunk_;
  const size_t kLine = bf16 ? 32 : 16;
  for (size_t off = 0; off < count; off += chunk) {
    const size_t n = std::min(chunk, count - off);
    const uint64_t step = ++step_;
    float* in = slots_ + (step & 1) * static_cast<size_t>(k + 1) * chunk_;
    float* out = in + static_cast<size_t>(k) * chunk_;
    float* mine = data + off;
    const size_t lines = (n + kLine - 1) / kLine;
    auto slice = [&](int q, size_t* lo, size_t* hi) {
      *lo = std::min(n, BlockStart(lines, k, q) * kLine);
      *hi = std::min(n, BlockStart(lines, k, q + 1) * kLine);
    };
    size_t lo = 0, hi = 0;
    slice(r, &lo, &hi);
    // A. Publish the parts of this chunk the other ranks reduce (not this rank's own slice,
    //    which it reads from its buffer). The slot was last used two chunks ago: every rank
    //    must have copied that result out first.
    if (step > 2) RETURN_IF_ERROR(WaitAll(2, step - 2, deadline));
    float* my_in = in + static_cast<size_t>(r) * chunk_;
    // bf16: the same slots hold twice the values; rank q's input sits at in16 + q * chunk.
    uint16_t* in16 = reinterpret_cast<uint16_t*>(in);
    uint16_t* out16 = reinterpret_cast<uint16_t*>(out);
    if (bf16) {
      uint16_t* my16 = in16 + static_cast<size_t>(r) * chunk;
      FloatsToBf16(mine, my16, lo);
      FloatsToBf16(mine + hi, my16 + hi, n - hi);
    } else {
      std::memcpy(my_in, mine, lo * sizeof(float));
      std::memcpy(my_in + hi, mine + hi, (n - hi) * sizeof(float));
    }
    header_->flags[0][r].v.store(step, std::memory_order_release);
    RETURN_IF_ERROR(WaitAll(0, step, deadline));
    // B. This rank's slice summed in rank order (each element by one rank: identical results
    //    everywhere), into its buffer and into the result area for the others.
    // In tiles that stay in L1 while the k inputs are added into them.
    constexpr size_t kTile = 2048;
    for (size_t t = lo; t < hi; t += kTile) {
      const size_t len = std::min(kTile, hi - t);
      if (bf16 && k == 2) {  // one pass: the two values commute
        SumPairToBf16(mine + t, in16 + static_cast<size_t>(1 - r) * chunk + t, out16 + t, len);
        continue;
      }
      if (bf16) {
        // k + 1 passes over the tile: this rank's own values are rounded as they are added.
        float acc[kTile];
        for (int q = 0; q < k; ++q) {
          const uint16_t* src = in16 + static_cast<size_t>(q) * chunk + t;
          if (q == 0) {
            if (q == r) {
              RoundedFloats(mine + t, acc, len);
            } else {
              Bf16ToFloats(src, acc, len);
            }
          } else if (q == r) {
            AddRoundedFloats(acc, mine + t, len);
          } else {
            AddBf16(acc, src, len);
          }
        }
        NarrowAndWiden(acc, out16 + t, mine + t, len);
        continue;
      }
      float* acc = out + t;
      std::memcpy(acc, r == 0 ? mine + t : in + t, len * sizeof(float));
      for (int q = 1; q < k; ++q) AddFloats(acc, q == r ? mine + t : in + static_cast<size_t>(q) * chunk_ + t, len);
      std::memcpy(mine + t, acc, len * sizeof(float));
    }
    header_->flags[1][r].v.store(step, std::memory_order_release);
    // C. The other ranks' slices, each as soon as it is ready.
    for (int q = 0; q < k; ++q) {
      if (q == r) continue;
      RETURN_IF_ERROR(WaitOne(1, q, step, deadline));
      size_t qlo = 0, qhi = 0;
      slice(q, &qlo, &qhi);
      if (bf16) {
        Bf16ToFloats(out16 + qlo, mine + qlo, qhi - qlo);
      } else {
        std::memcpy(mine + qlo, out + qlo, (qhi - qlo) * sizeof(float));
      }
    }
    header_->flags[2][r].v.store(step, std::memory_order_release);
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::comm
