// lmsgd-bench: throughput benchmarks that print a ratio against a baseline measured in the same run.
//
//   lmsgd-bench train --model=resnet50 --batch=32 --device=cpu --compare=pytorch [--precisions=fp32,bf16]
//
// Times lmsgd's full training step (forward, backward, SGD with momentum correction) on a fixed
// synthetic batch in each precision: steps until the last `--iterations` all lie within 10% of
// their median (at most --max_steps), whose median is reported, with every step's loss
// and the per-op breakdown; then the PyTorch baseline at its best (torchvision model,
// channels_last, autocast(bfloat16) for bf16, the same batch, threads, constant lr and warm-up
// rule; Debian's /usr/bin/python3 with python3-torch), and prints, last:
//   lmsgd_img_s=<fp32> pytorch_img_s=<fp32> ratio=<..> lmsgd_bf16_img_s=<x> pytorch_bf16_img_s=<y> bf16_ratio=<x/y>
#include <stdlib.h>
#include <cstdlib>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <iostream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/bench/allreduce_bench.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/backend/precision.h"
#include "worker/train/trainer_factory.h"

ABSL_FLAG(std::string, model, "resnet50", "resnet50 | resnet18 | resnet34 | resnet20");
ABSL_FLAG(int32_t, batch, 32, "Per-step batch");
ABSL_FLAG(int32_t, image_size, 224, "Input height and width");
ABSL_FLAG(std::string, device, "cpu", "cpu (cuda: see the GPU check script)");
ABSL_FLAG(std::string, compare, "", "pytorch: also run the PyTorch baseline and print the ratio");
ABSL_FLAG(int32_t, threads, 0, "Compute threads for both (0 = all cores)");
ABSL_FLAG(int32_t, max_steps, 30,
          "train: steps at most per run; the timed window is the last --iterations steps once they all lie within 10% "
          "of their median");
ABSL_FLAG(std::string, precisions, "fp32,bf16", "train: the precisions to time (fp32, bf16), each against PyTorch's");
ABSL_FLAG(int32_t, iterations, 5, "Timed steps (median reported)");
ABSL_FLAG(std::string, python, "/usr/bin/python3", "Python with torch + torchvision (Debian's)");
ABSL_FLAG(int32_t, ranks, 2, "allreduce: number of processes K");
ABSL_FLAG(uint64_t, min_bytes, 4096, "allreduce: smallest message");
ABSL_FLAG(uint64_t, max_bytes, 256ull << 20, "allreduce: largest message (sizes step x4)");
ABSL_FLAG(bool, json, false, "allreduce: print one JSON object per line instead of a table");
ABSL_FLAG(std::string, impls, "lmsgd,lmsgd-tcp,gloo,openmpi",
          "allreduce: implementations to run (lmsgd: UCX over shared memory, plus the shared-memory algorithm; "
          "lmsgd-tcp: ring and halving/doubling over UCX's TCP transport, the wire between hosts, on loopback; "
          "not by default: lmsgd-lanes, lmsgd-tcp-lanes: the communicator (AUTO) with c = 1, 2, 4 lanes, "
          "4 allreduces in flight)");
ABSL_FLAG(int32_t, impl_timeout_s, 1200,
          "allreduce: deadline of one implementation's run over all sizes (its processes are killed after it)");
ABSL_FLAG(int32_t, rounds, 1,
          "allreduce: run every implementation this many times, alternating, and report each one's median "
          "(a noisy machine then disturbs all implementations alike)");
ABSL_FLAG(std::string, algos, "",
          "allreduce: only these of lmsgd's rows (comma-separated: ring, halving_doubling, hd_halving_only, "
          "shared_memory, each also with _bf16; empty: all)");
ABSL_FLAG(std::string, link, "",
          "allreduce: a tc rate (10gbit, 25gbit, ...): run lmsgd-tcp's ranks each in its own network namespace, "
          "joined by a bridge, every host's egress shaped to this rate (tbf): TCP between hosts on a link of "
          "that speed. Needs root and iproute2; only --impls=lmsgd-tcp");
