#include "worker/backend/cuda/device_step.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/backend/cuda/cuda_check.h"
#include "worker/comm/nccl_communicator.h"

namespace lmsgd::backend::cuda {

absl::StatusOr<std::unique_ptr<DeviceStep>> DeviceStep::Create(GpuResNet* net, comm::NcclCommunicator* nccl,
                                                               const DeviceStepOptions& options) {
  std::unique_ptr<DeviceStep> t(new DeviceStep());
  t->net_ = net;
  t->nccl_ = nccl;
  t->options_ = options;
  const model::ParamStore& store = net->layout();
  t->buckets_ = model::MakeBuckets(store, options.bucket_bytes, options.first_bucket_bytes);
  t->bucket_of_param_.assign(store.num_params(), -1);
  for (size_t b = 0; b < t->buckets_.size(); ++b) {
    for (size_t p = t->buckets_[b].first_param; p < t->buckets_[b].end_param; ++p) {
      t->bucket_of_param_[p] = static_cast<int>(b);
    }
  }
  t->pending_.resize(t->buckets_.size());
  t->ready_.assign(t->buckets_.size(), nullptr);
  t->done_.assign(t->buckets_.size(), nullptr);
  for (size_t b = 0; b < t->buckets_.size(); ++b) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&t->ready_[b], cudaEventDisableTiming));
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&t->done_[b], cudaEventDisableTiming));
  }
  // Optimizer: velocity (zero) and the chunk table with each tensor's weight decay
  // (optim::DecaysKind, the CPU optimizer's rule).
  const size_t n = net->param_floats();
  CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&t->velocity_), n * sizeof(float)));
  if (nccl != nullptr && options.bf16_gradients) {
    CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&t->wire_), n * sizeof(uint16_t)));
  }
  // Setup copies go on the network's stream (non-blocking: the legacy default stream would not
  // order against it) and are waited for.
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(t->velocity_, 0, n * sizeof(float), net->stream()));
  std::vector<::lmsgd::backend::cuda::SgdChunk> chunks;
  for (size_t i = 0; i < store.num_params(); ++i) {
    const model::TensorSpec& ps = store.param_specs()[i];
    const float wd = optim::DecaysKind(ps.kind, options.sgd) ? static_cast<float>(options.sgd.weight_decay) : 0.0f;
    for (int64_t off = 0; off < ps.numel(); off += ::lmsgd::backend::cuda::kSgdChunk) {
      ::lmsgd::backend::cuda::SgdChunk c;
      c.offset = store.param_offset(i) + off;
      c.count = static_cast<int32_t>(std::min<int64_t>(::lmsgd::backend::cuda::kSgdChunk, ps.numel() - off));
      c.weight_decay = wd;
      chunks.push_back(c);
    }
  }
  t->num_chunks_ = static_cast<int>(chunks.size());
  CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&t->chunks_), chunks.size() * sizeof(chunks[0])));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(t->chunks_, chunks.data(), chunks.size() * sizeof(chunks[0]),
                                       cudaMemcpyHostToDevice, net->stream()));
  RETURN_IF_ERROR(net->Synchronize());
  return t;
}

DeviceStep::~DeviceStep() {
  if (net_) (void)net_->Synchronize();
  for (cudaEvent_t e : ready_) {
    if (e) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : done_) {
    if (e) cudaEventDestroy(e);
  }
  if (velocity_) cudaFree(velocity_);
  if (wire_) cudaFree(wire_);
  if (chunks_) cudaFree(chunks_);
}

absl::Status DeviceStep::Step(double normalizer, double lr, double correction) {
  if (!std::isfinite(lr) || !std::isfinite(correction)) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceStep::Step: lr=", lr, " correction=", correction,
                                                   " must be finite"));
  }
  RETURN_IF_ERROR(net_->ForwardTrainAsync(normalizer));
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].end_param - buckets_[b].first_param;
  started_ = 0;
  step_status_ = absl::OkStatus();
  cudaStream_t compute = net_->stream();
  auto on_enqueued = [&](size_t p) {
    if (!step_status_.ok() || nccl_ == nullptr) return;
    const int b = bucket_of_param_[p];
    if (--pending_[b] != 0) return;
    const model::Bucket& bk = buckets_[b];
    absl::Status st = ::lmsgd::backend::cuda::CudaStatus(cudaEventRecord(ready_[b], compute), "cudaEventRecord(bucket ready)",
                                                __FILE__, __LINE__);
    if (st.ok()) {
      st = nccl_->AllreduceAsync(net_->device_grads() + bk.offset, bk.count, ready_[b], done_[b],
                                 wire_ != nullptr ? wire_ + bk.offset : nullptr);
    }
    if (!st.ok()) {
      step_status_ = Annotate(st, absl::StrCat("allreduce of gradient bucket ", b));
      return;
    }
    ++started_;
  };
  RETURN_IF_ERROR(net_->BackwardAsync(/*accumulate=*/false, on_enqueued));
  RETURN_IF_ERROR(step_status_);
  if (nccl_ != nullptr) {
    if (started_ != buckets_.size()) {
      return absl::InternalError(
          absl::StrCat("only ", started_, " of ", buckets_.size(), " gradient buckets were started this step"));
    }
    for (cudaEvent_t e : done_) CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(compute, e, 0));
  }
  return ::lmsgd::backend::cuda::SgdUpdate(chunks_, num_chunks_, net_->device_params(), net_->device_grads(), velocity_,
                                  static_cast<float>(lr), static_cast<float>(options_.sgd.momentum),
                                  static_cast<float>(correction), options_.sgd.nesterov, compute);
}

absl::StatusOr<double> DeviceStep::Finish() {
  if (nccl_ != nullptr && !done_.empty()) {
    // The last bucket finishes last on the communicator's FIFO stream; Wait also polls NCCL's
    // asynchronous error state and aborts the communicator on failure or timeout.
    RETURN_IF_ERROR(nccl_->Wait(done_.back(), absl::Now() + net_->gpu_options().sync_timeout,
                                "gradient allreduce (last bucket)"));
  }
  return net_->ReadLoss();
}

absl::Status DeviceStep::DownloadVelocity(std::vector<float>* velocity) {
  RETURN_IF_ERROR(net_->Synchronize());
  velocity->resize(net_->param_floats());
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(velocity->data(), velocity_, velocity->size() * sizeof(float), cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

absl::Status DeviceStep::UploadVelocity(const std::vector<float>& velocity) {
  if (velocity.size() != net_->param_floats()) {
    return absl::InvalidArgumentError(
        absl::StrCat("velocity has ", velocity.size(), " floats, the model ", net_->param_floats()));
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(velocity_, velocity.data(), velocity.size() * sizeof(float),
                                       cudaMemcpyHostToDevice, net_->stream()));
  return net_->Synchronize();
}

}  // namespace lmsgd::backend::cuda
