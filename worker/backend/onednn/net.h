// The oneDNN ResNet's internals, shared by the files that implement it (not part of its API):
//   resnet.cc     CreateResNet, SetNumThreads and the error guard
//   net_build.cc  primitives, memory descriptors and layouts (Build)
//   net_step.cc   forward, backward, the running statistics and inference
#pragma once

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <optional>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/bf16.h"
#include "dnnl.hpp"
#include "worker/backend/bn_running_stats.h"

#include "worker/backend/onednn/resnet.h"

namespace lmsgd::backend::onednn::detail {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;
using Clock = std::chrono::steady_clock;

// Accumulates the time of one op into an OpTimes field.
class ScopedTimer {
 public:
  explicit ScopedTimer(double* acc) : acc_(acc), start_(Clock::now()) {}
  ~ScopedTimer() { *acc_ += std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  double* acc_;
  Clock::time_point start_;
};

inline std::string TagName(Tag t) {
  switch (t) {
    case Tag::nChw16c: return "nChw16c";
    case Tag::nChw8c: return "nChw8c";
    case Tag::nhwc: return "nhwc";
    case Tag::nchw: return "nchw";
    default: return "other";
  }
}

// The activation layout oneDNN's convolution picks on this CPU for a typical ResNet layer in
// data type `dt`.
inline Tag PreferredActivationTag(const dnnl::engine& eng, Dt dt) {
  const memory::dims src = {32, 64, 56, 56}, w = {64, 64, 3, 3};
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                    memory::desc(src, dt, Tag::any), memory::desc(w, dt, Tag::any),
                                    memory::desc(src, dt, Tag::any), {1, 1}, {1, 1}, {1, 1});
  dnnl::convolution_forward::primitive_desc pd(d, eng);
  for (Tag t : {Tag::nChw16c, Tag::nChw8c, Tag::nhwc, Tag::nchw}) {
    if (pd.dst_desc() == memory::desc(src, dt, t)) return t;
  }
  return Tag::nchw;
}

using ::lmsgd::Bf16ToFloat;  // common/bf16.h
using ::lmsgd::FloatToBf16;

// Offset of element (n, c, hw) in an activation of the given layout.
struct LayoutIndex {
  Tag tag;
  int64_t C, HW;
  int64_t operator()(int64_t n, int64_t c, int64_t hw) const {
    switch (tag) {
      case Tag::nChw16c: return ((n * (C / 16) + c / 16) * HW + hw) * 16 + c % 16;
      case Tag::nChw8c: return ((n * (C / 8) + c / 8) * HW + hw) * 8 + c % 8;
      case Tag::nhwc: return (n * HW + hw) * C + c;
      default: return (n * C + c) * HW + hw;
    }
  }
};

class Net;

// conv (no bias) -> BN (-> ReLU), training or inference; one of ResNet's building units.
struct ConvBn {
  std::string name;  // conv's name, for errors
  model::ConvSpec conv;
  model::BnSpec bn;
  bool relu = false;
  bool needs_diff_src = true;  // false for the stem (no gradient w.r.t. the images)
  int n = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;

  // Params in the store (plain layouts).
  size_t w_index = 0, gamma_index = 0, beta_index = 0;
  float* running_mean = nullptr;  // BN running statistics in the store (looked up once, at build)
  float* running_var = nullptr;
  memory w_user, dw_user;
  // Conv.
  dnnl::convolution_forward conv_fwd;
  dnnl::convolution_backward_data conv_bwd_data;
  dnnl::convolution_backward_weights conv_bwd_weights;
  memory w_fwd, w_bwd, dw_prim;  // backend-layout copies (may alias the user memories)
  dnnl::reorder w_to_fwd, w_to_bwd, dw_to_user;
  bool reorder_w_fwd = false, reorder_w_bwd = false, reorder_dw = false;
  memory* in = nullptr;  // producer's output
  memory conv_out, out;  // conv output, BN(+ReLU) output
  memory diff_out;       // d loss / d out, written by the consumer (unused for some units)
  // BN, per group g: views into conv_out / out / diffs, and statistics.
  int groups = 1;
  dnnl::batch_normalization_forward bn_fwd;
  dnnl::batch_normalization_backward bn_bwd;
  memory scale, shift;
  std::vector<memory> g_src, g_dst, g_mean, g_var, g_ws, g_diff_dst, g_diff_src, g_dscale, g_dshift;
  std::vector<float> mean_buf, var_buf, dscale_buf, dshift_buf;
  memory diff_conv_out;  // scratch (shared across units)
};

// out = ReLU(main + shortcut) and its backward.
struct Block {
  std::vector<ConvBn> units;
  std::optional<ConvBn> downsample;
  memory* in = nullptr;
  memory* diff_in = nullptr;  // gradient w.r.t. the block input, written here
  memory out, diff_out;
  dnnl::binary add_relu;
  dnnl::eltwise_backward relu_bwd;
  memory d_sum;               // the last unit's diff_out
  dnnl::binary accumulate;    // diff_in += d_shortcut (in place)
  memory d_short;             // scratch for the downsample path's input gradient
};

class Net final : public Network {
 public:
  Net(const model::ResNetSpec& spec, model::ParamStore* store, const NetworkOptions& o)
      : spec_(spec), store_(store), opt_(o), eng_(dnnl::engine::kind::cpu, 0), stream_(eng_) {}

