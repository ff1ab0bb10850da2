#include "worker/backend/onednn/resnet.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <functional>
#include <optional>
#include <unordered_map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "dnnl.hpp"
#include "worker/backend/bn_running_stats.h"

namespace lmsgd::backend::onednn {
namespace {

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

std::string TagName(Tag t) {
  switch (t) {
    case Tag::nChw16c: return "nChw16c";
    case Tag::nChw8c: return "nChw8c";
    case Tag::nhwc: return "nhwc";
    case Tag::nchw: return "nchw";
    default: return "other";
  }
}

// The activation layout oneDNN's convolution picks on this CPU for a typical ResNet layer.
Tag PreferredActivationTag(const dnnl::engine& eng) {
  const memory::dims src = {32, 64, 56, 56}, w = {64, 64, 3, 3};
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                    memory::desc(src, Dt::f32, Tag::any), memory::desc(w, Dt::f32, Tag::any),
                                    memory::desc(src, Dt::f32, Tag::any), {1, 1}, {1, 1}, {1, 1});
  dnnl::convolution_forward::primitive_desc pd(d, eng);
  for (Tag t : {Tag::nChw16c, Tag::nChw8c, Tag::nhwc, Tag::nchw}) {
    if (pd.dst_desc() == memory::desc(src, Dt::f32, t)) return t;
  }
  return Tag::nchw;
}

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
                        " cpu, activations ", TagName(act_tag_), ", ", omp_get_max_threads(), " threads, batch ",
                        opt_.batch, ", bn_group ", opt_.bn_group, opt_.training ? ", training" : ", inference");
  }

 private:
  memory::desc ActDesc(int n, int c, int h, int w) const { return memory::desc({n, c, h, w}, Dt::f32, act_tag_); }
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
  OpTimes times_;
  std::string where_;  // the layer being run (named in errors)

  memory input_;  // plain NCHW images
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

absl::Status Net::Guard(const std::function<void()>& fn, const char* what) {
  try {
    fn();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat(__FILE__, ": oneDNN error in ", what, " at layer '", where_,
                                            "': ", e.what(), " (dnnl_status ", static_cast<int>(e.status), ")"));
  }
  return absl::OkStatus();
}

memory Net::Scratch(const memory::desc& md, int which) {
  scratch_bytes_[which] = std::max(scratch_bytes_[which], md.get_size());
  scratch_mems_.emplace_back(md, eng_, static_cast<void*>(nullptr));
  return scratch_mems_.back();  // memory is a shared handle: the copy refers to the same object
}

