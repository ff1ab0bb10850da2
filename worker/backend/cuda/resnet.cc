#include "worker/backend/cuda/resnet.h"

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

namespace lmsgd::backend::cuda {

namespace k = ::lmsgd::backend::cuda;

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

namespace {

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

}  // namespace

struct GpuResNet::Impl {
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

  // Per-op GPU times (SetProfiling): CUDA events around each op on the stream, turned into
  // seconds (OpTimes) once the stream has been waited for; off by default (no events at all).
  bool profile = false;
  struct Timing {
    double OpTimes::*field;
    cudaEvent_t start, end;
  };
  std::vector<Timing> timings;
  std::vector<cudaEvent_t> event_pool, all_events;
  OpTimes times;
  cudaEvent_t TimingEvent() {
    if (!event_pool.empty()) {
      cudaEvent_t e = event_pool.back();
      event_pool.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    if (!::lmsgd::backend::cuda::BestEffort(cudaEventCreate(&e))) return nullptr;
    all_events.push_back(e);
    return e;
  }
  class Timer {
   public:
    Timer(Impl* m, double OpTimes::*field) : m_(m), field_(field) {
      if (!m_->profile || (start_ = m_->TimingEvent()) == nullptr) return;
      if (!::lmsgd::backend::cuda::BestEffort(cudaEventRecord(start_, m_->stream))) {  // no timing, no error left
        m_->event_pool.push_back(start_);
        start_ = nullptr;
      }
    }
    ~Timer() {
      if (start_ == nullptr) return;
      cudaEvent_t end = m_->TimingEvent();
      if (end == nullptr || !::lmsgd::backend::cuda::BestEffort(cudaEventRecord(end, m_->stream))) {
        m_->event_pool.push_back(start_);
        if (end != nullptr) m_->event_pool.push_back(end);
        return;
      }
      m_->timings.push_back({field_, start_, end});
    }

   private:
    Impl* m_;
    double OpTimes::*field_;
    cudaEvent_t start_ = nullptr;
  };
  void CollectTimes() {
    for (const Timing& t : timings) {
      float ms = 0;
      if (::lmsgd::backend::cuda::BestEffort(cudaEventElapsedTime(&ms, t.start, t.end))) times.*(t.field) += ms / 1000.0;
      event_pool.push_back(t.start);
      event_pool.push_back(t.end);
    }
    timings.clear();
  }

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
  absl::Status Sync(absl::string_view what);
  std::vector<const Unit*> AllUnits() const;
};

GpuResNet::Impl::~Impl() {
  // Bounded: a wedged device must not hang the process at exit.
  if (stream && done && cudaEventRecord(done, stream) == cudaSuccess) {
    (void)WaitForEvent(done, gpu.sync_timeout, "the GPU stream before freeing the network");
  }
  auto destroy = [](Unit& u) {
    if (u.in_desc) cudnnDestroyTensorDescriptor(u.in_desc);
    if (u.out_desc) cudnnDestroyTensorDescriptor(u.out_desc);
    if (u.w_desc) cudnnDestroyFilterDescriptor(u.w_desc);
    if (u.fwd_desc) cudnnDestroyConvolutionDescriptor(u.fwd_desc);
    if (u.bwd_data_desc) cudnnDestroyConvolutionDescriptor(u.bwd_data_desc);
    if (u.bwd_filter_desc) cudnnDestroyConvolutionDescriptor(u.bwd_filter_desc);
  };
  destroy(stem);
  for (Block& b : blocks) {
    for (Unit& u : b.units) destroy(u);
    if (b.ds) destroy(*b.ds);
  }
  for (void* p : allocations) cudaFree(p);
  for (void* p : host_allocations) cudaFreeHost(p);
  for (cudaEvent_t e : all_events) cudaEventDestroy(e);
  if (staged) cudaEventDestroy(staged);
  if (done) cudaEventDestroy(done);
  if (cudnn) cudnnDestroy(cudnn);
  if (stream) cudaStreamDestroy(stream);
}

absl::StatusOr<void*> GpuResNet::Impl::Alloc(size_t bytes, absl::string_view what) {
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cudaMalloc of %.1f MiB for %s on cuda:%d: %s (%.1f of %.1f GiB free)", bytes / 1048576.0,
        std::string(what), gpu.device, cudaGetErrorString(err), free_b / 1073741824.0, total_b / 1073741824.0));
  }
  allocations.push_back(p);
  return p;
}

std::vector<const Unit*> GpuResNet::Impl::AllUnits() const {
  std::vector<const Unit*> all = {&stem};
  for (const Block& b : blocks) {
    if (b.ds) all.push_back(&*b.ds);
    for (const Unit& u : b.units) all.push_back(&u);
  }
  return all;
}

