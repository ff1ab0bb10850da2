#include "tests/gpu/agreement.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "tests/unit/worker/test_params.h"
#include "worker/backend/cuda/device_step.h"
#include "worker/backend/cuda/kernels.h"
#include "worker/backend/reference/ops.h"
#include "worker/model/param_store.h"
#include "worker/backend/reference/reference_resnet.h"
#include "worker/optim/sgd.h"

namespace lmsgd::gpucheck {
namespace {

using backend::cuda::GpuResNet;
using backend::Precision;

using ::lmsgd::testing::TestParams;

// Sums of squares for ||a - b|| / ||b|| (b the reference), accumulated over any number of
// arrays; Rel() is 0 when both are zero.
struct ErrSums {
  double num = 0, den = 0;
  template <typename A, typename B>
  ErrSums& Add(const A* a, const B* b, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
      num += d * d;
      den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
    }
    return *this;
  }
  double Rel() const { return den == 0 ? (num == 0 ? 0.0 : INFINITY) : std::sqrt(num / den); }
};

template <typename A, typename B>
double RelErr(const A* a, const B* b, size_t n) {
  return ErrSums().Add(a, b, n).Rel();
}

}  // namespace

std::string AgreementCase::Name() const {
  auto spec = model::MakeResNet(arch, channels, classes);
  return absl::StrCat(spec.ok() ? spec->name : "?", " ", hw, "x", hw, " batch ", batch, " bn_group ", bn_group, " ",
                      backend::PrecisionName(precision));
}

Tolerance ToleranceFor(const AgreementCase& c, const Agreement* fp32) {
  Tolerance t;
  if (c.relu_flips) {
    t.grad_all = 5e-2;
    t.grad = 0;
  }
  if (c.precision == Precision::kFp32) return t;
  const double ratio = c.precision == Precision::kBf16 ? 65536.0 : 8192.0;  // unit roundoff over fp32's
  auto scaled = [&](double base, double fp32_error) {
    const double b = fp32 == nullptr ? base : std::max(base, 4 * ratio * fp32_error);
    return b >= 1 ? INFINITY : b;
  };
  t.loss = scaled(2e-2, fp32 ? fp32->loss_rel : 0);
  t.grad_all = scaled(5e-2, fp32 ? fp32->grad_rel_all : 0);
  t.grad = 0;
  t.other = 2e-2;
  return t;
}

bool Passes(const Agreement& a, const Tolerance& t) {
  auto ok = [](double v, double tol) { return std::isfinite(v) && v <= tol; };
  return ok(a.loss_rel, t.loss) && ok(a.grad_rel_all, t.grad_all) && (t.grad <= 0 || ok(a.grad_rel_max, t.grad)) &&
         ok(a.running_rel, t.other) && ok(a.logits_rel, t.other) && ok(a.step_rel, t.grad_all);
}