ABSL_FLAG(bool, separate_hosts, false, "(internal) allreduce-rank: the ranks are on different hosts (--link)");
ABSL_FLAG(int32_t, rank, 0, "(internal) allreduce-rank: this process's rank");
ABSL_FLAG(std::string, store, "", "(internal) allreduce-rank: rendezvous directory");
ABSL_FLAG(std::string, impl, "lmsgd",
          "(internal) allreduce-rank: lmsgd | lmsgd-tcp | lmsgd-lanes | lmsgd-tcp-lanes | gloo");
ABSL_FLAG(int32_t, workers, 1024, "coordinator-load: simulated workers");
ABSL_FLAG(int32_t, seconds, 20, "coordinator-load: heartbeat phase length");
ABSL_FLAG(int32_t, client_threads, 32, "coordinator-load: client threads driving the simulated workers");
ABSL_FLAG(std::string, path, "", "data: the ImageFolder to read");
ABSL_FLAG(int32_t, data_batch, 256, "data: batch size of both pipelines");
ABSL_FLAG(int32_t, images, 0, "data: time this many images (0 = the whole folder)");
ABSL_FLAG(std::string, out, "", "make-images: the ImageFolder to write");
ABSL_FLAG(int32_t, classes, 10, "make-images: classes");
ABSL_FLAG(int32_t, per_class, 100, "make-images: images per class");
ABSL_FLAG(uint64_t, seed, 1, "make-images: seed (the folder is a function of it)");
ABSL_FLAG(std::string, coordinator_bin, "", "coordinator-load: lmsgd-coordinator (default: next to this build)");

namespace lmsgd::bench {
int RunAllreduceRank(const std::string& impl, int rank, int k, const std::string& store_dir, size_t min_bytes,
                     size_t max_bytes, const RankOptions& opt);
bool HaveGloo();
int RunCoordinatorLoad(const std::string& coordinator_bin, int workers, int seconds, int threads);
int RunMakeImages(const std::string& out, int classes, int per_class, uint64_t seed, int threads);
int RunDataBench(const std::string& path, int threads, int batch, int images, const std::string& compare,
                 const std::string& python);
}  // namespace lmsgd::bench

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

// Step times settle slowly (oneDNN's JIT, first touch of the activations, the allocator; PyTorch's
// caches): the timed window is the last `iters` steps, taken once at least three steps have run
// and every step of the window lies within 10% of the window's median, or after `max_steps`.
bool Stable(const std::vector<double>& t, int iters) {
  if (static_cast<int>(t.size()) < std::max(iters, 3)) return false;
  std::vector<double> w(t.end() - iters, t.end());
  std::sort(w.begin(), w.end());
  const double median = w[w.size() / 2];
  return w.front() >= 0.9 * median && w.back() <= 1.1 * median;
}

struct LmsgdRun {
  double img_s = 0;
  std::string error;
};