absl::Status GpuResNet::Impl::MakeUnit(const model::ConvSpec& conv, const model::BnSpec& bn, const void* in, int in_h,
                                       int in_w, Unit* u, int in_c_dev) {
  u->name = conv.name;
  u->conv = conv;
  u->bn = bn;
  u->n = opt.batch;
  u->in_h = in_h;
  u->in_w = in_w;
  u->in_c = conv.in_channels;
  u->in_c_dev = in_c_dev > 0 ? in_c_dev : conv.in_channels;
  u->out_h = (in_h + 2 * conv.padding - conv.kernel) / conv.stride + 1;
  u->out_w = (in_w + 2 * conv.padding - conv.kernel) / conv.stride + 1;
  u->out_c = conv.out_channels;
  u->in = in;
  ASSIGN_OR_RETURN(u->w_param, store->ParamIndex(conv.name + ".weight"));
  ASSIGN_OR_RETURN(u->gamma_param, store->ParamIndex(bn.name + ".weight"));
  ASSIGN_OR_RETURN(u->beta_param, store->ParamIndex(bn.name + ".bias"));
  u->w_offset = store->param_offset(u->w_param);
  u->gamma_offset = store->param_offset(u->gamma_param);
  u->beta_offset = store->param_offset(u->beta_param);
  ASSIGN_OR_RETURN(size_t rm, store->BufferIndex(bn.name + ".running_mean"));
  ASSIGN_OR_RETURN(size_t rv, store->BufferIndex(bn.name + ".running_var"));
  u->running_mean = d_buffers + store->buffer_offset(rm);
  u->running_var = d_buffers + store->buffer_offset(rv);
  const size_t bytes = u->out_numel() * dsize;
  ASSIGN_OR_RETURN(u->x, Alloc(bytes, conv.name + " output"));
  ASSIGN_OR_RETURN(u->y, Alloc(bytes, bn.name + " output"));
  if (opt.training) {
    ASSIGN_OR_RETURN(u->dy, Alloc(bytes, bn.name + " output gradient"));
    const int groups = opt.batch / opt.bn_group;
    ASSIGN_OR_RETURN(void* sm, Alloc(sizeof(float) * groups * u->out_c, bn.name + " saved statistics"));
    ASSIGN_OR_RETURN(void* si, Alloc(sizeof(float) * groups * u->out_c, bn.name + " saved statistics"));
    u->save_mean = static_cast<float*>(sm);
    u->save_invstd = static_cast<float*>(si);
  }
  scratch_numel = std::max(scratch_numel, std::max(u->out_numel(), u->in_numel()));
  if (u->in_c_dev != u->in_c) {
    const size_t bytes = u->w_rows() * u->in_c_dev * dsize;
    ASSIGN_OR_RETURN(u->w_pad, Alloc(bytes, conv.name + " padded weights"));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(u->w_pad, 0, bytes, stream));
    if (opt.training) {
      ASSIGN_OR_RETURN(u->dw_pad, Alloc(bytes, conv.name + " padded weight gradient"));
    }
  }
  return MakeDescriptors(u);
}

absl::Status GpuResNet::Impl::MakeDescriptors(Unit* u) {
  const cudnnDataType_t dt = dtype == DType::kF32 ? CUDNN_DATA_FLOAT : CUDNN_DATA_BFLOAT16;
  CUDNN_RETURN_IF_ERROR(cudnnCreateTensorDescriptor(&u->in_desc));
  CUDNN_RETURN_IF_ERROR(cudnnCreateTensorDescriptor(&u->out_desc));
  CUDNN_RETURN_IF_ERROR(cudnnCreateFilterDescriptor(&u->w_desc));
  CUDNN_RETURN_IF_ERROR(
      cudnnSetTensor4dDescriptor(u->in_desc, CUDNN_TENSOR_NHWC, dt, u->n, u->in_c_dev, u->in_h, u->in_w));
  CUDNN_RETURN_IF_ERROR(
      cudnnSetTensor4dDescriptor(u->out_desc, CUDNN_TENSOR_NHWC, dt, u->n, u->out_c, u->out_h, u->out_w));
  CUDNN_RETURN_IF_ERROR(cudnnSetFilter4dDescriptor(u->w_desc, dt, CUDNN_TENSOR_NHWC, u->conv.out_channels,
                                                   u->in_c_dev, u->conv.kernel, u->conv.kernel));
  const cudnnMathType_t math = gpu.precision == Precision::kFp32   ? CUDNN_FMA_MATH
                               : gpu.precision == Precision::kTf32 ? CUDNN_DEFAULT_MATH
                                                                   : CUDNN_TENSOR_OP_MATH;
  for (cudnnConvolutionDescriptor_t* d : {&u->fwd_desc, &u->bwd_data_desc, &u->bwd_filter_desc}) {
    CUDNN_RETURN_IF_ERROR(cudnnCreateConvolutionDescriptor(d));
    CUDNN_RETURN_IF_ERROR(cudnnSetConvolution2dDescriptor(*d, u->conv.padding, u->conv.padding, u->conv.stride,
                                                          u->conv.stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                          CUDNN_DATA_FLOAT));
    CUDNN_RETURN_IF_ERROR(cudnnSetConvolutionMathType(*d, math));
  }
  return absl::OkStatus();
}

const void* GpuResNet::Impl::Weights(const Unit& u) const {
  if (u.w_pad) return u.w_pad;
  if (dtype == DType::kF32) return d_params + u.w_offset;
  return static_cast<const char*>(d_params_lp) + u.w_offset * dsize;
}

namespace {

// Picks the first (fastest, or heuristically best) result that succeeded and fits the
// workspace.
template <typename Perf>
absl::StatusOr<AlgoChoice> Pick(const Perf* perf, int n, size_t limit, absl::string_view what) {
  std::string seen;
  for (int i = 0; i < n; ++i) {
    const Perf& p = perf[i];
    absl::StrAppend(&seen, " [algo ", static_cast<int>(p.algo), " ", cudnnGetErrorString(p.status), " ",
                    p.memory >> 20, " MiB math ", static_cast<int>(p.mathType), "]");
    if (p.status != CUDNN_STATUS_SUCCESS || p.memory > limit) continue;
    return AlgoChoice{static_cast<int>(p.algo), p.mathType, p.memory, p.time};
  }
  return absl::NotFoundError(absl::StrCat("no cuDNN algorithm for ", what, " within ", limit >> 20,
                                          " MiB of workspace; candidates:", seen));
}

}  // namespace

