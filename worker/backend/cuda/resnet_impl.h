// GpuResNet's internals, shared by the files that implement it (not part of its API):
//   resnet.cc        the public methods
//   resnet_build.cc  allocation, descriptors and the network's construction (Build)
//   conv_algos.cc    the convolution algorithm search and its cache
//   resnet_step.cc   forward and backward on the device
//   staging.cc       parameters, BN buffers and batches between the host and the device
//   profiler.h       per-op CUDA-event timing
#pragma once

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "worker/backend/cuda/cuda_check.h"
#include "worker/backend/cuda/cudnn_check.h"
#include "worker/backend/cuda/kernels.h"
#include "worker/backend/cuda/profiler.h"
#include "worker/backend/cuda/resnet.h"

namespace lmsgd::backend::cuda {

namespace k = ::lmsgd::backend::cuda;

namespace detail {

// One convolution + batch norm (+ ReLU) of the network, with its buffers and cuDNN state.
struct Unit {
  std::string name;
  model::ConvSpec conv;
  model::BnSpec bn;
  int n = 0, in_h = 0, in_w = 0, in_c = 0, out_h = 0, out_w = 0, out_c = 0;
  // Input channels on the device: in_c, or for the stem in_c rounded up to an aligned count
  // (3 -> 4, or 8 in bf16) with zero channels and zero weights, which cuDNN's fast NHWC kernels
  // need; then the conv reads padded weights `w_pad` and writes its weight gradient to `dw_pad`.
  int in_c_dev = 0;
  void* w_pad = nullptr;
  void* dw_pad = nullptr;
  size_t w_param = 0, gamma_param = 0, beta_param = 0;
  int64_t w_offset = 0, gamma_offset = 0, beta_offset = 0;
  float* running_mean = nullptr;
  float* running_var = nullptr;
  const void* in = nullptr;  // input activation (n, in_h, in_w, in_c)
  void* x = nullptr;         // conv output (n, out_h, out_w, out_c)
  void* y = nullptr;         // BN output after ReLU (and the residual add for a block's last unit)
  void* dy = nullptr;        // gradient of the loss w.r.t. y
  float* save_mean = nullptr;
  float* save_invstd = nullptr;
  cudnnTensorDescriptor_t in_desc = nullptr, out_desc = nullptr;
  cudnnFilterDescriptor_t w_desc = nullptr;
  cudnnConvolutionDescriptor_t fwd_desc = nullptr, bwd_data_desc = nullptr, bwd_filter_desc = nullptr;
  cudnnConvolutionFwdAlgo_t fwd_algo{};
  cudnnConvolutionBwdDataAlgo_t bwd_data_algo{};
  cudnnConvolutionBwdFilterAlgo_t bwd_filter_algo{};
  bool needs_input_grad = true;

  size_t rows() const { return static_cast<size_t>(n) * out_h * out_w; }
  size_t out_numel() const { return rows() * out_c; }
  size_t in_numel() const { return static_cast<size_t>(n) * in_h * in_w * in_c_dev; }
  size_t w_rows() const { return static_cast<size_t>(conv.out_channels) * conv.kernel * conv.kernel; }
  size_t w_numel() const { return static_cast<size_t>(conv.out_channels) * conv.in_channels * conv.kernel * conv.kernel; }
};

struct Block {
  std::vector<Unit> units;
  std::optional<Unit> ds;
  const void* in = nullptr;
  void* din = nullptr;
};

struct AlgoChoice {
  int algo = 0;
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
  size_t memory = 0;
  float time_ms = -1;
};

}  // namespace detail

struct GpuResNet::Impl {
  using Unit = detail::Unit;
  using Block = detail::Block;
  using AlgoChoice = detail::AlgoChoice;

  model::ResNetSpec spec;
  model::ParamStore* store = nullptr;
  NetworkOptions opt;
  GpuOptions gpu;
  DType dtype = DType::kF32;
  size_t dsize = 4;