// lmsgd's step in `precision`: steps until Stable, then the median of the last `iters`, with the
// per-op split and every step's loss printed.
LmsgdRun RunLmsgd(lmsgd::train::TrainerConfig c, lmsgd::backend::Precision precision, int max_steps, int iters) {
  c.precision = precision;
  const char* pname = lmsgd::backend::PrecisionName(precision);
  auto trainer = lmsgd::train::CreateTrainer(c);
  if (!trainer.ok()) return {0, trainer.status().ToString()};
  const int batch = c.per_worker_batch, size = c.height;
  std::vector<float> images(static_cast<size_t>(batch) * 3 * size * size);
  std::vector<int32_t> labels(batch);
  uint64_t s = 88172645463325252ull;
  for (auto& v : images) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    v = static_cast<float>(static_cast<int64_t>(s % 2000001) - 1000000) / 1e6f;
  }
  for (int i = 0; i < batch; ++i) labels[i] = (i * 37) % c.num_classes;
  std::cout << absl::StrFormat("lmsgd %s: %s\n", pname, (*trainer)->Describe());
  // Per-op times and the optimizer's are summed over each step and kept per step, so that the
  // split can be reported over the timed window.
  std::vector<double> times, optimizer;
  std::vector<lmsgd::backend::OpTimes> ops;
  for (uint64_t it = 0; !Stable(times, iters) && static_cast<int>(times.size()) < max_steps; ++it) {
    (*trainer)->network().ResetTimes();
    const auto t0 = std::chrono::steady_clock::now();
    auto st = (*trainer)->Step(it, images.data(), labels.data());
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st.ok()) return {0, st.status().ToString()};
    times.push_back(dt);
    optimizer.push_back(st->optimizer_s);
    ops.push_back((*trainer)->network().times());
    std::cout << absl::StrFormat("lmsgd %s iter %d %.3f s loss %.4f lr %.4f\n", pname, it, dt, st->loss, st->lr);
  }
  const size_t first = times.size() - std::min<size_t>(times.size(), iters);
  lmsgd::backend::OpTimes t;
  double optimizer_s = 0;
  for (size_t i = first; i < times.size(); ++i) {
    t += ops[i];
    optimizer_s += optimizer[i];
  }
  const std::vector<double> window(times.begin() + first, times.end());
  std::vector<double> sorted = window;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  const double n = static_cast<double>(window.size());
  std::cout << absl::StrFormat("lmsgd %s per-op time per step (ms, mean over timed steps):\n", pname);
  auto row = [&](const char* name, double v) {
    std::cout << absl::StrFormat("  %-26s %9.1f  %5.1f%%\n", name, 1e3 * v / n, 100 * v / (median * n));
  };
  for (const auto& [name, field] : lmsgd::backend::kOpTimeFields) row(name, t.*field);
  row("sgd_update", optimizer_s);
  std::cout << absl::StrFormat("lmsgd %s median step %.3f s = %.2f img/s (%d warm-up steps%s)\n", pname, median,
                               batch / median, first, Stable(window, iters) ? "" : "; not stable by --max_steps");
  return {batch / median, ""};
}