namespace {

// One direction's algorithm: cudnnFind (run on the real buffers) or cuDNN's heuristics, and the
// heuristics as the fallback when the search fails or finds nothing within the workspace.
// `find(perf, &n)` and `heuristic(perf, &n)` fill up to N results.
template <typename Perf, int N, typename FindFn, typename HeuristicFn>
absl::StatusOr<AlgoChoice> SearchAlgorithm(bool use_find, size_t limit, const std::string& what, FindFn find,
                                           HeuristicFn heuristic, int* fallbacks) {
  Perf perf[N];
  int n = 0;
  absl::StatusOr<AlgoChoice> got = absl::UnknownError("no search");
  if (use_find) {
    const absl::Status st = find(perf, &n);
    got = st.ok() ? Pick(perf, n, limit, what) : absl::StatusOr<AlgoChoice>(st);
    if (got.ok()) return got;
  }
  const absl::Status find_error = use_find ? got.status() : absl::OkStatus();
  n = 0;
  RETURN_IF_ERROR(heuristic(perf, &n));
  got = Pick(perf, n, limit, what);
  if (!find_error.ok()) {
    if (got.ok()) {
      ++*fallbacks;
    } else {
      got = Annotate(got.status(), absl::StrCat("cudnnFind failed too (", find_error.message(), ")"));
    }
  }
  return got;
}

}  // namespace

absl::Status GpuResNet::Impl::ChooseAlgorithms(Unit* u, void* ws, size_t ws_bytes) {
  const bool find = gpu.search == ConvSearch::kFind;
  // fp32 keeps CUDNN_FMA_MATH on its descriptors (no tensor cores, no TF32 whatever the
  // search reports); tf32/bf16 take the math type of the chosen result.
  const bool keep_math = gpu.precision == Precision::kFp32;
  const size_t limit = gpu.workspace_limit_bytes;
  const std::string shape = absl::StrCat(u->n, "x", u->in_c_dev, "x", u->in_h, "x", u->in_w, " k", u->out_c, " r",
                                         u->conv.kernel, " s", u->conv.stride, " p", u->conv.padding);
  const void* w = Weights(*u);
  // The cached choice for (direction, shape), or a new search; its math type goes on `desc`.
  auto choose = [&](const std::string& direction, cudnnConvolutionDescriptor_t desc,
                    const std::function<absl::StatusOr<AlgoChoice>(const std::string&)>& search) -> absl::StatusOr<int> {
    const std::string key = direction + " " + shape;
    auto it = algo_cache.find(key);
    AlgoChoice c;
    if (it != algo_cache.end()) {
      c = it->second;
    } else {
      ASSIGN_OR_RETURN(c, search(absl::StrCat(u->name, " ", direction, " (", shape, ")")));
      algo_cache[key] = c;
    }
    workspace_bytes = std::max(workspace_bytes, c.memory);
    if (!keep_math) CUDNN_RETURN_IF_ERROR(cudnnSetConvolutionMathType(desc, c.math));
    return c.algo;
  };
#define LMSGD_CUDNN_CALL(expr) ::lmsgd::backend::cuda::CudnnStatus((expr), #expr, __FILE__, __LINE__)
  ASSIGN_OR_RETURN(int fwd, choose("forward", u->fwd_desc, [&](const std::string& what) {
    return SearchAlgorithm<cudnnConvolutionFwdAlgoPerf_t, CUDNN_CONVOLUTION_FWD_ALGO_COUNT>(
        find, limit, what,
        [&](cudnnConvolutionFwdAlgoPerf_t* perf, int* n) {
          return LMSGD_CUDNN_CALL(cudnnFindConvolutionForwardAlgorithmEx(
              cudnn, u->in_desc, u->in, u->w_desc, w, u->fwd_desc, u->out_desc, u->x, CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
              n, perf, ws, ws_bytes));
        },
        [&](cudnnConvolutionFwdAlgoPerf_t* perf, int* n) {
          return LMSGD_CUDNN_CALL(cudnnGetConvolutionForwardAlgorithm_v7(
              cudnn, u->in_desc, u->w_desc, u->fwd_desc, u->out_desc, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, n, perf));
        },
        &search_fallbacks);
  }));
  u->fwd_algo = static_cast<cudnnConvolutionFwdAlgo_t>(fwd);
  if (!opt.training) return absl::OkStatus();
  void* dw = u->dw_pad ? u->dw_pad : dtype == DType::kF32 ? static_cast<void*>(d_grads + u->w_offset) : d_wgrad_lp;
  ASSIGN_OR_RETURN(int bwd_filter, choose("backward filter", u->bwd_filter_desc, [&](const std::string& what) {
    return SearchAlgorithm<cudnnConvolutionBwdFilterAlgoPerf_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT>(
        find, limit, what,
        [&](cudnnConvolutionBwdFilterAlgoPerf_t* perf, int* n) {
          return LMSGD_CUDNN_CALL(cudnnFindConvolutionBackwardFilterAlgorithmEx(
              cudnn, u->in_desc, u->in, u->out_desc, scratch_a, u->bwd_filter_desc, u->w_desc, dw,
              CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, n, perf, ws, ws_bytes));
        },
        [&](cudnnConvolutionBwdFilterAlgoPerf_t* perf, int* n) {
          return LMSGD_CUDNN_CALL(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
              cudnn, u->in_desc, u->out_desc, u->bwd_filter_desc, u->w_desc, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
              n, perf));
        },
        &search_fallbacks);
  }));
  u->bwd_filter_algo = static_cast<cudnnConvolutionBwdFilterAlgo_t>(bwd_filter);
  if (!u->needs_input_grad) return absl::OkStatus();
  ASSIGN_OR_RETURN(int bwd_data, choose("backward data", u->bwd_data_desc, [&](const std::string& what) {
    return SearchAlgorithm<cudnnConvolutionBwdDataAlgoPerf_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT>(
        find, limit, what,
        [&](cudnnConvolutionBwdDataAlgoPerf_t* perf, int* n) {
          return LMSGD_CUDNN_CALL(cudnnFindConvolutionBackwardDataAlgorithmEx(
              cudnn, u->w_desc, w, u->out_desc, scratch_a, u->bwd_data_desc, u->in_desc, scratch_b,
              CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, n, perf, ws, ws_bytes));
        },
        [&](cudnnConvolutionBwdDataAlgoPerf_t* perf, int* n) {
          return LMSGD_CUDNN_CALL(cudnnGetConvolutionBackwardDataAlgorithm_v7(
              cudnn, u->w_desc, u->out_desc, u->bwd_data_desc, u->in_desc, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, n,
              perf));
        },
        &search_fallbacks);
  }));