absl::Status Net::BuildConvBn(ConvBn* u, memory* in, const memory::desc& in_md, int h, int w) {
  using namespace dnnl;
  where_ = u->conv.name;
  const auto& c = u->conv;
  u->name = c.name;
  u->n = opt_.batch;
  u->in_h = h;
  u->in_w = w;
  u->out_h = (h + 2 * c.padding - c.kernel) / c.stride + 1;
  u->out_w = (w + 2 * c.padding - c.kernel) / c.stride + 1;
  u->in = in;
  const memory::dims strides = {c.stride, c.stride}, pad = {c.padding, c.padding};
  const memory::dims w_dims = {c.out_channels, c.in_channels, c.kernel, c.kernel};
  const memory::desc out_md = ActDesc(u->n, c.out_channels, u->out_h, u->out_w);
  const memory::desc w_any(w_dims, Dt::f32, Tag::any);
  const memory::desc w_plain(w_dims, Dt::f32, Tag::oihw);

  auto idx = store_->ParamIndex(c.name + ".weight");
  if (!idx.ok()) return idx.status();
  u->w_index = *idx;
  u->w_user = memory(w_plain, eng_, store_->param(u->w_index));
  u->dw_user = memory(w_plain, eng_, store_->grad(u->w_index));

  const prop_kind pk = opt_.training ? prop_kind::forward_training : prop_kind::forward_inference;
  convolution_forward::primitive_desc fwd_pd(
      convolution_forward::desc(pk, algorithm::convolution_direct, in_md, w_any, out_md, strides, pad, pad), eng_);
  u->conv_fwd = convolution_forward(fwd_pd);
  u->reorder_w_fwd = fwd_pd.weights_desc() != w_plain;
  u->w_fwd = u->reorder_w_fwd ? NewMem(fwd_pd.weights_desc()) : u->w_user;
  if (u->reorder_w_fwd) u->w_to_fwd = reorder(u->w_user, u->w_fwd);
  u->conv_out = NewMem(out_md);
  u->out = NewMem(out_md);

  if (opt_.training) {
    if (u->needs_diff_src) {
      convolution_backward_data::primitive_desc bd_pd(
          convolution_backward_data::desc(algorithm::convolution_direct, in_md, w_any, out_md, strides, pad, pad), eng_,
          fwd_pd);
      u->conv_bwd_data = convolution_backward_data(bd_pd);
      if (bd_pd.weights_desc() == fwd_pd.weights_desc()) {
        u->w_bwd = u->w_fwd;
      } else {
        u->reorder_w_bwd = bd_pd.weights_desc() != w_plain;
        u->w_bwd = u->reorder_w_bwd ? NewMem(bd_pd.weights_desc()) : u->w_user;
        if (u->reorder_w_bwd) u->w_to_bwd = reorder(u->w_user, u->w_bwd);
      }
    }
    convolution_backward_weights::primitive_desc bw_pd(
        convolution_backward_weights::desc(algorithm::convolution_direct, in_md, w_any, out_md, strides, pad, pad),
        eng_, fwd_pd);
    u->conv_bwd_weights = convolution_backward_weights(bw_pd);
    u->reorder_dw = bw_pd.diff_weights_desc() != w_plain;
    u->dw_prim = u->reorder_dw ? NewMem(bw_pd.diff_weights_desc()) : u->dw_user;
    if (u->reorder_dw) u->dw_to_user = reorder(u->dw_prim, u->dw_user);
    u->diff_out = NewMem(out_md);
    u->diff_conv_out = Scratch(out_md, 0);
  }

  // Batch norm.
  const int C = u->bn.channels;
  auto gi = store_->ParamIndex(u->bn.name + ".weight");
  auto bi = store_->ParamIndex(u->bn.name + ".bias");
  if (!gi.ok()) return gi.status();
  if (!bi.ok()) return bi.status();
  u->gamma_index = *gi;
  u->beta_index = *bi;
  const memory::desc c_md({C}, Dt::f32, Tag::x);
  u->scale = memory(c_md, eng_, store_->param(u->gamma_index));
  u->shift = memory(c_md, eng_, store_->param(u->beta_index));
  auto rm = store_->BufferIndex(u->bn.name + ".running_mean");
  auto rv = store_->BufferIndex(u->bn.name + ".running_var");
  if (!rm.ok()) return rm.status();
  if (!rv.ok()) return rv.status();
  u->running_mean = store_->buffer(*rm);
  u->running_var = store_->buffer(*rv);
  normalization_flags flags = normalization_flags::use_scale | normalization_flags::use_shift;
  if (u->relu) flags = flags | normalization_flags::fuse_norm_relu;
  const float eps = static_cast<float>(opt_.bn_eps);
  if (!opt_.training) {
    u->groups = 1;
    batch_normalization_forward::primitive_desc pd(
        batch_normalization_forward::desc(prop_kind::forward_inference, out_md, eps,
                                          flags | normalization_flags::use_global_stats),
        eng_);
    u->bn_fwd = batch_normalization_forward(pd);
    u->g_src = {u->conv_out};
    u->g_dst = {u->out};
    u->g_mean = {memory(c_md, eng_, u->running_mean)};
    u->g_var = {memory(c_md, eng_, u->running_var)};
    return absl::OkStatus();
  }
  const int g = opt_.bn_group;
  u->groups = u->n / g;
  const memory::desc g_md = ActDesc(g, C, u->out_h, u->out_w);
  batch_normalization_forward::primitive_desc fpd(
      batch_normalization_forward::desc(prop_kind::forward_training, g_md, eps, flags), eng_);
  batch_normalization_backward::primitive_desc bpd(
      batch_normalization_backward::desc(prop_kind::backward, g_md, g_md, eps, flags), eng_, fpd);
  u->bn_fwd = batch_normalization_forward(fpd);
  u->bn_bwd = batch_normalization_backward(bpd);
  const size_t slice = g_md.get_size();  // bytes per group (N is outermost in every layout used)
  u->mean_buf.assign(static_cast<size_t>(u->groups) * C, 0.0f);
  u->var_buf.assign(static_cast<size_t>(u->groups) * C, 0.0f);
  u->dscale_buf.assign(static_cast<size_t>(u->groups) * C, 0.0f);
  u->dshift_buf.assign(static_cast<size_t>(u->groups) * C, 0.0f);
  for (int k = 0; k < u->groups; ++k) {
    auto view = [&](memory& whole) {
      return memory(g_md, eng_, static_cast<char*>(whole.get_data_handle()) + k * slice);
    };
    u->g_src.push_back(view(u->conv_out));
    u->g_dst.push_back(view(u->out));
    u->g_diff_dst.push_back(memory(g_md, eng_, static_cast<void*>(nullptr)));  // set per call (diff_out varies)
    u->g_diff_src.push_back(memory(g_md, eng_, static_cast<void*>(nullptr)));  // set once scratch exists
    u->g_mean.push_back(memory(c_md, eng_, u->mean_buf.data() + k * C));
    u->g_var.push_back(memory(c_md, eng_, u->var_buf.data() + k * C));
    u->g_dscale.push_back(memory(c_md, eng_, u->dscale_buf.data() + k * C));
    u->g_dshift.push_back(memory(c_md, eng_, u->dshift_buf.data() + k * C));
    if (u->relu) u->g_ws.push_back(NewMem(fpd.workspace_desc()));
  }
  return absl::OkStatus();
}