// The PyTorch baseline in `precision` (channels_last; autocast(bfloat16) for bf16): its img/s.
double RunPytorch(const std::string& script, const std::string& model, int batch, int size, int threads, double lr,
                  int max_steps, int iters, const char* precision) {
  const std::string cmd =
      absl::StrFormat("%s %s --model=%s --batch=%d --image_size=%d --threads=%d --lr=%g --max_steps=%d "
                      "--iterations=%d --precision=%s --channels_last 2>&1",
                      absl::GetFlag(FLAGS_python), script, model, batch, size, threads, lr, max_steps, iters,
                      precision);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return 0;
  double img_s = 0;
  char line[4096];
  while (fgets(line, sizeof(line), pipe) != nullptr) {
    std::string l(line);
    std::cout << l;
    if (absl::StartsWith(l, "pytorch_img_s=")) (void)absl::SimpleAtod(absl::StripAsciiWhitespace(l.substr(14)), &img_s);
  }
  return pclose(pipe) == 0 ? img_s : 0;
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
  std::vector<lmsgd::backend::Precision> precisions;
  for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_precisions), ',', absl::SkipEmpty())) {
    auto parsed = lmsgd::backend::ParsePrecision(p);
    if (!parsed.ok()) {
      std::cerr << "lmsgd-bench: --precisions: " << parsed.status().message() << "\n";
      return 2;
    }
    precisions.push_back(*parsed);
  }
  const int threads = lmsgd::train::SetComputeThreads(absl::GetFlag(FLAGS_threads));
  const int batch = absl::GetFlag(FLAGS_batch), size = absl::GetFlag(FLAGS_image_size);
  const int max_steps = absl::GetFlag(FLAGS_max_steps), iters = absl::GetFlag(FLAGS_iterations);
  // The paper's rule for this batch (0.1 per 256), constant: neither side diverges, and both run
  // the same update (momentum 0.9, weight decay 1e-4, BN over the whole batch).
  const double lr = 0.1 * batch / 256.0;
  lmsgd::train::TrainerConfig c;
  c.arch = arch;
  c.in_channels = 3;
  c.num_classes = arch == Arch::kResNet20 ? 10 : 1000;
  c.height = c.width = size;
  c.per_worker_batch = batch;
  c.bn_group = batch;
  c.schedule.global_batch = batch;
  c.schedule.reference_batch = 256;
  c.schedule.warmup = lmsgd::Warmup::kNone;
  c.schedule.decay_epochs.clear();
  std::cout << absl::StrFormat("lmsgd-bench train: %s, batch %d, %dx%d, %d threads, lr %g constant\n", m, batch, size,
                               size, threads, lr);
  std::map<lmsgd::backend::Precision, double> lmsgd_img_s, torch_img_s;
  for (auto p : precisions) {
    LmsgdRun r = RunLmsgd(c, p, max_steps, iters);
    if (!r.error.empty()) {
      std::cerr << "lmsgd-bench: lmsgd " << lmsgd::backend::PrecisionName(p) << ": " << r.error << "\n";
      return 1;
    }
    lmsgd_img_s[p] = r.img_s;
  }
  if (absl::GetFlag(FLAGS_compare).empty()) {
    for (auto p : precisions) std::cout << absl::StrFormat("lmsgd_%s_img_s=%.3f ", lmsgd::backend::PrecisionName(p), lmsgd_img_s[p]);
    std::cout << "\n";
    return 0;
  }
  if (absl::GetFlag(FLAGS_compare) != "pytorch") {
    std::cerr << "lmsgd-bench: unknown --compare=" << absl::GetFlag(FLAGS_compare) << "\n";
    return 2;
  }
  const std::string script = BaselineScript(argv0);
  if (script.empty()) {
    std::cerr << "lmsgd-bench: pytorch_resnet_train.py not found next to the binary or in the source tree\n";
    return 1;
  }
  for (auto p : precisions) {
    torch_img_s[p] = RunPytorch(script, m, batch, size, threads, lr, max_steps, iters, lmsgd::backend::PrecisionName(p));
    if (torch_img_s[p] <= 0) {
      std::cerr << "lmsgd-bench: the PyTorch baseline failed: install it with deploy/setup.sh --with-baselines "
                << "(Debian python3-torch, python3-torchvision)\n";
      return 1;
    }
  }
  std::cout << "\n| precision | lmsgd img/s | PyTorch img/s (channels_last" << ", autocast for bf16) | ratio |\n";
  for (auto p : precisions) {
    std::cout << absl::StrFormat("| %s | %.2f | %.2f | %.2f |\n", lmsgd::backend::PrecisionName(p), lmsgd_img_s[p],
                                 torch_img_s[p], lmsgd_img_s[p] / torch_img_s[p]);
  }
  using lmsgd::backend::Precision;
  std::string last;
  if (lmsgd_img_s.count(Precision::kFp32)) {
    last += absl::StrFormat("lmsgd_img_s=%.3f pytorch_img_s=%.3f ratio=%.3f", lmsgd_img_s[Precision::kFp32],
                            torch_img_s[Precision::kFp32], lmsgd_img_s[Precision::kFp32] / torch_img_s[Precision::kFp32]);
  }
  if (lmsgd_img_s.count(Precision::kBf16)) {
    last += absl::StrFormat("%slmsgd_bf16_img_s=%.3f pytorch_bf16_img_s=%.3f bf16_ratio=%.3f", last.empty() ? "" : " ",
                            lmsgd_img_s[Precision::kBf16], torch_img_s[Precision::kBf16],
                            lmsgd_img_s[Precision::kBf16] / torch_img_s[Precision::kBf16]);
  }
  std::cout << last << "\n";
  return 0;
}