#undef LMSGD_CUDNN_CALL
  u->bwd_data_algo = static_cast<cudnnConvolutionBwdDataAlgo_t>(bwd_data);
  return absl::OkStatus();
}

absl::Status GpuResNet::Impl::Build() {
  dtype = gpu.precision == Precision::kBf16 ? DType::kBF16 : DType::kF32;
  dsize = k::DTypeSize(dtype);
  CUDA_RETURN_IF_ERROR(cudaSetDevice(gpu.device));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&staged, cudaEventDisableTiming));
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CUDNN_RETURN_IF_ERROR(cudnnCreate(&cudnn));
  CUDNN_RETURN_IF_ERROR(cudnnSetStream(cudnn, stream));

  param_floats = store->params().size();
  buffer_floats = store->buffers().size();
  ASSIGN_OR_RETURN(void* p, Alloc(param_floats * sizeof(float), "parameters"));
  d_params = static_cast<float*>(p);
  ASSIGN_OR_RETURN(p, Alloc(param_floats * sizeof(float), "gradients"));
  d_grads = static_cast<float*>(p);
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_grads, 0, param_floats * sizeof(float), stream));
  ASSIGN_OR_RETURN(p, Alloc(std::max<size_t>(buffer_floats, 1) * sizeof(float), "BN running statistics"));
  d_buffers = static_cast<float*>(p);
  if (dtype == DType::kBF16) {
    ASSIGN_OR_RETURN(d_params_lp, Alloc(param_floats * dsize, "bf16 parameter copy"));
    size_t max_w = 0;
    for (size_t i = 0; i < store->num_params(); ++i) {
      max_w = std::max<size_t>(max_w, store->param_specs()[i].numel());
    }
    ASSIGN_OR_RETURN(d_wgrad_lp, Alloc(max_w * dsize, "bf16 weight-gradient scratch"));
  }

  const int N = opt.batch, C = spec.in_channels, H = opt.height, W = opt.width;
  ASSIGN_OR_RETURN(p, Alloc(sizeof(float) * N * C * H * W, "staged images"));
  d_images = static_cast<float*>(p);
  // The stem reads its input with channels padded to an aligned count (see Unit::in_c_dev).
  const int align = dtype == DType::kBF16 ? 8 : 4;
  input_c = (C + align - 1) / align * align;
  ASSIGN_OR_RETURN(d_input, Alloc(dsize * N * input_c * H * W, "input batch (NHWC)"));
  ASSIGN_OR_RETURN(p, Alloc(sizeof(int32_t) * N, "labels"));
  d_labels = static_cast<int32_t*>(p);
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_labels, 0, sizeof(int32_t) * N, stream));
  void* hp = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&hp, sizeof(float) * N * C * H * W));
  host_allocations.push_back(hp);
  h_images = static_cast<float*>(hp);
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&hp, sizeof(int32_t) * N));
  host_allocations.push_back(hp);
  h_labels = static_cast<int32_t*>(hp);
  CUDA_RETURN_IF_ERROR(cudaMallocHost(&hp, sizeof(double)));
  host_allocations.push_back(hp);
  h_loss = static_cast<double*>(hp);
  *h_loss = 0;
  scratch_numel = static_cast<size_t>(N) * input_c * H * W;

  // Layers, in forward order.
  RETURN_IF_ERROR(MakeUnit(spec.stem_conv, spec.stem_bn, d_input, H, W, &stem, input_c));
  stem.needs_input_grad = false;
  const void* cur = stem.y;
  void* cur_d = stem.dy;
  int h = stem.out_h, w = stem.out_w, c = stem.out_c;
  if (spec.stem_maxpool) {
    has_pool = true;
    pool = PoolShape{N, h, w, c, 3, 2, 1};
    const size_t numel = static_cast<size_t>(N) * pool.out_h() * pool.out_w() * c;
    ASSIGN_OR_RETURN(pool_y, Alloc(numel * dsize, "maxpool output"));
    ASSIGN_OR_RETURN(p, Alloc(numel, "maxpool argmax"));
    pool_argmax = static_cast<uint8_t*>(p);
    if (opt.training) {
      ASSIGN_OR_RETURN(pool_dy, Alloc(numel * dsize, "maxpool output gradient"));
    }
    cur = pool_y;
    cur_d = pool_dy;
    h = pool.out_h();
    w = pool.out_w();
  }
  blocks.resize(spec.blocks.size());
  for (size_t bi = 0; bi < spec.blocks.size(); ++bi) {
    const model::BlockSpec& bs = spec.blocks[bi];
    Block& b = blocks[bi];
    b.in = cur;
    b.din = cur_d;
    if (bs.downsample_conv) {
      b.ds.emplace();
      RETURN_IF_ERROR(MakeUnit(*bs.downsample_conv, *bs.downsample_bn, cur, h, w, &*b.ds));
    }
    b.units.resize(bs.convs.size());
    const void* in = cur;
    int ih = h, iw = w;
    for (size_t i = 0; i < bs.convs.size(); ++i) {
      RETURN_IF_ERROR(MakeUnit(bs.convs[i], bs.bns[i], in, ih, iw, &b.units[i]));
      in = b.units[i].y;
      ih = b.units[i].out_h;
      iw = b.units[i].out_w;
    }
    cur = b.units.back().y;
    cur_d = b.units.back().dy;
    h = b.units.back().out_h;
    w = b.units.back().out_w;
    c = b.units.back().out_c;
  }
  feat_c = c;
  feat_hw = h * w;
  features = cur;
  d_features = cur_d;
  if (feat_c != spec.fc_in) {
    return absl::InternalError(absl::StrCat("feature width ", feat_c, " != fc input ", spec.fc_in));
  }
  const int K = spec.num_classes;
  ASSIGN_OR_RETURN(p, Alloc(sizeof(float) * N * feat_c, "pooled features"));
  pooled = static_cast<float*>(p);
  ASSIGN_OR_RETURN(p, Alloc(sizeof(float) * N * feat_c, "pooled feature gradient"));
  d_pooled = static_cast<float*>(p);
  ASSIGN_OR_RETURN(p, Alloc(sizeof(float) * N * K, "logits"));
  logits = static_cast<float*>(p);
  ASSIGN_OR_RETURN(p, Alloc(sizeof(float) * N * K, "logit gradients"));
  dlogits = static_cast<float*>(p);
  ASSIGN_OR_RETURN(p, Alloc(sizeof(double) * N, "per-sample losses"));
  d_row_loss = static_cast<double*>(p);
  ASSIGN_OR_RETURN(p, Alloc(sizeof(double), "loss"));
  d_loss = static_cast<double*>(p);
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_loss, 0, sizeof(double), stream));
  ASSIGN_OR_RETURN(fc_w_param, store->ParamIndex("fc.weight"));
  ASSIGN_OR_RETURN(fc_b_param, store->ParamIndex("fc.bias"));
  fc_w_offset = store->param_offset(fc_w_param);
  fc_b_offset = store->param_offset(fc_b_param);

  // Scratch shared by all layers.
  size_t bn_doubles = 2;
  int max_c = 1;
  for (const Unit* u : AllUnits()) {
    bn_doubles = std::max(bn_doubles, k::BnScratchDoubles(BnShape{0, opt.training ? N / opt.bn_group : 1, u->out_c}));
    max_c = std::max(max_c, u->out_c);
  }
  bn_doubles = std::max<size_t>(bn_doubles, static_cast<size_t>(max_c));  // inference: 2 floats per channel
  ASSIGN_OR_RETURN(p, Alloc(bn_doubles * sizeof(double), "BN scratch"));
  bn_scratch = static_cast<double*>(p);
  ASSIGN_OR_RETURN(scratch_a, Alloc(scratch_numel * dsize, "conv gradient scratch"));
  ASSIGN_OR_RETURN(scratch_b, Alloc(scratch_numel * dsize, "shortcut gradient scratch"));

  // Convolution algorithms (Find runs them on these very buffers, with weights in place:
  // initialize everything it reads so no NaN patterns slow or break a candidate).
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_params, 0, param_floats * sizeof(float), stream));
  if (d_params_lp) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_params_lp, 0, param_floats * dsize, stream));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_input, 0, dsize * N * input_c * H * W, stream));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(scratch_a, 0, scratch_numel * dsize, stream));
  for (const Unit* u : AllUnits()) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(u->y, 0, u->out_numel() * dsize, stream));
  if (pool_y) CUDA_RETURN_IF_ERROR(cudaMemsetAsync(pool_y, 0, static_cast<size_t>(N) * pool.out_h() * pool.out_w() * pool.c * dsize, stream));
  RETURN_IF_ERROR(Sync("initializing buffers before the cuDNN algorithm search"));
  void* find_ws = nullptr;
  size_t find_ws_bytes = 0;
  if (gpu.search == ConvSearch::kFind) {
    size_t free_b = 0, total_b = 0;
    CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
    find_ws_bytes = std::min(gpu.workspace_limit_bytes, free_b / 2);
    ASSIGN_OR_RETURN(find_ws, Alloc(find_ws_bytes, "cuDNN algorithm search workspace"));
  }
  auto choose = [&](Unit* u) { return Annotate(ChooseAlgorithms(u, find_ws, find_ws_bytes), u->name); };
  RETURN_IF_ERROR(choose(&stem));
  for (Block& b : blocks) {
    if (b.ds) RETURN_IF_ERROR(choose(&*b.ds));
    for (Unit& u : b.units) RETURN_IF_ERROR(choose(&u));
  }
  if (find_ws) {
    RETURN_IF_ERROR(Sync("the cuDNN algorithm search"));
    CUDA_RETURN_IF_ERROR(cudaFree(find_ws));
    allocations.erase(std::find(allocations.begin(), allocations.end(), find_ws));
  }
  if (workspace_bytes > 0) {
    ASSIGN_OR_RETURN(workspace, Alloc(workspace_bytes, "cuDNN workspace"));
  }
  return Sync("building the network");
}

