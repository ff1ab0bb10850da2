#include "worker/backend/onednn/net.h"
#include "common/status_macros.h"

namespace lmsgd::backend::onednn::detail {

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
  // The convolutions read weights in the activations' type (a bf16 copy made from the fp32
  // master each step); their weight gradients stay fp32 (oneDNN accumulates bf16 products in
  // fp32).
  const memory::desc w_any(w_dims, act_dt_, Tag::any);
  const memory::desc dw_any(w_dims, Dt::f32, Tag::any);
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
        convolution_backward_weights::desc(algorithm::convolution_direct, in_md, dw_any, out_md, strides, pad, pad),
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
    RETURN_IF_ERROR(BuildConvBn(&u, cur, ActDesc(opt_.batch, ch, hh, ww), hh, ww));
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
    RETURN_IF_ERROR(BuildConvBn(&*b->downsample, in, ActDesc(opt_.batch, c, h, w), h, w));
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
        act_dt_ = opt_.precision == Precision::kBf16 ? Dt::bf16 : Dt::f32;
        act_tag_ = PreferredActivationTag(eng_, act_dt_);
        const int N = opt_.batch;
        const memory::desc images_md({N, spec_.in_channels, opt_.height, opt_.width}, Dt::f32, Tag::nchw);
        input_ = memory(images_md, eng_, static_cast<void*>(nullptr));
        memory::desc in_md = images_md;
        memory* stem_in = &input_;
        if (bf16()) {
          in_md = memory::desc(images_md.dims(), Dt::bf16, Tag::nchw);
          input_lp_ = NewMem(in_md);
          input_to_lp_ = reorder(input_, input_lp_);
          stem_in = &input_lp_;
        }
        stem_.conv = spec_.stem_conv;
        stem_.bn = spec_.stem_bn;
        stem_.relu = true;
        stem_.needs_diff_src = false;
        auto st = BuildConvBn(&stem_, stem_in, in_md, opt_.height, opt_.width);
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

}  // namespace lmsgd::backend::onednn::detail