absl::Status Net::BuildBlock(Block* b, const model::BlockSpec& spec, memory* in, memory* diff_in, int c, int h,
                             int w, int* out_c, int* out_h, int* out_w) {
  using namespace dnnl;
  b->in = in;
  b->diff_in = diff_in;
  b->units.resize(spec.convs.size());
  memory* cur = in;
  int ch = c, hh = h, ww = w;
  for (size_t i = 0; i < spec.convs.size(); ++i) {
    ConvBn& u = b->units[i];
    u.conv = spec.convs[i];
    u.bn = spec.bns[i];
    u.relu = i + 1 < spec.convs.size();
    if (auto st = BuildConvBn(&u, cur, ActDesc(opt_.batch, ch, hh, ww), hh, ww); !st.ok()) return st;
    cur = &u.out;
    ch = u.conv.out_channels;
    hh = u.out_h;
    ww = u.out_w;
  }
  if (spec.downsample_conv) {
    b->downsample.emplace();
    b->downsample->conv = *spec.downsample_conv;
    b->downsample->bn = *spec.downsample_bn;
    b->downsample->relu = false;
    if (auto st = BuildConvBn(&*b->downsample, in, ActDesc(opt_.batch, c, h, w), h, w); !st.ok()) return st;
  }
  where_ = spec.name;
  const memory::desc out_md = ActDesc(opt_.batch, ch, hh, ww);
  b->out = NewMem(out_md);
  post_ops ops;
  ops.append_eltwise(1.0f, algorithm::eltwise_relu, 0.0f, 0.0f);
  primitive_attr attr;
  attr.set_post_ops(ops);
  b->add_relu = binary(binary::primitive_desc(binary::desc(algorithm::binary_add, out_md, out_md, out_md), attr, eng_));
  if (opt_.training) {
    b->diff_out = NewMem(out_md);
    eltwise_forward::primitive_desc hint(
        eltwise_forward::desc(prop_kind::forward_training, algorithm::eltwise_relu_use_dst_for_bwd, out_md, 0.0f, 0.0f),
        eng_);
    b->relu_bwd = eltwise_backward(eltwise_backward::primitive_desc(
        eltwise_backward::desc(algorithm::eltwise_relu_use_dst_for_bwd, out_md, out_md, 0.0f, 0.0f), eng_, hint));
    b->d_sum = b->units.back().diff_out;  // the last unit reads its output gradient from here
    const memory::desc in_md = ActDesc(opt_.batch, c, h, w);
    b->accumulate = binary(binary::primitive_desc(binary::desc(algorithm::binary_add, in_md, in_md, in_md), eng_));
    if (b->downsample) b->d_short = Scratch(in_md, 1);
  }
  *out_c = ch;
  *out_h = hh;
  *out_w = ww;
  return absl::OkStatus();
}