absl::Status GpuResNet::Impl::ForwardUnit(Unit* u, const void* residual, bool training, int group, int groups) {
  const float one = 1.0f, zero = 0.0f;
  {
    Timer t(this, &OpTimes::conv_forward);
    CUDNN_RETURN_IF_ERROR(cudnnConvolutionForward(cudnn, &one, u->in_desc, u->in, u->w_desc, Weights(*u),
                                                  u->fwd_desc, u->fwd_algo, workspace, workspace_bytes, &zero,
                                                  u->out_desc, u->x));
  }
  const float* gamma = d_params + u->gamma_offset;
  const float* beta = d_params + u->beta_offset;
  Timer t(this, &OpTimes::batch_norm_forward);
  if (training) {
    const BnShape s{static_cast<int64_t>(opt.bn_group) * u->out_h * u->out_w, opt.batch / opt.bn_group, u->out_c};
    return k::BnForwardTrain(dtype, s, u->x, gamma, beta, residual, /*relu=*/true, u->y, u->save_mean, u->save_invstd,
                             u->running_mean, u->running_var, opt.bn_eps, opt.bn_momentum, group, groups, bn_scratch,
                             stream);
  }
  return k::BnForwardInference(dtype, static_cast<int64_t>(u->rows()), u->out_c, u->x, gamma, beta, u->running_mean,
                               u->running_var, opt.bn_eps, residual, /*relu=*/true, u->y,
                               reinterpret_cast<float*>(bn_scratch), stream);
}