absl::StatusOr<Agreement> RunAgreement(const AgreementCase& c, int device) {
  ASSIGN_OR_RETURN(model::ResNetSpec spec, model::MakeResNet(c.arch, c.channels, c.classes));
  const auto init = TestParams(spec, 5);
  model::ParamStore store(spec);
  RETURN_IF_ERROR(store.Load(init));

  std::vector<float> images;
  std::vector<int32_t> labels;
  ::lmsgd::testing::TestBatch(c.batch, c.channels, c.hw, c.classes, &images, &labels);
  const double kn = 2.0 * c.batch;  // as if one of 2 workers

  backend::NetworkOptions o;
  o.batch = c.batch;
  o.height = o.width = c.hw;
  o.bn_group = c.bn_group;
  backend::cuda::GpuOptions g;
  g.device = device;
  g.precision = c.precision;
  ASSIGN_OR_RETURN(std::unique_ptr<GpuResNet> net, GpuResNet::Create(spec, &store, o, g));
  ASSIGN_OR_RETURN(double loss, net->ForwardTrain(images.data(), labels.data(), kn));
  RETURN_IF_ERROR(net->Backward(nullptr));

  backend::reference::ReferenceResNet ref(spec, init);
  backend::reference::Tensor x({c.batch, c.channels, c.hw, c.hw});
  for (size_t i = 0; i < images.size(); ++i) x.data[i] = images[i];
  const double ref_loss = ref.Forward(x, std::vector<int>(labels.begin(), labels.end()), c.bn_group, kn);
  const auto ref_grads = ref.Backward();

  Agreement a;
  a.loss_gpu = loss;
  a.loss_ref = ref_loss;
  a.loss_rel = std::abs(loss - ref_loss) / std::abs(ref_loss);
  ErrSums all;
  for (size_t i = 0; i < store.num_params(); ++i) {
    const auto& ps = store.param_specs()[i];
    const std::vector<double>& r = ref_grads.at(ps.name);
    const ErrSums tensor = ErrSums().Add(store.grad(i), r.data(), r.size());
    const double e = tensor.Rel();
    all.num += tensor.num;
    all.den += tensor.den;
    ++a.tensors;
    if (!(e <= a.grad_rel_max)) {
      a.grad_rel_max = e;
      a.grad_worst = ps.name;
    }
  }
  a.grad_rel_all = all.Rel();

  // Stem BN running statistics: 0.9 * initial + 0.1 * mean over groups (unbiased variance).
  backend::reference::Tensor w({spec.stem_conv.out_channels, c.channels, spec.stem_conv.kernel, spec.stem_conv.kernel});
  for (size_t i = 0; i < w.data.size(); ++i) w.data[i] = init.at("conv1.weight")[i];
  const auto conv1 = backend::reference::ConvForward(x, w, {spec.stem_conv.stride, spec.stem_conv.padding});
  std::vector<double> rm(init.at("bn1.running_mean").begin(), init.at("bn1.running_mean").end());
  std::vector<double> rv(init.at("bn1.running_var").begin(), init.at("bn1.running_var").end());
  backend::reference::UpdateRunningStats(conv1, c.bn_group, 0.9, &rm, &rv);
  a.running_rel = std::max(RelErr(store.BufferByName("bn1.running_mean"), rm.data(), rm.size()),
                           RelErr(store.BufferByName("bn1.running_var"), rv.data(), rv.size()));

  // Inference on the updated store.
  backend::NetworkOptions io = o;
  io.training = false;
  {
    ASSIGN_OR_RETURN(std::unique_ptr<GpuResNet> inf, GpuResNet::Create(spec, &store, io, g));
    std::vector<float> logits(static_cast<size_t>(c.batch) * c.classes);
    RETURN_IF_ERROR(inf->Predict(images.data(), logits.data()));
    backend::reference::ReferenceResNet ref_inf(spec, store.ToMap());
    const auto ref_logits = ref_inf.Predict(x);
    a.logits_rel = RelErr(logits.data(), ref_logits.data.data(), logits.size());
  }

  // One device-resident step from the initial parameters and zero velocity: the update must
  // be lr * (g + wd * w) (no decay on BN), g the reference gradient.
  {
    model::ParamStore s0(spec);
    RETURN_IF_ERROR(s0.Load(init));
    RETURN_IF_ERROR(net->UploadState(s0));
    backend::cuda::DeviceStepOptions to;
    to.sgd.momentum = 0.9;
    to.sgd.weight_decay = 1e-4;
    ASSIGN_OR_RETURN(auto trainer, backend::cuda::DeviceStep::Create(net.get(), nullptr, to));
    RETURN_IF_ERROR(net->StageBatch(images.data(), labels.data()));
    const double lr = 0.1;
    RETURN_IF_ERROR(trainer->Step(kn, lr, 1.0));
    ASSIGN_OR_RETURN(double step_loss, trainer->Finish());
    (void)step_loss;
    RETURN_IF_ERROR(net->DownloadState(&s0));
    std::vector<double> got, want;
    for (size_t i = 0; i < s0.num_params(); ++i) {
      const auto& ps = s0.param_specs()[i];
      const bool bn = ps.kind == optim::ParamKind::kBnGamma || ps.kind == optim::ParamKind::kBnBeta;
      const std::vector<float>& w0 = init.at(ps.name);
      const std::vector<double>& gr = ref_grads.at(ps.name);
      for (size_t j = 0; j < w0.size(); ++j) {
        got.push_back(static_cast<double>(w0[j]) - s0.param(i)[j]);
        want.push_back(lr * (gr[j] + (bn ? 0.0 : 1e-4) * w0[j]));
      }
    }
    a.step_rel = RelErr(got.data(), want.data(), got.size());
  }
  return a;
}

