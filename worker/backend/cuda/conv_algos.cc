#include "worker/backend/cuda/resnet_impl.h"

namespace lmsgd::backend::cuda {

using detail::AlgoChoice;
using detail::Block;
using detail::Unit;

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

}  // namespace lmsgd::backend::cuda