absl::Status GpuResNet::Impl::Forward(bool training, double normalizer, int group, int groups) {
  {
    Timer t(this, &OpTimes::weight_reorder);
    if (dtype == DType::kBF16 && group == 0) {
      RETURN_IF_ERROR(k::CastFromFloat(dtype, param_floats, d_params, d_params_lp, stream));
    }
    if (stem.w_pad && group == 0) {
      RETURN_IF_ERROR(k::PadChannels(dtype, stem.w_rows(), stem.in_c, stem.in_c_dev, d_params + stem.w_offset,
                                     stem.w_pad, stream));
    }
  }
  RETURN_IF_ERROR(Annotate(ForwardUnit(&stem, nullptr, training, group, groups), stem.name));
  if (has_pool) {
    Timer t(this, &OpTimes::max_pool);
    RETURN_IF_ERROR(k::MaxPoolForward(dtype, pool, stem.y, pool_y, pool_argmax, stream));
  }
  for (Block& b : blocks) {
    const void* shortcut = b.in;
    // A projection shortcut is a conv + BN without ReLU: its BN runs with relu=false below.
    if (b.ds) {
      Unit* u = &*b.ds;
      const float one = 1.0f, zero = 0.0f;
      {
        Timer t(this, &OpTimes::conv_forward);
        CUDNN_RETURN_IF_ERROR(cudnnConvolutionForward(cudnn, &one, u->in_desc, u->in, u->w_desc, Weights(*u),
                                                      u->fwd_desc, u->fwd_algo, workspace, workspace_bytes, &zero,
                                                      u->out_desc, u->x));
      }
      Timer t(this, &OpTimes::batch_norm_forward);
      const float* gamma = d_params + u->gamma_offset;
      const float* beta = d_params + u->beta_offset;
      if (training) {
        const BnShape s{static_cast<int64_t>(opt.bn_group) * u->out_h * u->out_w, opt.batch / opt.bn_group, u->out_c};
        RETURN_IF_ERROR(Annotate(k::BnForwardTrain(dtype, s, u->x, gamma, beta, nullptr, /*relu=*/false, u->y,
                                                   u->save_mean, u->save_invstd, u->running_mean, u->running_var,
                                                   opt.bn_eps, opt.bn_momentum, group, groups, bn_scratch, stream),
                                 u->name));
      } else {
        RETURN_IF_ERROR(k::BnForwardInference(dtype, static_cast<int64_t>(u->rows()), u->out_c, u->x, gamma, beta,
                                              u->running_mean, u->running_var, opt.bn_eps, nullptr, false, u->y,
                                              reinterpret_cast<float*>(bn_scratch), stream));
      }
      shortcut = u->y;
    }
    for (size_t i = 0; i < b.units.size(); ++i) {
      const bool last = i + 1 == b.units.size();
      RETURN_IF_ERROR(
          Annotate(ForwardUnit(&b.units[i], last ? shortcut : nullptr, training, group, groups), b.units[i].name));
    }
  }
  const int N = opt.batch, K = spec.num_classes;
  {
    Timer t(this, &OpTimes::global_avg_pool);
    RETURN_IF_ERROR(k::GlobalAvgPoolForward(dtype, N, feat_hw, feat_c, features, pooled, stream));
  }
  {
    Timer t(this, &OpTimes::fc);
    // logits (N, K) = pooled (N, I) x W^T, W (K, I) row-major.
    RETURN_IF_ERROR(k::Sgemm(false, true, N, K, feat_c, pooled, feat_c, d_params + fc_w_offset, feat_c, 0.0f, logits,
                             K, stream));
    RETURN_IF_ERROR(k::AddBias(N, K, d_params + fc_b_offset, logits, stream));
  }
  if (training) {
    Timer t(this, &OpTimes::softmax_cross_entropy);
    RETURN_IF_ERROR(
        k::SoftmaxCrossEntropy(N, K, logits, d_labels, normalizer, dlogits, d_row_loss, d_loss, stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_loss, d_loss, sizeof(double), cudaMemcpyDeviceToHost, stream));
    if (group == 0) ++batches_tracked;
  }
  return absl::OkStatus();
}

