// ResNet training and inference on one GPU: cuDNN 9 convolutions, our own kernels
// (kernels.h) for batch norm (+ReLU, +residual add), pooling, the FC layer's GEMMs, softmax
// cross-entropy and casts (no cuBLAS: see kernels.h, Sgemm). The GPU core: no gRPC, UCX or oneDNN here.
//
// Layout and precision: activations NHWC, in fp32 (Precision kFp32: FMA-only convolutions;
// kTf32: tensor cores with TF32) or bf16 (kBf16: bf16 activations and a bf16 copy of the
// weights made once per step, fp32 accumulation inside cuDNN; BN statistics, the FC layer,
// the loss, master weights, gradients and the optimizer stay fp32).
//
// Parameters live on the device as ONE flat fp32 array with the ParamStore's offsets
// ("device order"): identical to the store except that conv weights are KRSC (O, kh, kw, I,
// the NHWC filter layout cuDNN wants) instead of OIHW. Gradients use the same layout, so
// the allreduce and the optimizer work on flat slices; Upload/Download transpose.
//
// Convolution algorithms are chosen once per shape (cudnnFind*Ex on the real buffers, or
// cuDNN's heuristics) within a workspace limit and cached; one workspace serves every layer.
// BN statistics are per group of `bn_group` samples and running statistics follow the oneDNN
// backend's rule (network.h).
//
// Two ways to drive it:
//  * backend::Network (host memory in and out, like the CPU backend): each call uploads the
//    ParamStore's parameters, runs, and copies results back. For agreement tests and the
//    host-side Trainer.
//  * the device API (StageBatch / ForwardTrainAsync / BackwardAsync on stream()): nothing
//    leaves the GPU; DeviceStep builds the step on it (NCCL buckets, fused SGD).
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "worker/backend/network.h"
#include "worker/backend/precision.h"
#include "worker/model/param_store.h"
#include "worker/model/resnet.h"

namespace lmsgd::backend::cuda {


enum class ConvSearch { kFind, kHeuristic };

struct GpuOptions {
  int device = 0;
  Precision precision = Precision::kFp32;
  ConvSearch search = ConvSearch::kFind;
  size_t workspace_limit_bytes = size_t{1} << 30;
  absl::Duration sync_timeout = absl::Seconds(120);  // deadline of every host wait on the GPU
};

// Blocks the host until `event` has completed, polling with a deadline; DEADLINE_EXCEEDED
// names `what`.
absl::Status WaitForEvent(cudaEvent_t event, absl::Duration timeout, absl::string_view what);

class GpuResNet : public Network {
 public:
  // `store` provides the parameter layout (and, for the Network interface, the values).
  static absl::StatusOr<std::unique_ptr<GpuResNet>> Create(const model::ResNetSpec& spec, model::ParamStore* store,
                                                           const NetworkOptions& options, const GpuOptions& gpu);
  ~GpuResNet() override;

  // --- backend::Network (host memory) ---
  absl::StatusOr<double> ForwardTrain(const float* images, const int32_t* labels, double normalizer, int group = 0,
                                      int groups = 1) override;
  absl::Status Backward(const GradReadyFn& on_ready) override;
  absl::Status Predict(const float* images, float* logits) override;
  // Per-op GPU seconds, collected while profiling is on (SetProfiling): CUDA events around each
  // op, read when the host next waits for the stream. Off by default: then no events at all.
  const OpTimes& times() const override;
  void ResetTimes() override;
  void SetProfiling(bool on);
  std::string Describe() const override;

  // --- device API ---
  // Parameters and BN buffers: store -> device (conv weights OIHW -> KRSC) and back. Synchronous.
  absl::Status UploadState(const model::ParamStore& store);
  absl::Status DownloadState(model::ParamStore* store);
  absl::Status DownloadGrads(model::ParamStore* store);
  // Flat parameter-shaped arrays (params, grads, velocities) between the store's order and
  // the device order (conv weights OIHW <-> KRSC); in and out have param_floats() floats.
  void StoreToDeviceOrder(const float* in, float* out) const;
  void DeviceToStoreOrder(const float* in, float* out) const;
  // Inference on the parameters already on the device (UploadState), without uploading them
  // again: Predict = UploadState + PredictOnDevice. Logits (batch, classes) to host memory.
  absl::Status PredictOnDevice(const float* images, float* logits);
  // Copies a batch (images NCHW fp32, labels) through pinned memory to the device
  // asynchronously; labels are checked first (INVALID_ARGUMENT names the sample).
  absl::Status StageBatch(const float* images, const int32_t* labels);
  // The same for 8-bit pixels (n, h, w, c) as the loader writes them: a quarter of the bytes
  // cross the bus, and the device applies value * mul[c] + add[c] (the normalization) while
  // laying the input out. Uses the float staging buffers, which are 4x larger than needed.
  struct PixelNormalization {
    float mul[4] = {1, 1, 1, 1};
    float add[4] = {0, 0, 0, 0};
  };
  absl::Status StageBatchPixels(const uint8_t* pixels, const int32_t* labels, const PixelNormalization& norm);
  // Enqueues a training forward on the staged batch; the loss stays on the device (ReadLoss).
  absl::Status ForwardTrainAsync(double normalizer, int group = 0, int groups = 1);
  // Enqueues backward. Gradients are written (or added, with `accumulate`) to
  // device_grads(); `on_enqueued(i)` is called once parameter i's last gradient op is on
  // stream() (record an event there to start its allreduce). Reverse layer order.
  absl::Status BackwardAsync(bool accumulate, const GradReadyFn& on_enqueued);
  // Waits for the stream and returns the last forward's loss.
  absl::StatusOr<double> ReadLoss();
  absl::Status Synchronize();

  cudaStream_t stream() const;
  float* device_params();
  float* device_grads();
  size_t param_floats() const;
  const model::ParamStore& layout() const;
  const GpuOptions& gpu_options() const;

  struct Impl;

 private:
  explicit GpuResNet(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmsgd::backend::cuda