// Runs `cmd` through the shell and returns its stdout lines that start with '{'.
std::vector<std::string> JsonLines(const std::string& cmd, int* rc) {
  std::vector<std::string> out;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) {
    *rc = -1;
    return out;
  }
  char line[4096];
  while (fgets(line, sizeof(line), pipe) != nullptr) {
    std::string l(absl::StripTrailingAsciiWhitespace(line));
    if (absl::StartsWith(l, "{")) out.push_back(l);
  }
  *rc = pclose(pipe);
  return out;
}

std::string Field(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  auto p = json.find(k);
  if (p == std::string::npos) return "";
  p += k.size();
  if (json[p] == '"') return json.substr(p + 1, json.find('"', p + 1) - p - 1);
  return json.substr(p, json.find_first_of(",}", p) - p);
}

// K "hosts" for --link, made by deploy/netns.sh: namespaces lmb<pid>h<r> at 10.79.0.<r + 1> on one
// bridge, each egress shaped to `rate`. Removed, with whatever still runs in them, on destruction.
class LinkedHosts {
 public:
  // Returns false, netns.sh having said why on stderr, when the namespaces cannot be made.
  bool Create(int k, const std::string& rate) {
    tag_ = absl::StrCat("lmb", getpid());
    k_ = k;
    const std::string up = absl::StrCat(kScript, " up ", tag_, " ", k, " 10.79.0 ", rate);
    if (std::system(up.c_str()) != 0) {
      std::cerr << "lmsgd-bench: --link=" << rate << ": " << up << " failed\n";
      return false;
    }
    created_ = true;
    return true;
  }
  // The prefix that runs a command on host r.
  std::string On(int r) const {
    return absl::StrCat("ip netns exec ", tag_, "h", r, " env UCX_NET_DEVICES=eth0 ");
  }
  ~LinkedHosts() {
    if (created_) (void)std::system(absl::StrCat(kScript, " down ", tag_, " ", k_).c_str());
  }

 private:
  static constexpr const char* kScript = LMSGD_SOURCE_DIR "/deploy/netns.sh";
  std::string tag_;
  int k_ = 0;
  bool created_ = false;
};