absl::Status GpuResNet::Impl::BackwardUnit(Unit* u, const void* grad, const void* relu_y, void* din, float beta_data,
                                           bool accumulate, const GradReadyFn& on_ready) {
  const BnShape s{static_cast<int64_t>(opt.bn_group) * u->out_h * u->out_w, opt.batch / opt.bn_group, u->out_c};
  {
    Timer t(this, &OpTimes::batch_norm_backward);
    RETURN_IF_ERROR(k::BnBackward(dtype, s, grad, relu_y, u->x, d_params + u->gamma_offset, u->save_mean,
                                  u->save_invstd, scratch_a, d_grads + u->gamma_offset, d_grads + u->beta_offset,
                                  accumulate, bn_scratch, stream));
  }
  const float one = 1.0f;
  // fp32 writes (or adds) the weight gradient in place; bf16 and the padded stem go through a
  // scratch that is then cast / unpadded into the fp32 gradient.
  const bool direct = dtype == DType::kF32 && u->dw_pad == nullptr;
  const float beta_w = accumulate && direct ? 1.0f : 0.0f;
  void* dw = u->dw_pad ? u->dw_pad : direct ? static_cast<void*>(d_grads + u->w_offset) : d_wgrad_lp;
  {
    Timer t(this, &OpTimes::conv_backward_weights);
    CUDNN_RETURN_IF_ERROR(cudnnConvolutionBackwardFilter(cudnn, &one, u->in_desc, u->in, u->out_desc, scratch_a,
                                                         u->bwd_filter_desc, u->bwd_filter_algo, workspace,
                                                         workspace_bytes, &beta_w, u->w_desc, dw));
  }
  {
    Timer t(this, &OpTimes::weight_reorder);
    if (u->dw_pad) {
      RETURN_IF_ERROR(k::UnpadChannels(dtype, u->w_rows(), u->in_c, u->in_c_dev, u->dw_pad, d_grads + u->w_offset,
                                       accumulate, stream));
    } else if (!direct) {
      RETURN_IF_ERROR(k::CastToFloat(dtype, u->w_numel(), d_wgrad_lp, d_grads + u->w_offset, accumulate, stream));
    }
  }
  if (din) {
    Timer t(this, &OpTimes::conv_backward_data);
    CUDNN_RETURN_IF_ERROR(cudnnConvolutionBackwardData(cudnn, &one, u->w_desc, Weights(*u), u->out_desc, scratch_a,
                                                       u->bwd_data_desc, u->bwd_data_algo, workspace, workspace_bytes,
                                                       &beta_data, u->in_desc, din));
  }
  if (on_ready) {
    on_ready(u->w_param);
    on_ready(u->gamma_param);
    on_ready(u->beta_param);
  }
  return absl::OkStatus();
}

absl::Status GpuResNet::Impl::BackwardAll(bool accumulate, const GradReadyFn& on_ready) {
  const int N = opt.batch, K = spec.num_classes;
  std::optional<Timer> fc_timer(std::in_place, this, &OpTimes::fc);
  // dW (K, I) = dlogits^T (K x N) x pooled (N x I).
  RETURN_IF_ERROR(k::Sgemm(true, false, K, feat_c, N, dlogits, K, pooled, feat_c, accumulate ? 1.0f : 0.0f,
                           d_grads + fc_w_offset, feat_c, stream));
  RETURN_IF_ERROR(k::BiasGradient(N, K, dlogits, d_grads + fc_b_offset, accumulate, stream));
  if (on_ready) {
    on_ready(fc_w_param);
    on_ready(fc_b_param);
  }
  // dpooled (N, I) = dlogits (N, K) x W (K, I).
  RETURN_IF_ERROR(k::Sgemm(false, false, N, feat_c, K, dlogits, K, d_params + fc_w_offset, feat_c, 0.0f, d_pooled,
                           feat_c, stream));
  fc_timer.reset();
  {
    Timer t(this, &OpTimes::global_avg_pool);
    RETURN_IF_ERROR(k::GlobalAvgPoolBackward(dtype, N, feat_hw, feat_c, d_pooled, d_features, stream));
  }
  for (size_t bi = blocks.size(); bi-- > 0;) {
    Block& b = blocks[bi];
    Unit& last = b.units.back();
    // dz = gradient at the residual sum (before the block's final ReLU); it feeds both the
    // main path's last BN and the shortcut. With an identity shortcut it is written straight
    // into the block's input gradient, which the first conv's backward-data then adds to.
    void* dz = b.ds ? scratch_b : b.din;
    {
      Timer t(this, &OpTimes::add_relu_backward);
      RETURN_IF_ERROR(k::ReluMask(dtype, last.out_numel(), last.dy, last.y, dz, stream));
    }
    if (b.ds) {
      RETURN_IF_ERROR(Annotate(BackwardUnit(&*b.ds, dz, nullptr, b.din, 0.0f, accumulate, on_ready), b.ds->name));
    }
    for (size_t i = b.units.size(); i-- > 0;) {
      Unit& u = b.units[i];
      const bool is_last = i + 1 == b.units.size();
      void* din = i > 0 ? b.units[i - 1].dy : b.din;
      RETURN_IF_ERROR(Annotate(BackwardUnit(&u, is_last ? dz : u.dy, is_last ? nullptr : u.y, din,
                                            i == 0 ? 1.0f : 0.0f, accumulate, on_ready),
                               u.name));
    }
  }
  if (has_pool) {
    Timer t(this, &OpTimes::max_pool);
    RETURN_IF_ERROR(k::MaxPoolBackward(dtype, pool, pool_dy, pool_argmax, stem.dy, stream));
  }
  return Annotate(BackwardUnit(&stem, stem.dy, stem.y, nullptr, 0.0f, accumulate, on_ready), stem.name);
}

