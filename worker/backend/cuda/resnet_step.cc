#include "worker/backend/cuda/resnet_impl.h"

namespace lmsgd::backend::cuda {

using detail::AlgoChoice;
using detail::Block;
using detail::Unit;

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

}  // namespace lmsgd::backend::cuda
