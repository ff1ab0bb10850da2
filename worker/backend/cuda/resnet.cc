#include "worker/backend/cuda/resnet_impl.h"

namespace lmsgd::backend::cuda {

using detail::AlgoChoice;
using detail::Block;
using detail::Unit;

absl::Status WaitForEvent(cudaEvent_t event, absl::Duration timeout, absl::string_view what) {
  const auto start = std::chrono::steady_clock::now();
  const auto limit = absl::ToChronoNanoseconds(timeout);
  for (int spin = 0;; ++spin) {
    cudaError_t err = ::lmsgd::backend::cuda::QueryEvent(event);
    if (err == cudaSuccess) return absl::OkStatus();
    if (err != cudaErrorNotReady) {
      const std::string call = absl::StrCat("waiting for ", what, " (cudaEventQuery)");
      return ::lmsgd::backend::cuda::CudaStatus(err, call.c_str(), __FILE__, __LINE__);
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    if (waited > limit) {
      return absl::DeadlineExceededError(
          absl::StrCat("waiting for ", what, ": the GPU did not finish within ", absl::FormatDuration(timeout)));
    }
    if (waited < std::chrono::milliseconds(1)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

GpuResNet::GpuResNet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuResNet::~GpuResNet() = default;

absl::StatusOr<std::unique_ptr<GpuResNet>> GpuResNet::Create(const model::ResNetSpec& spec, model::ParamStore* store,
                                                             const NetworkOptions& o, const GpuOptions& gpu) {
  if (o.batch < 1) return absl::InvalidArgumentError(absl::StrCat("batch ", o.batch, " must be >= 1"));
  if (o.training && (o.bn_group < 1 || o.batch % o.bn_group != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("bn_group ", o.bn_group, " must divide the batch ", o.batch));
  }
  auto impl = std::make_unique<Impl>();
  impl->spec = spec;
  impl->store = store;
  impl->opt = o;
  impl->gpu = gpu;
  if (!o.training) impl->opt.bn_group = o.batch;
  if (auto st = impl->Build(); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("building ", spec.name, " on cuda:", gpu.device, " (",
                                                PrecisionName(gpu.precision), ", batch ", o.batch, ", ", o.height, "x",
                                                o.width, "): ", st.message()));
  }
  return std::unique_ptr<GpuResNet>(new GpuResNet(std::move(impl)));
}

cudaStream_t GpuResNet::stream() const { return impl_->stream; }
const OpTimes& GpuResNet::times() const { return impl_->profiler.times(); }
void GpuResNet::ResetTimes() { impl_->profiler.Reset(); }
void GpuResNet::SetProfiling(bool on) { impl_->profiler.set_enabled(on); }
float* GpuResNet::device_params() { return impl_->d_params; }
float* GpuResNet::device_grads() { return impl_->d_grads; }
size_t GpuResNet::param_floats() const { return impl_->param_floats; }
const model::ParamStore& GpuResNet::layout() const { return *impl_->store; }
const GpuOptions& GpuResNet::gpu_options() const { return impl_->gpu; }

absl::Status GpuResNet::UploadState(const model::ParamStore& store) { return impl_->Upload(store); }
absl::Status GpuResNet::DownloadState(model::ParamStore* store) { return impl_->Download(store, false); }
absl::Status GpuResNet::DownloadGrads(model::ParamStore* store) { return impl_->Download(store, true); }
absl::Status GpuResNet::StageBatch(const float* images, const int32_t* labels) {
  if (labels == nullptr) return absl::InvalidArgumentError("StageBatch: labels are required for training batches");
  return impl_->Stage(images, labels);
}

absl::Status GpuResNet::StageBatchPixels(const uint8_t* pixels, const int32_t* labels,
                                         const PixelNormalization& norm) {
  if (labels == nullptr) return absl::InvalidArgumentError("StageBatchPixels: labels are required for training batches");
  k::PixelAffine a;
  for (int c = 0; c < 4; ++c) {
    a.mul[c] = norm.mul[c];
    a.add[c] = norm.add[c];
  }
  return impl_->StagePixels(pixels, labels, a);
}

absl::Status GpuResNet::ForwardTrainAsync(double normalizer, int group, int groups) {
  if (!impl_->opt.training) return absl::FailedPreconditionError("ForwardTrain on an inference network");
  if (groups < 1 || group < 0 || group >= groups) {
    return absl::InvalidArgumentError(absl::StrCat("virtual worker ", group, " of ", groups));
  }
  if (!(normalizer > 0)) return absl::InvalidArgumentError(absl::StrCat("loss normalizer ", normalizer, " must be > 0"));
  RETURN_IF_ERROR(Annotate(impl_->Forward(true, normalizer, group, groups), "ForwardTrain"));
  impl_->forward_done = true;
  return absl::OkStatus();
}

absl::Status GpuResNet::BackwardAsync(bool accumulate, const GradReadyFn& on_enqueued) {
  if (!impl_->forward_done) return absl::FailedPreconditionError("Backward without a ForwardTrain before it");
  impl_->forward_done = false;
  return Annotate(impl_->BackwardAll(accumulate, on_enqueued), "Backward");
}

absl::StatusOr<double> GpuResNet::ReadLoss() {
  RETURN_IF_ERROR(impl_->Sync("the forward pass's loss"));
  return *impl_->h_loss;
}

absl::Status GpuResNet::Synchronize() { return impl_->Sync("the GPU stream"); }

absl::StatusOr<double> GpuResNet::ForwardTrain(const float* images, const int32_t* labels, double normalizer,
                                               int group, int groups) {
  if (group == 0) RETURN_IF_ERROR(UploadState(*impl_->store));
  RETURN_IF_ERROR(StageBatch(images, labels));
  RETURN_IF_ERROR(ForwardTrainAsync(normalizer, group, groups));
  ASSIGN_OR_RETURN(double loss, ReadLoss());
  // Running statistics (and num_batches_tracked) back to the store, parameters unchanged.
  RETURN_IF_ERROR(impl_->DownloadBuffers(impl_->store));
  return loss;
}

absl::Status GpuResNet::Backward(const GradReadyFn& on_ready) {
  RETURN_IF_ERROR(BackwardAsync(false, nullptr));
  RETURN_IF_ERROR(DownloadGrads(impl_->store));
  if (on_ready) {
    for (size_t i = impl_->store->num_params(); i-- > 0;) on_ready(i);
  }
  return absl::OkStatus();
}

absl::Status GpuResNet::Predict(const float* images, float* logits) {
  if (impl_->opt.training) {
    return absl::FailedPreconditionError("Predict on a training network (create one with training=false)");
  }
  RETURN_IF_ERROR(UploadState(*impl_->store));
  return PredictOnDevice(images, logits);
}

absl::Status GpuResNet::PredictOnDevice(const float* images, float* logits) {
  if (impl_->opt.training) {
    return absl::FailedPreconditionError("Predict on a training network (create one with training=false)");
  }
  RETURN_IF_ERROR(impl_->Stage(images, nullptr));
  RETURN_IF_ERROR(Annotate(impl_->Forward(false, 1.0, 0, 1), "Predict"));
  const size_t n = static_cast<size_t>(impl_->opt.batch) * impl_->spec.num_classes;
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(logits, impl_->logits, n * sizeof(float), cudaMemcpyDeviceToHost, impl_->stream));
  return impl_->Sync("Predict's logits");
}

void GpuResNet::StoreToDeviceOrder(const float* in, float* out) const { impl_->Reorder(in, out, true); }
void GpuResNet::DeviceToStoreOrder(const float* in, float* out) const { impl_->Reorder(in, out, false); }

std::string GpuResNet::Describe() const {
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, impl_->gpu.device);
  const Impl& m = *impl_;
  return absl::StrFormat(
      "cuda:%d %s (sm_%d%d), cuDNN %d, %s, NHWC activations, conv algorithms by %s (%zu shapes, %d by heuristics "
      "after a failed search), workspace %.0f MiB, batch %d, bn_group %d",
      m.gpu.device, prop.name, prop.major, prop.minor, static_cast<int>(cudnnGetVersion()),
      PrecisionName(m.gpu.precision), m.gpu.search == ConvSearch::kFind ? "cudnnFind" : "heuristics",
      m.algo_cache.size(), m.search_fallbacks, m.workspace_bytes / 1048576.0, m.opt.batch, m.opt.bn_group);
}

}  // namespace lmsgd::backend::cuda