absl::Status Net::Build() {
  return Guard(
      [&] {
        using namespace dnnl;
        act_tag_ = PreferredActivationTag(eng_);
        const int N = opt_.batch;
        const memory::desc in_md({N, spec_.in_channels, opt_.height, opt_.width}, Dt::f32, Tag::nchw);
        input_ = memory(in_md, eng_, static_cast<void*>(nullptr));
        stem_.conv = spec_.stem_conv;
        stem_.bn = spec_.stem_bn;
        stem_.relu = true;
        stem_.needs_diff_src = false;
        auto st = BuildConvBn(&stem_, &input_, in_md, opt_.height, opt_.width);
        if (!st.ok()) throw dnnl::error(dnnl_invalid_arguments, std::string(st.message()).c_str());
        memory* cur = &stem_.out;
        memory* cur_diff = opt_.training ? &stem_.diff_out : nullptr;
        int c = spec_.stem_conv.out_channels, h = stem_.out_h, w = stem_.out_w;
        if (spec_.stem_maxpool) {
          where_ = "maxpool";
          const int ph = (h + 2 - 3) / 2 + 1, pw = (w + 2 - 3) / 2 + 1;
          const memory::desc src_md = ActDesc(N, c, h, w), dst_md = ActDesc(N, c, ph, pw);
          const prop_kind pk = opt_.training ? prop_kind::forward_training : prop_kind::forward_inference;
          pooling_forward::primitive_desc fpd(
              pooling_forward::desc(pk, algorithm::pooling_max, src_md, dst_md, {2, 2}, {3, 3}, {1, 1}, {1, 1}), eng_);
          pool_fwd_ = pooling_forward(fpd);
          pool_out_ = NewMem(dst_md);
          if (opt_.training) {
            pool_ws_ = NewMem(fpd.workspace_desc());
            pool_bwd_ = pooling_backward(pooling_backward::primitive_desc(
                pooling_backward::desc(algorithm::pooling_max, src_md, dst_md, {2, 2}, {3, 3}, {1, 1}, {1, 1}), eng_,
                fpd));
            pool_diff_out_ = NewMem(dst_md);
            cur_diff = &pool_diff_out_;
          }
          cur = &pool_out_;
          h = ph;
          w = pw;
        }
        for (const auto& bs : spec_.blocks) {
          blocks_.emplace_back();
          st = BuildBlock(&blocks_.back(), bs, cur, cur_diff, c, h, w, &c, &h, &w);
          if (!st.ok()) throw dnnl::error(dnnl_invalid_arguments, std::string(st.message()).c_str());
          cur = &blocks_.back().out;
          cur_diff = opt_.training ? &blocks_.back().diff_out : nullptr;
        }
        features_ = cur;
        features_diff_ = cur_diff;
        feat_c_ = c;
        feat_hw_ = h * w;
        // Head: global average pool (own loop over the blocked layout) -> fc (inner product).
        where_ = "fc";
        const int K = spec_.num_classes;
        pooled_.assign(static_cast<size_t>(N) * c, 0.0f);
        logits_.assign(static_cast<size_t>(N) * K, 0.0f);
        const memory::desc x_md({N, c}, Dt::f32, Tag::nc), w_md({K, c}, Dt::f32, Tag::oi),
            b_md({K}, Dt::f32, Tag::x), y_md({N, K}, Dt::f32, Tag::nc);
        fc_w_index_ = store_->ParamIndex("fc.weight").value();
        fc_b_index_ = store_->ParamIndex("fc.bias").value();
        pooled_mem_ = memory(x_md, eng_, pooled_.data());
        logits_mem_ = memory(y_md, eng_, logits_.data());
        fc_w_ = memory(w_md, eng_, store_->param(fc_w_index_));
        fc_b_ = memory(b_md, eng_, store_->param(fc_b_index_));
        const prop_kind pk = opt_.training ? prop_kind::forward_training : prop_kind::forward_inference;
        inner_product_forward::primitive_desc fpd(inner_product_forward::desc(pk, x_md, w_md, b_md, y_md), eng_);
        fc_fwd_ = inner_product_forward(fpd);
        if (opt_.training) {
          d_pooled_.assign(pooled_.size(), 0.0f);
          d_logits_.assign(logits_.size(), 0.0f);
          d_pooled_mem_ = memory(x_md, eng_, d_pooled_.data());
          d_logits_mem_ = memory(y_md, eng_, d_logits_.data());
          fc_dw_ = memory(w_md, eng_, store_->grad(fc_w_index_));
          fc_db_ = memory(b_md, eng_, store_->grad(fc_b_index_));
          fc_bwd_data_ = inner_product_backward_data(inner_product_backward_data::primitive_desc(
              inner_product_backward_data::desc(x_md, w_md, y_md), eng_, fpd));
          fc_bwd_weights_ = inner_product_backward_weights(inner_product_backward_weights::primitive_desc(
              inner_product_backward_weights::desc(x_md, w_md, b_md, y_md), eng_, fpd));
        }
        // Scratch: one buffer per kind, as large as its largest user.
        for (int k = 0; k < 2; ++k) scratch_[k].assign(scratch_bytes_[k] / sizeof(float) + 16, 0.0f);
        // Assign scratch handles: diff_conv_out -> buffer 0, d_short -> buffer 1.
        auto assign = [&](ConvBn& u) {
          if (!opt_.training) return;
          u.diff_conv_out.set_data_handle(scratch_[0].data());
          const size_t slice = u.g_src.empty() ? 0 : u.g_src[0].get_desc().get_size();
          for (int k = 0; k < u.groups; ++k) {
            u.g_diff_src[k].set_data_handle(reinterpret_cast<char*>(scratch_[0].data()) + k * slice);
          }
        };
        assign(stem_);
        for (auto& b : blocks_) {
          for (auto& u : b.units) assign(u);
          if (b.downsample) {
            assign(*b.downsample);
            if (opt_.training) b.d_short.set_data_handle(scratch_[1].data());
          }
        }
        where_ = "";
      },
      "Build");
}

