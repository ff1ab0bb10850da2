#include "worker/backend/onednn/net.h"

namespace lmsgd::backend::onednn::detail {

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
  if (bf16()) {
    ScopedTimer t(&times_.conv_forward);
    input_to_lp_.execute(stream_, input_, input_lp_);
  }
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
    const void* f = features_->get_data_handle();
    const LayoutIndex li{act_tag_, feat_c_, feat_hw_};
    const int N = opt_.batch, C = feat_c_, HW = feat_hw_;
    const bool lp = bf16();
#pragma omp parallel for collapse(2)
    for (int n = 0; n < N; ++n) {
      for (int c = 0; c < C; ++c) {
        double s = 0;
        for (int hw = 0; hw < HW; ++hw) {
          const int64_t i = li(n, c, hw);
          s += lp ? Bf16ToFloat(static_cast<const uint16_t*>(f)[i]) : static_cast<const float*>(f)[i];
        }
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
          void* d = features_diff_->get_data_handle();
          const LayoutIndex li{act_tag_, feat_c_, feat_hw_};
          const int N = opt_.batch, C = feat_c_, HW = feat_hw_;
          const float inv = 1.0f / static_cast<float>(HW);
          const bool lp = bf16();
#pragma omp parallel for collapse(2)
          for (int n = 0; n < N; ++n) {
            for (int c = 0; c < C; ++c) {
              const float g = d_pooled_[static_cast<size_t>(n) * C + c] * inv;
              if (lp) {
                const uint16_t h = FloatToBf16(g);
                for (int hw = 0; hw < HW; ++hw) static_cast<uint16_t*>(d)[li(n, c, hw)] = h;
              } else {
                for (int hw = 0; hw < HW; ++hw) static_cast<float*>(d)[li(n, c, hw)] = g;
              }
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

}  // namespace lmsgd::backend::onednn::detail
