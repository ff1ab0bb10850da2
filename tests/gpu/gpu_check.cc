// lmsgd-gpu-check: the device check, one binary with no gRPC, UCX or oneDNN (it runs on
// a bare GPU machine; deploy/gpu_check.sh drives it and adds PyTorch's numbers).
//
//   lmsgd-gpu-check [--mode=all|agree|speed] [--batches=64,128,256] [--precisions=fp32,tf32,bf16]
//                   [--warmup=8] [--iters=20] [--bn_group=0 (= batch)] [--search=find|heuristic]
//                   [--json=FILE] [--device=0]
//
// agree: small ResNets (basic blocks; 7x7 stem + max pool; bottlenecks) on the GPU vs the
//        float64 reference ops on the CPU, same weights and batch: relative error of the loss,
//        the worst parameter gradient, stem running statistics, inference logits and one full
//        device step (tests/gpu/agreement.h), for fp32 and bf16, with the tolerances.
// speed: ResNet-50 224x224 training steps (forward, backward, fused SGD; synthetic batch staged
//        once, like the PyTorch baseline) at each batch and precision: median step time over
//        `iters` steps after `warmup`, from CUDA events; img/s = batch / median; then 3 profiled
//        steps give the per-op milliseconds (OpTimes) of a step.
// Exit status: 0 when every agreement row passes and every speed row ran, 1 otherwise.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "tests/gpu/agreement.h"
#include "worker/backend/cuda/cuda_check.h"
#include "worker/backend/cuda/device.h"
#include "worker/backend/cuda/device_step.h"
#include "worker/backend/cuda/resnet.h"

namespace lmsgd::gpucheck {
namespace {

using backend::Precision;

struct Flags {
  std::string mode = "all";
  std::vector<int> batches = {64, 128, 256};
  std::vector<Precision> precisions = {Precision::kFp32, Precision::kTf32, Precision::kBf16};
  int warmup = 8, iters = 20, bn_group = 0, device = 0;
  backend::cuda::ConvSearch search = backend::cuda::ConvSearch::kFind;
  std::string json;
};

absl::StatusOr<Flags> ParseFlags(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("argument '", a, "': expected --name=value"));
    }
    const std::string name = a.substr(2, eq - 2), value = a.substr(eq + 1);
    auto to_int = [&](int* out) -> absl::Status {
      if (!absl::SimpleAtoi(value, out)) return absl::InvalidArgumentError(absl::StrCat("--", name, "=", value));
      return absl::OkStatus();
    };
    if (name == "mode") {
      f.mode = value;
      if (value != "all" && value != "agree" && value != "speed") {
        return absl::InvalidArgumentError(absl::StrCat("--mode=", value, ": expected all, agree or speed"));
      }
    } else if (name == "batches") {
      f.batches.clear();
      for (absl::string_view s : absl::StrSplit(value, ',')) {
        int b = 0;
        if (!absl::SimpleAtoi(s, &b) || b < 1) return absl::InvalidArgumentError(absl::StrCat("--batches=", value));
        f.batches.push_back(b);
      }
    } else if (name == "precisions") {
      f.precisions.clear();
      for (absl::string_view s : absl::StrSplit(value, ',')) {
        ASSIGN_OR_RETURN(Precision p, backend::ParsePrecision(s));
        f.precisions.push_back(p);
      }
    } else if (name == "warmup") {
      RETURN_IF_ERROR(to_int(&f.warmup));
    } else if (name == "iters") {
      RETURN_IF_ERROR(to_int(&f.iters));
    } else if (name == "bn_group") {
      RETURN_IF_ERROR(to_int(&f.bn_group));
    } else if (name == "device") {
      RETURN_IF_ERROR(to_int(&f.device));
    } else if (name == "search") {
      if (value == "find") {
        f.search = backend::cuda::ConvSearch::kFind;
      } else if (value == "heuristic") {
        f.search = backend::cuda::ConvSearch::kHeuristic;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--search=", value, ": expected find or heuristic"));
      }
    } else if (name == "json") {
      f.json = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
  }
  if (f.iters < 1 || f.warmup < 0) return absl::InvalidArgumentError("--iters must be >= 1 and --warmup >= 0");
  return f;
}