void Net::PrepareWeights(ConvBn* u) {
  ScopedTimer t(&times_.weight_reorder);
  if (u->reorder_w_fwd) u->w_to_fwd.execute(stream_, u->w_user, u->w_fwd);
  if (opt_.training && u->reorder_w_bwd) u->w_to_bwd.execute(stream_, u->w_user, u->w_bwd);
}

void Net::UpdateRunningStats(ConvBn* u) {
  const int C = u->bn.channels;
  const double cnt = static_cast<double>(opt_.bn_group) * u->out_h * u->out_w;
  const double unbias = UnbiasFactor(cnt);
  const double m = opt_.bn_momentum;
  float* rm = u->running_mean;
  float* rv = u->running_var;
  for (int c = 0; c < C; ++c) {
    double mean = 0, var = 0;
    for (int k = 0; k < u->groups; ++k) {
      mean += u->mean_buf[static_cast<size_t>(k) * C + c];
      var += u->var_buf[static_cast<size_t>(k) * C + c] * unbias;
    }
    const double w = RunningStatWeight(m, u->groups, vw_count_);
    rm[c] = UpdateRunningStat(rm[c], m, w * mean, vw_index_);
    rv[c] = UpdateRunningStat(rv[c], m, w * var, vw_index_);
  }
}

void Net::ForwardUnit(ConvBn* u) {
  where_ = u->name;
  PrepareWeights(u);
  {
    ScopedTimer t(&times_.conv_forward);
    u->conv_fwd.execute(stream_, {{DNNL_ARG_SRC, *u->in}, {DNNL_ARG_WEIGHTS, u->w_fwd}, {DNNL_ARG_DST, u->conv_out}});
  }
  ScopedTimer t(&times_.batch_norm_forward);
  for (int k = 0; k < u->groups; ++k) {
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, u->g_src[k]},  {DNNL_ARG_DST, u->g_dst[k]},
                                            {DNNL_ARG_MEAN, u->g_mean[k]}, {DNNL_ARG_VARIANCE, u->g_var[k]},
                                            {DNNL_ARG_SCALE, u->scale},    {DNNL_ARG_SHIFT, u->shift}};
    if (opt_.training && u->relu) args[DNNL_ARG_WORKSPACE] = u->g_ws[k];
    u->bn_fwd.execute(stream_, args);
  }
  if (opt_.training) UpdateRunningStats(u);
}

