#include "worker/backend/cuda/resnet_impl.h"

namespace lmsgd::backend::cuda {

using detail::AlgoChoice;
using detail::Block;
using detail::Unit;

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

absl::Status GpuResNet::Impl::CheckLabels(const int32_t* labels) const {
  const int N = opt.batch, K = spec.num_classes;
  for (int n = 0; n < N; ++n) {
    if (labels[n] < 0 || labels[n] >= K) {
      return absl::InvalidArgumentError(absl::StrCat("label ", labels[n], " of sample ", n, " not in [0, ", K, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status GpuResNet::Impl::Stage(const float* images, const int32_t* labels) {
  const int N = opt.batch;
  if (labels) RETURN_IF_ERROR(CheckLabels(labels));
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

// 8-bit pixels through the float staging buffers (a quarter of their size), then mapped and
// laid out on the device.
absl::Status GpuResNet::Impl::StagePixels(const uint8_t* pixels, const int32_t* labels, const k::PixelAffine& affine) {
  const int N = opt.batch;
  RETURN_IF_ERROR(CheckLabels(labels));
  if (spec.in_channels > 4) {
    return absl::InvalidArgumentError(absl::StrCat("8-bit staging takes up to 4 channels, not ", spec.in_channels));
  }
  if (staged_once) RETURN_IF_ERROR(WaitForEvent(staged, gpu.sync_timeout, "the previous batch's host-to-device copy"));
  const size_t pixel_count = static_cast<size_t>(N) * opt.height * opt.width;
  const size_t bytes = pixel_count * spec.in_channels;
  std::memcpy(h_images, pixels, bytes);
  std::memcpy(h_labels, labels, sizeof(int32_t) * N);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_images, h_images, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d_labels, h_labels, sizeof(int32_t) * N, cudaMemcpyHostToDevice, stream));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(staged, stream));
  staged_once = true;
  return k::PixelsToNhwc(dtype, pixel_count, spec.in_channels, input_c, affine,
                         reinterpret_cast<const uint8_t*>(d_images), d_input, stream);
}

absl::Status GpuResNet::Impl::Sync(absl::string_view what) {
  CUDA_RETURN_IF_ERROR(cudaEventRecord(done, stream));
  RETURN_IF_ERROR(WaitForEvent(done, gpu.sync_timeout, what));
  profiler.Collect();
  return absl::OkStatus();
}

}  // namespace lmsgd::backend::cuda