bool RunAgreementTable(const Flags& f, std::ofstream* json) {
  using model::Arch;
  std::vector<AgreementCase> cases;
  for (Precision p : {Precision::kFp32, Precision::kBf16}) {
    // tests/gpu/agreement.h: why these batches, and why ResNet-50 is gated as a whole.
    cases.push_back({Arch::kResNet8, 3, 10, 16, 16, 8, p});
    cases.push_back({Arch::kResNet18, 3, 7, 32, 8, 4, p});
    cases.push_back({Arch::kResNet50, 3, 10, 32, 8, 8, p, /*relu_flips=*/true});
  }
  bool all_ok = true;
  std::printf("\n== agreement: GPU vs float64 reference (CPU), same weights and batch ==\n");
  std::printf("%-42s %10s %9s %10s %24s %9s %9s %9s  %s\n", "case", "loss_rel", "grad_all", "grad_max",
              "(worst tensor)", "runstat", "logits", "step", "verdict");
  std::map<std::string, Agreement> fp32_rows;  // by case name without the precision
  for (const AgreementCase& c : cases) {
    auto a = RunAgreement(c, f.device);
    if (!a.ok()) {
      std::printf("%-42s ERROR %s\n", c.Name().c_str(), a.status().ToString().c_str());
      all_ok = false;
      continue;
    }
    AgreementCase as_fp32 = c;
    as_fp32.precision = Precision::kFp32;
    if (c.precision == Precision::kFp32) fp32_rows[as_fp32.Name()] = *a;
    auto fp32 = fp32_rows.find(as_fp32.Name());
    const Tolerance t = ToleranceFor(c, fp32 == fp32_rows.end() ? nullptr : &fp32->second);
    const bool ok = Passes(*a, t);
    all_ok = all_ok && ok;
    auto bound = [](const char* what, double b) {
      return std::isinf(b) ? absl::StrCat(what, " not gated") : absl::StrFormat("%s<=%.0e", what, b);
    };
    std::printf("%-42s %10.2e %9.2e %10.2e %24s %9.2e %9.2e %9.2e  %s (%s %s %s)\n", c.Name().c_str(), a->loss_rel,
                a->grad_rel_all, a->grad_rel_max, a->grad_worst.c_str(), a->running_rel, a->logits_rel, a->step_rel,
                ok ? "PASS" : "FAIL", bound("loss", t.loss).c_str(), bound("grad_all", t.grad_all).c_str(),
                t.grad > 0 ? bound("grad_max", t.grad).c_str() : "grad_max not gated");
    if (json) {
      *json << absl::StrFormat(
          "{\"kind\": \"agreement\", \"case\": \"%s\", \"loss_gpu\": %.9g, \"loss_ref\": %.9g, \"loss_rel\": %.3e, "
          "\"grad_rel_all\": %.3e, \"grad_rel_max\": %.3e, \"grad_worst\": \"%s\", \"running_rel\": %.3e, "
          "\"logits_rel\": %.3e, \"step_rel\": %.3e, \"pass\": %s}\n",
          c.Name(), a->loss_gpu, a->loss_ref, a->loss_rel, a->grad_rel_all, a->grad_rel_max, a->grad_worst, a->running_rel,
          a->logits_rel, a->step_rel, ok ? "true" : "false");
    }
  }
  auto sgd = SgdKernelAgreement(f.device);
  const bool sgd_ok = sgd.ok() && *sgd <= 1e-6;
  all_ok = all_ok && sgd_ok;
  std::printf("%-42s %s\n", "fused SGD kernel vs optim::Sgd (4 steps)",
              sgd.ok() ? absl::StrFormat("weights rel %.2e  %s (<= 1e-6)", *sgd, sgd_ok ? "PASS" : "FAIL").c_str()
                       : sgd.status().ToString().c_str());
  return all_ok;
}