void Net::BackwardUnit(ConvBn* u, const memory& diff_out, memory* diff_in, const GradReadyFn& on_ready) {
  where_ = u->name + " (batch norm backward)";
  const int C = u->bn.channels;
  {
    ScopedTimer t(&times_.batch_norm_backward);
    const size_t slice = u->g_src[0].get_desc().get_size();
    for (int k = 0; k < u->groups; ++k) {
      u->g_diff_dst[k].set_data_handle(static_cast<char*>(diff_out.get_data_handle()) + k * slice);
      std::unordered_map<int, memory> args = {
          {DNNL_ARG_SRC, u->g_src[k]},          {DNNL_ARG_MEAN, u->g_mean[k]},      {DNNL_ARG_VARIANCE, u->g_var[k]},
          {DNNL_ARG_DIFF_DST, u->g_diff_dst[k]}, {DNNL_ARG_SCALE, u->scale}, {DNNL_ARG_SHIFT, u->shift},        {DNNL_ARG_DIFF_SRC, u->g_diff_src[k]},
          {DNNL_ARG_DIFF_SCALE, u->g_dscale[k]}, {DNNL_ARG_DIFF_SHIFT, u->g_dshift[k]}};
      if (u->relu) args[DNNL_ARG_WORKSPACE] = u->g_ws[k];
      u->bn_bwd.execute(stream_, args);
    }
    float* dgamma = store_->grad(u->gamma_index);
    float* dbeta = store_->grad(u->beta_index);
    for (int c = 0; c < C; ++c) {
      float sg = 0, sb = 0;
      for (int k = 0; k < u->groups; ++k) {
        sg += u->dscale_buf[static_cast<size_t>(k) * C + c];
        sb += u->dshift_buf[static_cast<size_t>(k) * C + c];
      }
      dgamma[c] = sg;
      dbeta[c] = sb;
    }
  }
  if (on_ready) {
    on_ready(u->gamma_index);
    on_ready(u->beta_index);
  }
  where_ = u->name + " (conv backward weights)";
  {
    ScopedTimer t(&times_.conv_backward_weights);
    u->conv_bwd_weights.execute(
        stream_, {{DNNL_ARG_SRC, *u->in}, {DNNL_ARG_DIFF_DST, u->diff_conv_out}, {DNNL_ARG_DIFF_WEIGHTS, u->dw_prim}});
  }
  if (u->reorder_dw) {
    ScopedTimer t(&times_.weight_reorder);
    u->dw_to_user.execute(stream_, u->dw_prim, u->dw_user);
  }
  if (on_ready) on_ready(u->w_index);
  if (diff_in != nullptr) {
    where_ = u->name + " (conv backward data)";
    ScopedTimer t(&times_.conv_backward_data);
    u->conv_bwd_data.execute(
        stream_, {{DNNL_ARG_DIFF_DST, u->diff_conv_out}, {DNNL_ARG_WEIGHTS, u->w_bwd}, {DNNL_ARG_DIFF_SRC, *diff_in}});
  }
}