// Conv weights: OIHW (store) <-> KRSC (device). Other tensors are copied as they are.
void GpuResNet::Impl::Reorder(const float* in, float* out, bool to_device) const {
  std::copy(in, in + param_floats, out);
  for (const Unit* u : AllUnits()) {
    const int O = u->conv.out_channels, I = u->conv.in_channels, R = u->conv.kernel;
    const float* src = in + u->w_offset;
    float* dst = out + u->w_offset;
    for (int o = 0; o < O; ++o) {
      for (int i = 0; i < I; ++i) {
        for (int r = 0; r < R; ++r) {
          for (int c = 0; c < R; ++c) {
            const size_t oihw = ((static_cast<size_t>(o) * I + i) * R + r) * R + c;
            const size_t krsc = ((static_cast<size_t>(o) * R + r) * R + c) * I + i;
            if (to_device) {
              dst[krsc] = src[oihw];
            } else {
              dst[oihw] = src[krsc];
            }
          }
        }
      }
    }
  }
}

absl::Status GpuResNet::Impl::Upload(const model::ParamStore& s) {
  RETURN_IF_ERROR(Sync("the previous step before uploading parameters"));
  std::vector<float> host(param_floats);
  Reorder(s.params().data(), host.data(), /*to_device=*/true);
  // On our stream, then waited for: the legacy default stream does not order against a
  // non-blocking stream.
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(d_params, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  if (!s.buffers().empty()) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_buffers, s.buffers().data(), s.buffers().size() * sizeof(float),
                                         cudaMemcpyHostToDevice, stream));
  }
  batches_tracked = 0;
  return Sync("uploading parameters");
}

absl::Status GpuResNet::Impl::Download(model::ParamStore* s, bool grads) {
  RETURN_IF_ERROR(Sync(grads ? "backward before downloading gradients" : "the step before downloading parameters"));
  std::vector<float> host(param_floats);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(host.data(), grads ? d_grads : d_params, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  Reorder(host.data(), (grads ? s->grads() : s->params()).data(), /*to_device=*/false);
  return grads ? absl::OkStatus() : DownloadBuffers(s);
}

// BN running statistics and num_batches_tracked to the store (the stream already waited for).
absl::Status GpuResNet::Impl::DownloadBuffers(model::ParamStore* s) {
  if (!s->buffers().empty()) {
    CUDA_RETURN_IF_ERROR(
        cudaMemcpy(s->buffers().data(), d_buffers, s->buffers().size() * sizeof(float), cudaMemcpyDeviceToHost));
  }
  s->set_num_batches_tracked(s->num_batches_tracked() + batches_tracked);
  batches_tracked = 0;
  return absl::OkStatus();
}

absl::Status GpuResNet::Impl::Stage(const float* images, const int32_t* labels) {
  const int N = opt.batch, K = spec.num_classes;
  if (labels) {
    for (int n = 0; n < N; ++n) {
      if (labels[n] < 0 || labels[n] >= K) {
        return absl::InvalidArgumentError(absl::StrCat("label ", labels[n], " of sample ", n, " not in [0, ", K, ")"));
      }
    }
  }
  // The pinned buffers may still be read by the previous batch's copy.
  if (staged_once) RETURN_IF_ERROR(WaitForEvent(staged, gpu.sync_timeout, "the previous batch's host-to-device copy"));
  const size_t numel = static_cast<size_t>(N) * spec.in_channels * opt.height * opt.width;
  std::memcpy(h_images, images, numel * sizeof(float));
  if (labels) std::memcpy(h_labels, labels, sizeof(int32_t) * N);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_images, h_images, numel * sizeof(float), cudaMemcpyHostToDevice, stream));
  if (labels) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_labels, h_labels, sizeof(int32_t) * N, cudaMemcpyHostToDevice, stream));
  }
  CUDA_RETURN_IF_ERROR(cudaEventRecord(staged, stream));
  staged_once = true;
  return k::NchwToNhwc(dtype, N, spec.in_channels, opt.height, opt.width, input_c, d_images, d_input, stream);
}

absl::Status GpuResNet::Impl::Sync(absl::string_view what) {
  CUDA_RETURN_IF_ERROR(cudaEventRecord(done, stream));
  RETURN_IF_ERROR(WaitForEvent(done, gpu.sync_timeout, what));
  CollectTimes();
  return absl::OkStatus();
}

// ---- GpuResNet ----------------------------------------------------------------------------

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
const OpTimes& GpuResNet::times() const { return impl_->times; }
void GpuResNet::ResetTimes() { impl_->times = OpTimes(); }
void GpuResNet::SetProfiling(bool on) { impl_->profile = on; }
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
