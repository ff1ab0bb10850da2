#include "worker/comm/nccl_communicator.h"

#include "worker/backend/cuda/kernels.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/backend/cuda/cuda_check.h"

namespace lmsgd::comm {
namespace {

absl::Status NcclStatus(ncclResult_t r, ncclComm_t comm, const char* expr, const char* file, int line) {
  if (r == ncclSuccess || r == ncclInProgress) return absl::OkStatus();
  const char* last = comm != nullptr ? ncclGetLastError(comm) : ncclGetLastError(nullptr);
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, ": ", ncclGetErrorString(r),
                                          last && *last ? absl::StrCat(" (", last, ")") : ""));
}

#define NCCL_RETURN_IF_ERROR(comm, expr) RETURN_IF_ERROR(NcclStatus((expr), (comm), #expr, __FILE__, __LINE__))

// Polls the communicator's async state until it is no longer in progress.
absl::Status WaitReady(ncclComm_t comm, absl::Time deadline, const std::string& what) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    NCCL_RETURN_IF_ERROR(comm, ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return NcclStatus(state, comm, what.c_str(), __FILE__, __LINE__);
    if (absl::Now() > deadline) return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(int rank, int size, int device,
                                                                           Store* store, const std::string& prefix,
                                                                           absl::Time deadline) {
  auto c = std::unique_ptr<NcclCommunicator>(new NcclCommunicator());
  c->rank_ = rank;
  c->size_ = size;
  c->device_ = device;
  CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  ncclUniqueId id;
  const std::string key = absl::StrCat(prefix, "/nccl_unique_id/0");
  if (rank == 0) {
    NCCL_RETURN_IF_ERROR(nullptr, ncclGetUniqueId(&id));
    RETURN_IF_ERROR(store->Set(key, std::string(id.internal, sizeof(id.internal))));
  } else {
    auto v = store->Get(key, deadline);
    if (!v.ok()) return absl::Status(v.status().code(), absl::StrCat("rank ", rank, " waiting for rank 0's NCCL unique id: ",
                                                                     v.status().message()));
    if (v->size() != sizeof(id.internal)) {
      return absl::DataLossError(absl::StrCat("NCCL unique id has ", v->size(), " bytes, expected ", sizeof(id.internal)));
    }
    std::copy(v->begin(), v->end(), id.internal);
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // init and collectives return at once; progress is polled with deadlines
  NCCL_RETURN_IF_ERROR(nullptr, ncclCommInitRankConfig(&c->comm_, size, id, rank, &config));
  if (auto st = WaitReady(c->comm_, deadline, absl::StrCat("ncclCommInitRankConfig (rank ", rank, " of ", size, ")"));
      !st.ok()) {
    c->Abort();
    return st;
  }
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    if (aborted_) {
      // already released by ncclCommAbort
    } else {
      ncclCommFinalize(comm_);
      ncclCommDestroy(comm_);
    }
  }
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void NcclCommunicator::Abort() {
  if (comm_ != nullptr && !aborted_) {
    ncclCommAbort(comm_);
    aborted_ = true;
  }
}

absl::Status NcclCommunicator::AllreduceAsync(float* buf, size_t count, cudaEvent_t ready, cudaEvent_t done,
                                              uint16_t* bf16_scratch) {
  if (aborted_) return absl::AbortedError("NCCL communicator aborted");
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, ready, 0));
  if (bf16_scratch != nullptr) {
    using backend::cuda::DType;
    RETURN_IF_ERROR(backend::cuda::CastFromFloat(DType::kBF16, count, buf, bf16_scratch, stream_));
    NCCL_RETURN_IF_ERROR(comm_, ncclAllReduce(bf16_scratch, bf16_scratch, count, ncclBfloat16, ncclSum, comm_,
                                              stream_));
    RETURN_IF_ERROR(backend::cuda::CastToFloat(DType::kBF16, count, bf16_scratch, buf, /*accumulate=*/false, stream_));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(done, stream_));
    return absl::OkStatus();
  }
  NCCL_RETURN_IF_ERROR(comm_, ncclAllReduce(buf, buf, count, ncclFloat32, ncclSum, comm_, stream_));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(done, stream_));
  return absl::OkStatus();
}

absl::Status NcclCommunicator::BroadcastAsync(float* buf, size_t count, int root, cudaEvent_t ready, cudaEvent_t done) {
  if (aborted_) return absl::AbortedError("NCCL communicator aborted");
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, ready, 0));
  NCCL_RETURN_IF_ERROR(comm_, ncclBroadcast(buf, buf, count, ncclFloat32, root, comm_, stream_));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(done, stream_));
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Wait(cudaEvent_t done, absl::Time deadline, const char* what) {
  for (;;) {
    const cudaError_t q = backend::cuda::QueryEvent(done);
    if (q == cudaSuccess) return absl::OkStatus();
    if (q != cudaErrorNotReady) {
      Abort();
      return backend::cuda::CudaStatus(q, what, __FILE__, __LINE__);
    }
    ncclResult_t state = ncclSuccess;
    if (!aborted_) ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      absl::Status st = NcclStatus(state, comm_, what, __FILE__, __LINE__);
      Abort();
      return st;
    }
    if (absl::Now() > deadline) {
      Abort();
      return absl::DeadlineExceededError(absl::StrCat(what, ": NCCL collective did not complete before the deadline "
                                                      "(a peer is gone or stalled); communicator aborted"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace lmsgd::comm