void Net::ForwardAll(const float* images) {
  input_.set_data_handle(const_cast<float*>(images));
  ForwardUnit(&stem_);
  if (spec_.stem_maxpool) {
    where_ = "maxpool";
    ScopedTimer t(&times_.max_pool);
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, stem_.out}, {DNNL_ARG_DST, pool_out_}};
    if (opt_.training) args[DNNL_ARG_WORKSPACE] = pool_ws_;
    pool_fwd_.execute(stream_, args);
  }
  for (auto& b : blocks_) {
    for (auto& u : b.units) ForwardUnit(&u);
    if (b.downsample) ForwardUnit(&*b.downsample);
    where_ = b.units.front().name + " (add+relu)";
    ScopedTimer t(&times_.add_relu_forward);
    b.add_relu.execute(stream_, {{DNNL_ARG_SRC_0, b.units.back().out},
                                 {DNNL_ARG_SRC_1, b.downsample ? b.downsample->out : *b.in},
                                 {DNNL_ARG_DST, b.out}});
  }
  where_ = "global_avg_pool";
  {
    ScopedTimer t(&times_.global_avg_pool);
    const float* f = static_cast<const float*>(features_->get_data_handle());
    const LayoutIndex li{act_tag_, feat_c_, feat_hw_};
    const int N = opt_.batch, C = feat_c_, HW = feat_hw_;
#pragma omp parallel for collapse(2)
    for (int n = 0; n < N; ++n) {
      for (int c = 0; c < C; ++c) {
        double s = 0;
        for (int hw = 0; hw < HW; ++hw) s += f[li(n, c, hw)];
        pooled_[static_cast<size_t>(n) * C + c] = static_cast<float>(s / HW);
      }
    }
  }
  where_ = "fc";
  ScopedTimer t(&times_.fc);
  fc_fwd_.execute(stream_,
                  {{DNNL_ARG_SRC, pooled_mem_}, {DNNL_ARG_WEIGHTS, fc_w_}, {DNNL_ARG_BIAS, fc_b_}, {DNNL_ARG_DST, logits_mem_}});
}

absl::StatusOr<double> Net::ForwardTrain(const float* images, const int32_t* labels, double normalizer, int group,
                                         int groups) {
  if (!opt_.training) return absl::FailedPreconditionError("ForwardTrain on an inference network");
  if (groups < 1 || group < 0 || group >= groups) {
    return absl::InvalidArgumentError(absl::StrCat("virtual worker ", group, " of ", groups));
  }
  vw_index_ = group;
  vw_count_ = groups;
  if (!(normalizer > 0)) return absl::InvalidArgumentError(absl::StrCat("loss normalizer ", normalizer, " must be > 0"));
  const int N = opt_.batch, K = spec_.num_classes;
  for (int n = 0; n < N; ++n) {
    if (labels[n] < 0 || labels[n] >= K) {
      return absl::InvalidArgumentError(absl::StrCat("label ", labels[n], " of sample ", n, " not in [0, ", K, ")"));
    }
  }
  auto st = Guard([&] { ForwardAll(images); stream_.wait(); }, "ForwardTrain");
  if (!st.ok()) return st;
  if (group == 0) store_->set_num_batches_tracked(store_->num_batches_tracked() + 1);
  ScopedTimer t(&times_.softmax_cross_entropy);
  // Softmax cross-entropy (float64 accumulation), dlogits = (softmax - onehot) / normalizer.
  double loss = 0;
  for (int n = 0; n < N; ++n) {
    const float* z = &logits_[static_cast<size_t>(n) * K];
    const double mx = *std::max_element(z, z + K);
    double sum = 0;
    for (int k = 0; k < K; ++k) sum += std::exp(z[k] - mx);
    const double log_sum = std::log(sum) + mx;
    loss += log_sum - z[labels[n]];
    for (int k = 0; k < K; ++k) {
      const double p = std::exp(z[k] - log_sum);
      d_logits_[static_cast<size_t>(n) * K + k] = static_cast<float>((p - (k == labels[n] ? 1.0 : 0.0)) / normalizer);
    }
  }
  forward_done_ = true;
  return loss / normalizer;
}