int Allreduce() {
  const int k = absl::GetFlag(FLAGS_ranks);
  const uint64_t lo = absl::GetFlag(FLAGS_min_bytes), hi = absl::GetFlag(FLAGS_max_bytes);
  const std::string self = std::filesystem::canonical("/proc/self/exe").string();
  const std::string dir = std::filesystem::path(self).parent_path().string();
  // (impl, algo, bytes) -> seconds per round, in first-seen order.
  std::vector<std::tuple<std::string, std::string, uint64_t>> order;
  std::map<std::tuple<std::string, std::string, uint64_t>, std::vector<double>> times;
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  bool failed = false;
  const int timeout_s = absl::GetFlag(FLAGS_impl_timeout_s);
  if (timeout_s < 1) {
    std::cerr << "lmsgd-bench: --impl_timeout_s=" << timeout_s << " must be >= 1\n";
    return 2;
  }
  const std::string limit = absl::StrCat("timeout -k 5 ", timeout_s, " ");
  const std::string link = absl::GetFlag(FLAGS_link);
  LinkedHosts hosts;
  if (!link.empty()) {
    if (absl::GetFlag(FLAGS_impls) != "lmsgd-tcp") {
      std::cerr << "lmsgd-bench: --link runs lmsgd's TCP rows only: pass --impls=lmsgd-tcp\n";
      return 2;
    }
    if (!hosts.Create(k, link)) return 2;
  }
  std::string rank_flags;
  if (!absl::GetFlag(FLAGS_algos).empty()) absl::StrAppend(&rank_flags, " --algos=", absl::GetFlag(FLAGS_algos));
  if (!link.empty()) absl::StrAppend(&rank_flags, " --separate_hosts");
  for (int round = 0; round < rounds; ++round)
  for (absl::string_view impl : absl::StrSplit(absl::GetFlag(FLAGS_impls), ',', absl::SkipEmpty())) {
    std::string cmd, store;
    if (impl == "lmsgd" || impl == "lmsgd-tcp" || impl == "lmsgd-lanes" || impl == "lmsgd-tcp-lanes" ||
        impl == "gloo") {
      if (impl == "gloo" && !lmsgd::bench::HaveGloo()) {
        std::cerr << "lmsgd-bench: built without Gloo (deploy/setup.sh --with-baselines, then rebuild); skipping it\n";
        continue;
      }
      char tmpl[] = "/tmp/lmsgd_bench_store_XXXXXX";
      store = mkdtemp(tmpl);
      // K processes, each under the deadline; rank 0's stdout is the result, the others' is
      // discarded; the exit status is rank 0's.
      for (int r = k - 1; r >= 0; --r) {
        absl::StrAppend(&cmd, link.empty() ? "" : hosts.On(r), limit, self, " allreduce-rank --impl=", impl,
                        " --rank=", r, " --ranks=", k, " --store=", store, " --min_bytes=", lo, " --max_bytes=", hi,
                        rank_flags,
                        r == 0 ? "" : " > /dev/null &", r == 0 ? "" : " ");
      }
      absl::StrAppend(&cmd, "; rc=$?; wait; exit $rc");
    } else if (impl == "openmpi") {
      const std::string mpi = dir + "/lmsgd-bench-mpi";
      if (!std::filesystem::exists(mpi)) {
        std::cerr << "lmsgd-bench: " << mpi << " not built (needs Debian libopenmpi-dev); skipping Open MPI\n";
        continue;
      }
      cmd = absl::StrCat(limit, "mpirun --allow-run-as-root --oversubscribe -np ", k, " ", mpi, " ", lo, " ", hi);
    } else {
      std::cerr << "lmsgd-bench: unknown implementation '" << impl << "'\n";
      return 2;
    }
    int rc = 0;
    auto lines = JsonLines(cmd + " 2>&1", &rc);
    if (!store.empty()) {
      std::error_code ignored;  // the rendezvous files are of no use after the run
      std::filesystem::remove_all(store, ignored);
    }
    if (rc != 0 || lines.empty()) {
      // One implementation's failure (a baseline's timeout, say) costs its rows, not the run's.
      const bool timed_out = WIFEXITED(rc) && WEXITSTATUS(rc) == 124;
      std::cerr << "lmsgd-bench: " << impl
                << (timed_out ? absl::StrCat(" timed out after ", timeout_s, " s (--impl_timeout_s)")
                              : absl::StrCat(" failed (exit status ", WIFEXITED(rc) ? WEXITSTATUS(rc) : rc, ")"))
                << ", its rows are left out: " << cmd << "\n";
      failed = true;
      continue;
    }
    for (const auto& l : lines) {
      uint64_t b = 0;
      double us = 0;
      (void)absl::SimpleAtoi(Field(l, "bytes"), &b);
      (void)absl::SimpleAtod(Field(l, "time_us"), &us);
      auto key = std::make_tuple(Field(l, "impl"), Field(l, "algo"), b);
      if (!times.count(key)) order.push_back(key);
      times[key].push_back(us / 1e6);
    }
  }
  std::vector<std::string> results;
  for (const auto& key : order) {
    std::vector<double> v = times[key];
    std::sort(v.begin(), v.end());
    results.push_back(lmsgd::bench::ResultLine(std::get<0>(key), std::get<1>(key), k, std::get<2>(key), v[v.size() / 2]));
  }
  if (absl::GetFlag(FLAGS_json)) {
    for (const auto& l : results) std::cout << l << "\n";
    return failed ? 1 : 0;
  }
  std::cout << absl::StrFormat(
      "allreduce, k=%d processes %s, float32 sum; busbw = algbw * 2(k-1)/k%s\n", k,
      link.empty() ? "on this host" : absl::StrCat("in separate network namespaces, each host's link ", link),
      rounds > 1 ? absl::StrFormat("; median of %d alternating rounds", rounds) : "");
  std::cout << absl::StrFormat("%-10s %-18s %12s %12s %10s %10s\n", "impl", "algo", "bytes", "time_us", "algbw", "busbw");
  for (const auto& l : results) {
    std::cout << absl::StrFormat("%-10s %-18s %12s %12s %10s %10s\n", Field(l, "impl"), Field(l, "algo"),
                                 Field(l, "bytes"), Field(l, "time_us"), Field(l, "algbw_gbps"), Field(l, "busbw_gbps"));
  }
  // Ratios: lmsgd's best busbw over Open MPI's, and halving/doubling's speed-up over ring on
  // each wire.
  std::map<uint64_t, double> best, mpi;
  std::map<std::pair<std::string, std::string>, std::map<uint64_t, double>> us;  // (impl, algo) -> bytes -> time
  for (const auto& l : results) {
    uint64_t b = 0;
    double bw = 0;
    (void)absl::SimpleAtoi(Field(l, "bytes"), &b);
    (void)absl::SimpleAtod(Field(l, "busbw_gbps"), &bw);
    (void)absl::SimpleAtod(Field(l, "time_us"), &us[{Field(l, "impl"), Field(l, "algo")}][b]);
    // One allreduce at a time (the lanes rows time several in flight).
    if (absl::StartsWith(Field(l, "impl"), "lmsgd") && !absl::EndsWith(Field(l, "impl"), "-lanes") &&
        !absl::EndsWith(Field(l, "algo"), "_bf16")) {  // float32 against float32
      best[b] = std::max(best[b], bw);
    }
    if (Field(l, "impl") == "openmpi") mpi[b] = bw;
  }
  auto ratio = [](std::map<uint64_t, double>& num, std::map<uint64_t, double>& den, uint64_t b) {
    return num.count(b) && den.count(b) ? absl::StrFormat("%.2f", num[b] / den[b]) : std::string("-");
  };
  auto ring_over_hd = [&](const std::string& impl, uint64_t b) {
    return ratio(us[{impl, "ring"}], us[{impl, "halving_doubling"}], b);
  };
  std::cout << "bytes        lmsgd_best/openmpi_busbw  ring_time/halving_doubling_time (shm)  (tcp)\n";
  for (const auto& [b, bw] : best) {
    std::cout << absl::StrFormat("%-12d %24s %38s %6s\n", b, ratio(best, mpi, b), ring_over_hd("lmsgd", b),
                                 ring_over_hd("lmsgd-tcp", b));
  }
  // The bf16 wire: its time over float32's, per algorithm and wire (goal: <= 0.6 from 1 MiB).
  auto bf16_over_fp32 = [&](const std::string& impl, const std::string& algo, uint64_t b) {
    return ratio(us[{impl, algo + "_bf16"}], us[{impl, algo}], b);
  };
  std::cout << "bytes        bf16_time/fp32_time: ring (shm)  halving_doubling (shm)  shared_memory  ring (tcp)  "
               "halving_doubling (tcp)\n";
  for (const auto& [b, bw] : best) {
    std::cout << absl::StrFormat("%-12d %32s %23s %14s %11s %23s\n", b, bf16_over_fp32("lmsgd", "ring", b),
                                 bf16_over_fp32("lmsgd", "halving_doubling", b),
                                 bf16_over_fp32("lmsgd", "shared_memory", b), bf16_over_fp32("lmsgd-tcp", "ring", b),
                                 bf16_over_fp32("lmsgd-tcp", "halving_doubling", b));
  }
  // The lanes rows (--impls=lmsgd-lanes,lmsgd-tcp-lanes): one lane's time over c lanes'.
  std::set<uint64_t> lane_sizes;
  for (const auto& [key, t] : us) {
    if (absl::EndsWith(key.first, "-lanes")) {
      for (const auto& [b, x] : t) lane_sizes.insert(b);
    }
  }
  if (!lane_sizes.empty()) {
    std::cout << "bytes        c1_time/c2_time (shm)  c1_time/c4_time (shm)  c1_time/c2_time (tcp)  c1_time/c4_time (tcp)\n";
    for (uint64_t b : lane_sizes) {
      auto speedup = [&](const std::string& impl, const char* c) { return ratio(us[{impl, "auto_c1"}], us[{impl, c}], b); };
      std::cout << absl::StrFormat("%-12d %21s %22s %22s %22s\n", b, speedup("lmsgd-lanes", "auto_c2"),
                                   speedup("lmsgd-lanes", "auto_c4"), speedup("lmsgd-tcp-lanes", "auto_c2"),
                                   speedup("lmsgd-tcp-lanes", "auto_c4"));
    }
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lmsgd-bench train --model=resnet50 --batch=32 --device=cpu --compare=pytorch");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::string cmd = args.size() == 2 ? args[1] : "";
  if (cmd == "train") return Train(argv[0]);
  if (cmd == "allreduce") return Allreduce();
  if (cmd == "make-images") {
    const int threads = absl::GetFlag(FLAGS_threads) > 0 ? absl::GetFlag(FLAGS_threads)
                                                         : static_cast<int>(std::thread::hardware_concurrency());
    return lmsgd::bench::RunMakeImages(absl::GetFlag(FLAGS_out), absl::GetFlag(FLAGS_classes),
                                       absl::GetFlag(FLAGS_per_class), absl::GetFlag(FLAGS_seed), threads);
  }
  if (cmd == "data") {
    return lmsgd::bench::RunDataBench(absl::GetFlag(FLAGS_path), absl::GetFlag(FLAGS_threads),
                                      absl::GetFlag(FLAGS_data_batch), absl::GetFlag(FLAGS_images),
                                      absl::GetFlag(FLAGS_compare), absl::GetFlag(FLAGS_python));
  }
  if (cmd == "coordinator-load") {
    std::string bin = absl::GetFlag(FLAGS_coordinator_bin);
    if (bin.empty()) {
      const auto self = std::filesystem::canonical("/proc/self/exe").parent_path();
      for (const auto& p : {self / "lmsgd-coordinator", self / "../coordinator/lmsgd-coordinator"}) {
        if (std::filesystem::exists(p)) bin = std::filesystem::canonical(p).string();
      }
    }
    return lmsgd::bench::RunCoordinatorLoad(bin, absl::GetFlag(FLAGS_workers), absl::GetFlag(FLAGS_seconds),
                                            absl::GetFlag(FLAGS_client_threads));
  }
  if (cmd == "allreduce-rank") {
    lmsgd::bench::RankOptions opt;
    for (absl::string_view a : absl::StrSplit(absl::GetFlag(FLAGS_algos), ',', absl::SkipEmpty())) {
      opt.algos.insert(std::string(a));
    }
    opt.separate_hosts = absl::GetFlag(FLAGS_separate_hosts);
    return lmsgd::bench::RunAllreduceRank(absl::GetFlag(FLAGS_impl), absl::GetFlag(FLAGS_rank),
                                          absl::GetFlag(FLAGS_ranks), absl::GetFlag(FLAGS_store),
                                          absl::GetFlag(FLAGS_min_bytes), absl::GetFlag(FLAGS_max_bytes), opt);
  }
  std::cerr << "usage: lmsgd-bench train [--model=resnet50] [--batch=32] [--device=cpu] [--compare=pytorch]\n"
               "       lmsgd-bench allreduce --ranks=K [--min_bytes=4096] [--max_bytes=268435456] [--json] [--algos=ring,...]\n"
               "                 [--impls=lmsgd-tcp --link=10gbit]\n"
               "       lmsgd-bench coordinator-load [--workers=1024] [--seconds=20]\n"
               "       lmsgd-bench make-images --out=DIR [--classes=10] [--per_class=100] [--seed=1]\n"
               "       lmsgd-bench data --path=DIR [--threads=N] [--compare=torchvision] [--data_batch=256]\n";
  return 2;
}