  absl::Status Build();
  absl::StatusOr<double> ForwardTrain(const float* images, const int32_t* labels, double normalizer, int group,
                                      int groups) override;
  absl::Status Backward(const GradReadyFn& on_ready) override;
  absl::Status Predict(const float* images, float* logits) override;
  const OpTimes& times() const override { return times_; }
  void ResetTimes() override { times_ = OpTimes{}; }
  std::string Describe() const override {
    return absl::StrCat("oneDNN ", dnnl::version()->major, ".", dnnl::version()->minor, ".", dnnl::version()->patch,
                        " cpu, ", PrecisionName(opt_.precision), " activations ", TagName(act_tag_), ", ",
                        omp_get_max_threads(), " threads, batch ",
                        opt_.batch, ", bn_group ", opt_.bn_group, opt_.training ? ", training" : ", inference");
  }

 private:
  memory::desc ActDesc(int n, int c, int h, int w) const { return memory::desc({n, c, h, w}, act_dt_, act_tag_); }
  bool bf16() const { return act_dt_ == Dt::bf16; }
  memory NewMem(const memory::desc& md) { return memory(md, eng_); }
  absl::Status BuildConvBn(ConvBn* u, memory* in, const memory::desc& in_md, int h, int w);
  absl::Status BuildBlock(Block* b, const model::BlockSpec& spec, memory* in, memory* diff_in, int c, int h, int w,
                          int* out_c, int* out_h, int* out_w);
  void PrepareWeights(ConvBn* u);
  void ForwardUnit(ConvBn* u);
  void BackwardUnit(ConvBn* u, const memory& diff_out, memory* diff_in, const GradReadyFn& on_ready);
  void UpdateRunningStats(ConvBn* u);
  void ForwardAll(const float* images);
  memory Scratch(const memory::desc& md, int which);
  absl::Status Guard(const std::function<void()>& fn, const char* what);

  model::ResNetSpec spec_;
  model::ParamStore* store_;
  NetworkOptions opt_;
  dnnl::engine eng_;
  dnnl::stream stream_;
  Tag act_tag_ = Tag::nchw;
  Dt act_dt_ = Dt::f32;  // activations and the convolutions' weight copies
  OpTimes times_;
  std::string where_;  // the layer being run (named in errors)

  memory input_;  // plain NCHW images (fp32)
  memory input_lp_;            // the images in bf16 (kBf16: what the stem reads)
  dnnl::reorder input_to_lp_;
  ConvBn stem_;
  dnnl::pooling_forward pool_fwd_;
  dnnl::pooling_backward pool_bwd_;
  memory pool_out_, pool_ws_, pool_diff_out_;
  std::deque<Block> blocks_;
  memory* features_ = nullptr;  // last block's output (N, C, h, w)
  memory* features_diff_ = nullptr;
  int feat_c_ = 0, feat_hw_ = 0;
  // Head.
  std::vector<float> pooled_, d_pooled_, logits_, d_logits_;
  memory pooled_mem_, d_pooled_mem_, logits_mem_, d_logits_mem_, fc_w_, fc_b_, fc_dw_, fc_db_;
  dnnl::inner_product_forward fc_fwd_;
  dnnl::inner_product_backward_data fc_bwd_data_;
  dnnl::inner_product_backward_weights fc_bwd_weights_;
  size_t fc_w_index_ = 0, fc_b_index_ = 0;
  std::vector<int32_t> labels_;
  // Scratch buffers shared across layers (sized after Build, handles set then).
  size_t scratch_bytes_[2] = {0, 0};
  std::vector<float> scratch_[2];
  std::deque<memory> scratch_mems_;
  bool forward_done_ = false;
  int vw_index_ = 0, vw_count_ = 1;  // virtual worker of this forward (running-stats update)
};

}  // namespace lmsgd::backend::onednn::detail