absl::Status Net::Backward(const GradReadyFn& on_ready) {
  if (!forward_done_) return absl::FailedPreconditionError("Backward without a ForwardTrain before it");
  forward_done_ = false;
  return Guard(
      [&] {
        using namespace dnnl;
        where_ = "fc";
        {
          ScopedTimer t(&times_.fc);
          fc_bwd_weights_.execute(stream_, {{DNNL_ARG_SRC, pooled_mem_},
                                            {DNNL_ARG_DIFF_DST, d_logits_mem_},
                                            {DNNL_ARG_DIFF_WEIGHTS, fc_dw_},
                                            {DNNL_ARG_DIFF_BIAS, fc_db_}});
          fc_bwd_data_.execute(stream_,
                               {{DNNL_ARG_DIFF_DST, d_logits_mem_}, {DNNL_ARG_WEIGHTS, fc_w_}, {DNNL_ARG_DIFF_SRC, d_pooled_mem_}});
        }
        if (on_ready) {
          on_ready(fc_w_index_);
          on_ready(fc_b_index_);
        }
        where_ = "global_avg_pool";
        {
          ScopedTimer t(&times_.global_avg_pool);
          float* d = static_cast<float*>(features_diff_->get_data_handle());
          const LayoutIndex li{act_tag_, feat_c_, feat_hw_};
          const int N = opt_.batch, C = feat_c_, HW = feat_hw_;
          const float inv = 1.0f / static_cast<float>(HW);
#pragma omp parallel for collapse(2)
          for (int n = 0; n < N; ++n) {
            for (int c = 0; c < C; ++c) {
              const float g = d_pooled_[static_cast<size_t>(n) * C + c] * inv;
              for (int hw = 0; hw < HW; ++hw) d[li(n, c, hw)] = g;
            }
          }
        }
        for (size_t bi = blocks_.size(); bi-- > 0;) {
          Block& b = blocks_[bi];
          where_ = b.units.front().name + " (add+relu backward)";
          {
            ScopedTimer t(&times_.add_relu_backward);
            b.relu_bwd.execute(stream_, {{DNNL_ARG_DIFF_DST, b.diff_out}, {DNNL_ARG_DST, b.out}, {DNNL_ARG_DIFF_SRC, b.d_sum}});
          }
          for (size_t i = b.units.size(); i-- > 0;) {
            memory* diff_in = i > 0 ? &b.units[i - 1].diff_out : b.diff_in;
            BackwardUnit(&b.units[i], b.units[i].diff_out, diff_in, on_ready);
          }
          // diff_in now holds the main path's input gradient; add the shortcut's.
          memory shortcut_grad = b.d_sum;
          if (b.downsample) {
            BackwardUnit(&*b.downsample, b.d_sum, &b.d_short, on_ready);
            shortcut_grad = b.d_short;
          }
          where_ = b.units.front().name + " (shortcut gradient)";
          ScopedTimer t(&times_.add_relu_backward);
          b.accumulate.execute(stream_,
                               {{DNNL_ARG_SRC_0, *b.diff_in}, {DNNL_ARG_SRC_1, shortcut_grad}, {DNNL_ARG_DST, *b.diff_in}});
        }
        if (spec_.stem_maxpool) {
          where_ = "maxpool";
          ScopedTimer t(&times_.max_pool);
          pool_bwd_.execute(stream_,
                            {{DNNL_ARG_DIFF_DST, pool_diff_out_}, {DNNL_ARG_DIFF_SRC, stem_.diff_out}, {DNNL_ARG_WORKSPACE, pool_ws_}});
        }
        BackwardUnit(&stem_, stem_.diff_out, nullptr, on_ready);
        stream_.wait();
        where_ = "";
      },
      "Backward");
}

absl::Status Net::Predict(const float* images, float* logits) {
  if (opt_.training) return absl::FailedPreconditionError("Predict on a training network (create one with training=false)");
  auto st = Guard([&] { ForwardAll(images); stream_.wait(); }, "Predict");
  if (!st.ok()) return st;
  std::copy(logits_.begin(), logits_.end(), logits);
  return absl::OkStatus();
}

}  // namespace

int SetNumThreads(int threads) {
  if (threads <= 0) threads = omp_get_num_procs();
  omp_set_num_threads(threads);
  return threads;
}

absl::StatusOr<std::unique_ptr<Network>> CreateResNet(const model::ResNetSpec& spec, model::ParamStore* store,
                                                      const NetworkOptions& o) {
  if (o.batch < 1) return absl::InvalidArgumentError(absl::StrCat("batch ", o.batch, " must be >= 1"));
  if (o.training && (o.bn_group < 1 || o.batch % o.bn_group != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bn_group ", o.bn_group, " must divide the batch ", o.batch));
  }
  auto net = std::make_unique<Net>(spec, store, o);
  if (auto st = net->Build(); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("building ", spec.name, " on oneDNN (batch ", o.batch, ", ",
                                                o.height, "x", o.width, "): ", st.message()));
  }
  return std::unique_ptr<Network>(std::move(net));
}

}  // namespace lmsgd::backend::onednn
