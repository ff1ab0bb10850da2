// lmsgd-bench: throughput benchmarks that print a ratio against a baseline measured in the same run.
//
//   lmsgd-bench train --model=resnet50 --batch=32 --device=cpu --compare=pytorch
//
// Times lmsgd's full training step (forward, backward, SGD with momentum correction) on a fixed
// synthetic batch: `--warmup` untimed steps, then the median of `--iterations` timed steps;
// prints the per-op breakdown, then runs the PyTorch baseline (torchvision model, same batch, same
// thread count; Debian's /usr/bin/python3 with python3-torch) and prints, last:
//   lmsgd_img_s=<x> pytorch_img_s=<y> ratio=<x/y>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/ascii.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/trainer.h"

ABSL_FLAG(std::string, model, "resnet50", "resnet50 | resnet18 | resnet34 | resnet20");
ABSL_FLAG(int32_t, batch, 32, "Per-step batch");
ABSL_FLAG(int32_t, image_size, 224, "Input height and width");
ABSL_FLAG(std::string, device, "cpu", "cpu (cuda: see the GPU check script)");
ABSL_FLAG(std::string, compare, "", "pytorch: also run the PyTorch baseline and print the ratio");
ABSL_FLAG(int32_t, threads, 0, "Compute threads for both (0 = all cores)");
ABSL_FLAG(int32_t, warmup, 2, "Untimed steps");
ABSL_FLAG(int32_t, iterations, 5, "Timed steps (median reported)");
ABSL_FLAG(std::string, python, "/usr/bin/python3", "Python with torch + torchvision (Debian's)");

namespace {

std::string BaselineScript(const char* argv0) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path self = fs::canonical("/proc/self/exe", ec);
  for (const fs::path& p : {self.parent_path() / "pytorch_resnet_train.py",
                            self.parent_path() / "../share/lmsgd/pytorch_resnet_train.py",
                            fs::path(LMSGD_SOURCE_DIR) / "tests/bench/pytorch_resnet_train.py"}) {
    if (fs::exists(p, ec)) return p.string();
  }
  (void)argv0;
  return "";
}

