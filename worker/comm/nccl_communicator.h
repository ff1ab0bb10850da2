// Gradient allreduce on GPUs with NCCL (one process per GPU).
//
// Bootstrap: rank 0 creates the NCCL unique id and publishes it in the Store under
// "<prefix>/nccl_unique_id/0" (through the coordinator in distributed runs); every rank reads
// it and joins with ncclCommInitRankConfig in NON-blocking mode, polling ncclCommGetAsyncError
// until the communicator is ready or the deadline passes (then ncclCommAbort): a rank that
// never shows up cannot hang the others.
//
// Collectives run on the communicator's own stream, ordered after the compute stream by an
// event (cudaStreamWaitEvent: no host synchronization on the hot path), and record a `done`
// event the optimizer's stream waits on. Wait() polls the done event and NCCL's asynchronous
// error state with a deadline; on error or timeout the communicator is aborted and the Status
// says what failed. Every CUDA/NCCL call is converted to a Status at the call site.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/comm/store.h"

namespace lmsgd::comm {

class NcclCommunicator {
 public:
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(int rank, int size, int device, Store* store,
                                                                  const std::string& prefix, absl::Time deadline);
  ~NcclCommunicator();

  int rank() const { return rank_; }
  int size() const { return size_; }
  cudaStream_t stream() const { return stream_; }

  // Sums `count` floats at `device_buffer` over all ranks, in place, after `ready` (recorded on
  // the producer's stream) and records `done` on completion. Returns at once. With
  // `bf16_scratch` (count bf16 on the device) the sum goes as ncclBfloat16: cast into it, summed,
  // cast back, all on the communicator's stream.
  absl::Status AllreduceAsync(float* device_buffer, size_t count, cudaEvent_t ready, cudaEvent_t done,
                              uint16_t* bf16_scratch = nullptr);
  // Broadcast from `root` (initial weights), same ordering rules.
  absl::Status BroadcastAsync(float* device_buffer, size_t count, int root, cudaEvent_t ready, cudaEvent_t done);
  // Waits for `done` with a deadline, checking NCCL's async error; aborts the communicator on
  // failure or timeout.
  absl::Status Wait(cudaEvent_t done, absl::Time deadline, const char* what);
  void Abort();

 private:
  NcclCommunicator() = default;
  int rank_ = 0, size_ = 1, device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool aborted_ = false;
};

}  // namespace lmsgd::comm