absl::StatusOr<double> SgdKernelAgreement(int device) {
  namespace k = ::lmsgd::backend::cuda;
  if (cudaSetDevice(device) != cudaSuccess) return absl::InternalError("cudaSetDevice failed");
  const int sizes[] = {1000, 70000, 5};  // the second spans two chunks
  const bool decays[] = {true, true, false};
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  double worst = 0;
  for (bool nesterov : {false, true}) {
    std::vector<std::vector<float>> w(3), gr(3);
    std::vector<optim::ParamRef> refs;
    std::vector<k::SgdChunk> chunks;
    int64_t off = 0;
    for (int t = 0; t < 3; ++t) {
      w[t].resize(sizes[t]);
      gr[t].resize(sizes[t]);
      for (auto& v : w[t]) v = nd(rng);
      optim::ParamRef r;
      r.name = absl::StrCat("t", t);
      r.value = w[t].data();
      r.grad = gr[t].data();
      r.size = sizes[t];
      r.kind = decays[t] ? optim::ParamKind::kWeight : optim::ParamKind::kBnGamma;
      refs.push_back(r);
      for (int64_t o = 0; o < sizes[t]; o += k::kSgdChunk) {
        chunks.push_back({off + o, static_cast<int32_t>(std::min<int64_t>(k::kSgdChunk, sizes[t] - o)),
                          decays[t] ? 1e-4f : 0.0f});
      }
      off += sizes[t];
    }
    optim::SgdConfig cfg;
    cfg.nesterov = nesterov;
    optim::Sgd sgd(cfg, refs);
    std::vector<float> flat_w, flat_g;
    for (auto& v : w) flat_w.insert(flat_w.end(), v.begin(), v.end());
    float *dw = nullptr, *dg = nullptr, *dv = nullptr;
    k::SgdChunk* dc = nullptr;
    const size_t n = flat_w.size();
    if (cudaMalloc(reinterpret_cast<void**>(&dw), n * 4) != cudaSuccess ||
        cudaMalloc(reinterpret_cast<void**>(&dg), n * 4) != cudaSuccess ||
        cudaMalloc(reinterpret_cast<void**>(&dv), n * 4) != cudaSuccess ||
        cudaMalloc(reinterpret_cast<void**>(&dc), chunks.size() * sizeof(k::SgdChunk)) != cudaSuccess) {
      return absl::ResourceExhaustedError("SGD check: cudaMalloc failed");
    }
    cudaMemcpy(dw, flat_w.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemset(dv, 0, n * 4);
    cudaMemcpy(dc, chunks.data(), chunks.size() * sizeof(k::SgdChunk), cudaMemcpyHostToDevice);
    const double lrs[] = {0.1, 0.4, 0.4, 0.04};
    double prev = lrs[0];
    absl::Status st;
    for (double lr : lrs) {
      for (auto& v : gr) {
        for (auto& x : v) x = nd(rng);
      }
      flat_g.clear();
      for (auto& v : gr) flat_g.insert(flat_g.end(), v.begin(), v.end());
      cudaMemcpy(dg, flat_g.data(), n * 4, cudaMemcpyHostToDevice);
      const double corr = lr / prev;
      prev = lr;
      st = sgd.Step(lr, corr);
      if (!st.ok()) break;
      st = k::SgdUpdate(dc, static_cast<int>(chunks.size()), dw, dg, dv, static_cast<float>(lr), 0.9f,
                        static_cast<float>(corr), nesterov, nullptr);
      if (!st.ok()) break;
    }
    std::vector<float> out(n);
    const cudaError_t err = cudaMemcpy(out.data(), dw, n * 4, cudaMemcpyDeviceToHost);
    cudaFree(dw);
    cudaFree(dg);
    cudaFree(dv);
    cudaFree(dc);
    RETURN_IF_ERROR(st);
    if (err != cudaSuccess) return absl::InternalError(absl::StrCat("SGD check: ", cudaGetErrorString(err)));
    std::vector<float> want;
    for (auto& v : w) want.insert(want.end(), v.begin(), v.end());
    worst = std::max(worst, RelErr(out.data(), want.data(), n));
  }
  return worst;
}

}  // namespace lmsgd::gpucheck