  cudaStream_t stream = nullptr;
  cudnnHandle_t cudnn = nullptr;
  cudaEvent_t staged = nullptr, done = nullptr;
  std::vector<void*> allocations;
  std::vector<void*> host_allocations;

  size_t param_floats = 0, buffer_floats = 0;
  float* d_params = nullptr;
  float* d_grads = nullptr;
  float* d_buffers = nullptr;
  void* d_params_lp = nullptr;  // bf16 copy of the parameters (kBf16)
  void* d_wgrad_lp = nullptr;   // bf16 weight-gradient scratch, the largest conv weight (kBf16)
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  double* bn_scratch = nullptr;
  void* scratch_a = nullptr;  // conv-output gradient (BN backward -> conv backward)
  void* scratch_b = nullptr;  // dz of a block whose shortcut is a projection
  size_t scratch_numel = 0;

  float* d_images = nullptr;  // staged NCHW fp32
  void* d_input = nullptr;    // NHWC in dtype, input_c channels
  int input_c = 0;
  int32_t* d_labels = nullptr;
  float* h_images = nullptr;  // pinned
  int32_t* h_labels = nullptr;
  double* h_loss = nullptr;
  double* d_loss = nullptr;
  double* d_row_loss = nullptr;

  Unit stem;
  bool has_pool = false;
  PoolShape pool;
  void* pool_y = nullptr;
  void* pool_dy = nullptr;
  uint8_t* pool_argmax = nullptr;
  std::vector<Block> blocks;
  int feat_c = 0, feat_hw = 0;
  const void* features = nullptr;
  void* d_features = nullptr;
  float* pooled = nullptr;
  float* d_pooled = nullptr;
  float* logits = nullptr;
  float* dlogits = nullptr;
  size_t fc_w_param = 0, fc_b_param = 0;
  int64_t fc_w_offset = 0, fc_b_offset = 0;

  // Per-op GPU times (SetProfiling): profiler.h.
  OpProfiler profiler;
  struct Timer : OpProfiler::Scope {
    Timer(Impl* m, double OpTimes::*field) : OpProfiler::Scope(&m->profiler, m->stream, field) {}
  };

  std::map<std::string, AlgoChoice> algo_cache;
  int search_fallbacks = 0;  // shapes where cudnnFind failed and heuristics chose
  int64_t batches_tracked = 0;  // training forwards (group 0) since the last upload/download
  bool forward_done = false;
  bool staged_once = false;

  ~Impl();
  absl::Status Build();
  absl::StatusOr<void*> Alloc(size_t bytes, absl::string_view what);
  absl::Status MakeUnit(const model::ConvSpec& conv, const model::BnSpec& bn, const void* in, int in_h, int in_w,
                        Unit* u, int in_c_dev = 0);
  absl::Status MakeDescriptors(Unit* u);
  absl::Status ChooseAlgorithms(Unit* u, void* find_ws, size_t find_ws_bytes);
  const void* Weights(const Unit& u) const;
  absl::Status ForwardUnit(Unit* u, const void* residual, bool training, int group, int groups);
  absl::Status BackwardUnit(Unit* u, const void* grad, const void* relu_y, void* din, float beta_data, bool accumulate,
                            const GradReadyFn& on_ready);
  absl::Status Forward(bool training, double normalizer, int group, int groups);
  absl::Status BackwardAll(bool accumulate, const GradReadyFn& on_ready);
  absl::Status Upload(const model::ParamStore& s);
  absl::Status Download(model::ParamStore* s, bool grads);
  absl::Status DownloadBuffers(model::ParamStore* s);
  void Reorder(const float* in, float* out, bool to_device) const;
  absl::Status Stage(const float* images, const int32_t* labels);
  absl::Status StagePixels(const uint8_t* pixels, const int32_t* labels, const k::PixelAffine& affine);
  absl::Status CheckLabels(const int32_t* labels) const;
  absl::Status Sync(absl::string_view what);
  std::vector<const Unit*> AllUnits() const;
};

}  // namespace lmsgd::backend::cuda