int Train(const char* argv0) {
  using lmsgd::model::Arch;
  const std::string m = absl::GetFlag(FLAGS_model);
  Arch arch;
  if (m == "resnet50") arch = Arch::kResNet50;
  else if (m == "resnet18") arch = Arch::kResNet18;
  else if (m == "resnet34") arch = Arch::kResNet34;
  else if (m == "resnet20") arch = Arch::kResNet20;
  else {
    std::cerr << "lmsgd-bench: unknown --model=" << m << "\n";
    return 2;
  }
  if (absl::GetFlag(FLAGS_device) != "cpu") {
    std::cerr << "lmsgd-bench: --device=" << absl::GetFlag(FLAGS_device)
              << " is not supported here (cpu only; the GPU numbers come from deploy/gpu_check.sh)\n";
    return 2;
  }
  const int threads = lmsgd::backend::onednn::SetNumThreads(absl::GetFlag(FLAGS_threads));
  const int batch = absl::GetFlag(FLAGS_batch), size = absl::GetFlag(FLAGS_image_size);
  lmsgd::train::TrainerConfig c;
  c.arch = arch;
  c.in_channels = 3;
  c.num_classes = arch == Arch::kResNet20 ? 10 : 1000;
  c.height = c.width = size;
  c.per_worker_batch = batch;
  c.bn_group = batch;
  c.schedule.global_batch = batch;
  c.schedule.reference_batch = 256;
  auto trainer = lmsgd::train::Trainer::Create(c);
  if (!trainer.ok()) {
    std::cerr << "lmsgd-bench: " << trainer.status() << "\n";
    return 1;
  }
  std::vector<float> images(static_cast<size_t>(batch) * 3 * size * size);
  std::vector<int32_t> labels(batch);
  uint64_t s = 88172645463325252ull;
  for (auto& v : images) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    v = static_cast<float>(static_cast<int64_t>(s % 2000001) - 1000000) / 1e6f;
  }
  for (int i = 0; i < batch; ++i) labels[i] = (i * 37) % c.num_classes;
  std::cout << absl::StrFormat("lmsgd %s batch %d %dx%d: %s\n", m, batch, size, size, (*trainer)->Describe());
  lmsgd::train::LocalReducer reducer;
  std::vector<double> times;
  lmsgd::train::StepStats sum;
  const int warmup = absl::GetFlag(FLAGS_warmup), iters = absl::GetFlag(FLAGS_iterations);
  for (int i = 0; i < warmup + iters; ++i) {
    if (i == warmup) (*trainer)->network().ResetTimes();
    const auto t0 = std::chrono::steady_clock::now();
    auto st = (*trainer)->Step(static_cast<uint64_t>(i), images.data(), labels.data(), &reducer);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) {
      std::cerr << "lmsgd-bench: " << st.status() << "\n";
      return 1;
    }
    if (i >= warmup) {
      times.push_back(dt);
      sum.optimizer_s += st->optimizer_s;
    }
    std::cout << absl::StrFormat("lmsgd iter %d %s%.3f s loss %.4f\n", i, i < warmup ? "warmup " : "", dt, st->loss);
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  const double lmsgd_img_s = batch / median;
  const auto& t = (*trainer)->network().times();
  const double n = iters;
  std::cout << "per-op time per step (ms, mean over timed steps):\n";
  auto row = [&](const char* name, double v) {
    std::cout << absl::StrFormat("  %-26s %9.1f  %5.1f%%\n", name, 1e3 * v / n, 100 * v / (median * n));
  };
  row("conv_forward", t.conv_forward);
  row("conv_backward_data", t.conv_backward_data);
  row("conv_backward_weights", t.conv_backward_weights);
  row("batch_norm_forward", t.batch_norm_forward);
  row("batch_norm_backward", t.batch_norm_backward);
  row("add_relu_forward", t.add_relu_forward);
  row("add_relu_backward", t.add_relu_backward);
  row("max_pool", t.max_pool);
  row("global_avg_pool", t.global_avg_pool);
  row("fc", t.fc);
  row("softmax_cross_entropy", t.softmax_cross_entropy);
  row("weight_reorder", t.weight_reorder);
  row("sgd_update", sum.optimizer_s);
  std::cout << absl::StrFormat("lmsgd median step %.3f s = %.2f img/s\n", median, lmsgd_img_s);
  if (absl::GetFlag(FLAGS_compare).empty()) {
    std::cout << absl::StrFormat("lmsgd_img_s=%.3f\n", lmsgd_img_s);
    return 0;
  }
  if (absl::GetFlag(FLAGS_compare) != "pytorch") {
    std::cerr << "lmsgd-bench: unknown --compare=" << absl::GetFlag(FLAGS_compare) << "\n";
    return 2;
  }
  trainer->reset();  // free lmsgd's memory before the baseline runs
  const std::string script = BaselineScript(argv0);
  if (script.empty()) {
    std::cerr << "lmsgd-bench: pytorch_resnet_train.py not found next to the binary or in the source tree\n";
    return 1;
  }
  const std::string cmd = absl::StrFormat("%s %s --model=%s --batch=%d --image_size=%d --threads=%d --warmup=%d "
                                          "--iterations=%d 2>&1",
                                          absl::GetFlag(FLAGS_python), script, m, batch, size, threads, warmup, iters);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) {
    std::cerr << "lmsgd-bench: could not run: " << cmd << "\n";
    return 1;
  }
  double torch_img_s = 0;
  char line[4096];
  while (fgets(line, sizeof(line), pipe) != nullptr) {
    std::string l(line);
    std::cout << l;
    if (absl::StartsWith(l, "pytorch_img_s=")) {
      (void)absl::SimpleAtod(absl::StripAsciiWhitespace(l.substr(14)), &torch_img_s);
    }
  }
  const int rc = pclose(pipe);
  if (rc != 0 || torch_img_s <= 0) {
    std::cerr << "lmsgd-bench: the PyTorch baseline failed (exit " << rc << "): install it with "
              << "deploy/setup.sh --with-baselines (Debian python3-torch, python3-torchvision)\n";
    return 1;
  }
  std::cout << absl::StrFormat("lmsgd_img_s=%.3f pytorch_img_s=%.3f ratio=%.3f\n", lmsgd_img_s, torch_img_s,
                               lmsgd_img_s / torch_img_s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lmsgd-bench train --model=resnet50 --batch=32 --device=cpu --compare=pytorch");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2 || std::string(args[1]) != "train") {
    std::cerr << "usage: lmsgd-bench train [--model=resnet50] [--batch=32] [--device=cpu] [--compare=pytorch]\n";
    return 2;
  }
  return Train(argv[0]);
}
