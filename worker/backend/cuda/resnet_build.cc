#include "worker/backend/cuda/resnet_impl.h"

namespace lmsgd::backend::cuda {

using detail::AlgoChoice;
using detail::Block;
using detail::Unit;

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

}  // namespace lmsgd::backend::cuda