struct SpeedRow {
  Precision precision;
  int batch;
  double img_s = 0, step_ms = 0;
  std::string error;
  std::string ops;  // per-op milliseconds per step from a short profiled run
};

SpeedRow TimeResNet50(const Flags& f, Precision p, int batch, std::string* describe) {
  SpeedRow row{p, batch, 0, 0, "", ""};
  auto run = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(model::ResNetSpec spec, model::MakeResNet(model::Arch::kResNet50, 3, 1000));
    model::ParamStore store(spec);
    RETURN_IF_ERROR(store.Load(model::InitializeParameters(spec, {1, true})));
    backend::NetworkOptions o;
    o.batch = batch;
    o.height = o.width = 224;
    o.bn_group = f.bn_group > 0 ? f.bn_group : batch;
    backend::cuda::GpuOptions g;
    g.device = f.device;
    g.precision = p;
    g.search = f.search;
    ASSIGN_OR_RETURN(auto net, backend::cuda::GpuResNet::Create(spec, &store, o, g));
    RETURN_IF_ERROR(net->UploadState(store));
    backend::cuda::DeviceStepOptions to;
    ASSIGN_OR_RETURN(auto trainer, backend::cuda::DeviceStep::Create(net.get(), nullptr, to));
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> images(static_cast<size_t>(batch) * 3 * 224 * 224);
    for (auto& v : images) v = nd(rng);
    std::vector<int32_t> labels(batch);
    for (auto& l : labels) l = static_cast<int32_t>(rng() % 1000);
    RETURN_IF_ERROR(net->StageBatch(images.data(), labels.data()));
    for (int i = 0; i < f.warmup; ++i) RETURN_IF_ERROR(trainer->Step(batch, 0.1, 1.0));
    ASSIGN_OR_RETURN(double warm_loss, trainer->Finish());
    (void)warm_loss;
    // Step boundaries as CUDA events (created here, destroyed on every way out).
    std::vector<cudaEvent_t> ev(f.iters + 1, nullptr);
    struct Destroy {
      std::vector<cudaEvent_t>* ev;
      ~Destroy() {
        for (cudaEvent_t e : *ev) {
          if (e != nullptr) cudaEventDestroy(e);
        }
      }
    } destroy{&ev};
    for (auto& e : ev) CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(ev[0], net->stream()));
    for (int i = 0; i < f.iters; ++i) {
      RETURN_IF_ERROR(trainer->Step(batch, 0.1, 1.0));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(ev[i + 1], net->stream()));
    }
    ASSIGN_OR_RETURN(double loss, trainer->Finish());
    std::vector<float> ms(f.iters);
    for (int i = 0; i < f.iters; ++i) CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]));
    if (!std::isfinite(loss)) return absl::InternalError(absl::StrCat("loss is ", loss, " after the timed steps"));
    std::sort(ms.begin(), ms.end());
    row.step_ms = ms[ms.size() / 2];
    row.img_s = batch / (row.step_ms / 1000.0);
    // Where a step's time goes: 3 more steps with per-op CUDA events (not part of the timing).
    net->ResetTimes();
    net->SetProfiling(true);
    for (int i = 0; i < 3; ++i) RETURN_IF_ERROR(trainer->Step(batch, 0.1, 1.0));
    ASSIGN_OR_RETURN(double prof_loss, trainer->Finish());
    (void)prof_loss;
    net->SetProfiling(false);
    const backend::OpTimes& t = net->times();
    auto f = [](double s) { return s * 1000.0 / 3; };
    row.ops = absl::StrFormat(
        "conv_fwd %.2f conv_bwd_data %.2f conv_bwd_weights %.2f bn_fwd %.2f bn_bwd %.2f add_relu_bwd %.2f "
        "max_pool %.2f avg_pool %.2f fc %.2f softmax %.2f casts %.2f (ops %.2f ms of a %.2f ms step)",
        f(t.conv_forward), f(t.conv_backward_data), f(t.conv_backward_weights), f(t.batch_norm_forward),
        f(t.batch_norm_backward), f(t.add_relu_backward), f(t.max_pool), f(t.global_avg_pool), f(t.fc),
        f(t.softmax_cross_entropy), f(t.weight_reorder), f(t.Total()), row.step_ms);
    if (describe->empty()) *describe = net->Describe();
    return absl::OkStatus();
  };
  absl::Status st = run();
  if (!st.ok()) row.error = st.ToString();
  return row;
}

bool RunSpeedTable(const Flags& f, std::ofstream* json) {
  std::printf("\n== ResNet-50 224x224 training step (forward + backward + SGD), one GPU ==\n");
  std::printf("%-6s %6s %12s %10s\n", "prec", "batch", "img/s", "step_ms");
  bool ok = true;
  std::string describe;
  for (Precision p : f.precisions) {
    for (int b : f.batches) {
      const SpeedRow r = TimeResNet50(f, p, b, &describe);
      if (!r.error.empty()) {
        ok = false;
        std::printf("%-6s %6d ERROR %s\n", backend::PrecisionName(p), b, r.error.c_str());
        if (json) {
          *json << absl::StrFormat("{\"kind\": \"speed\", \"impl\": \"lmsgd\", \"precision\": \"%s\", \"batch\": %d, "
                                   "\"error\": \"%s\"}\n",
                                   backend::PrecisionName(p), b, absl::StrReplaceAll(r.error, {{"\"", "'"}}));
        }
        continue;
      }
      std::printf("%-6s %6d %12.1f %10.2f   per op (ms/step): %s\n", backend::PrecisionName(p), b, r.img_s,
                  r.step_ms, r.ops.c_str());
      std::fflush(stdout);
      if (json) {
        *json << absl::StrFormat("{\"kind\": \"speed\", \"impl\": \"lmsgd\", \"precision\": \"%s\", \"batch\": %d, "
                                 "\"img_s\": %.1f, \"step_ms\": %.3f, \"ops_ms\": \"%s\"}\n",
                                 backend::PrecisionName(p), b, r.img_s, r.step_ms, r.ops);
        json->flush();
      }
    }
  }
  if (!describe.empty()) std::printf("backend: %s\n", describe.c_str());
  return ok;
}

int Main(int argc, char** argv) {
  auto flags = ParseFlags(argc, argv);
  if (!flags.ok()) {
    std::fprintf(stderr, "lmsgd-gpu-check: %s\n", flags.status().ToString().c_str());
    return 2;
  }
  auto info = backend::cuda::GetDeviceInfo(flags->device);
  if (!info.ok()) {
    std::fprintf(stderr, "lmsgd-gpu-check: %s\n", info.status().ToString().c_str());
    return 2;
  }
  std::printf("device: cuda:%d %s (sm_%d%d, %d SMs, %.1f GiB)\n", info->index, info->name.c_str(),
              info->compute_capability_major, info->compute_capability_minor, info->multiprocessors,
              info->total_memory_bytes / 1073741824.0);
  std::ofstream json_file;
  std::ofstream* json = nullptr;
  if (!flags->json.empty()) {
    json_file.open(flags->json, std::ios::app);
    if (!json_file) {
      std::fprintf(stderr, "lmsgd-gpu-check: cannot open --json=%s\n", flags->json.c_str());
      return 2;
    }
    json = &json_file;
  }
  bool ok = true;
  if (flags->mode != "speed") ok = RunAgreementTable(*flags, json) && ok;
  if (flags->mode != "agree") ok = RunSpeedTable(*flags, json) && ok;
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace lmsgd::gpucheck

int main(int argc, char** argv) { return lmsgd::gpucheck::Main(argc, argv); }
