// lmsgd-bench data / make-images: the JPEG input pipeline against torchvision's, in one run.
//
//   lmsgd-bench make-images --out=DIR [--classes=C --per_class=N --seed=S]
//   lmsgd-bench data --path=DIR --threads=N [--compare=torchvision] [--data_batch=256] [--images=M]
//
// `data` reads every file once (so both sides start from a warm page cache), then times, at
// the same thread count, batches of --data_batch from the first M images in a seeded random
// order, from the end of the first batch to the last (start-up excluded on both sides):
//   - lmsgd's training transform to float CHW (what the CPU trainer takes), to uint8 HWC (what
//     the GPU trainer takes), and the evaluation transform to float;
//   - torchvision: ImageFolder, RandomResizedCrop(224), RandomHorizontalFlip, ToTensor,
//     Normalize in a DataLoader with N workers (Debian's python3-torchvision and PIL).
// It prints images/s and images/s per thread for each; its last line is
//   lmsgd_img_s=<x> torchvision_img_s=<y> ratio=<x/y>
// for the training transform with float output.
#include <stdio.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"
#include "worker/data/image_folder.h"
#include "worker/data/loader.h"
#include "worker/data/photo_generator.h"
#include "worker/data/sampler.h"

namespace lmsgd::bench {
namespace {

std::string FindScript(const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path self = fs::canonical("/proc/self/exe", ec);
  for (const fs::path& p : {self.parent_path() / name, self.parent_path() / "../share/lmsgd" / name,
                            fs::path(LMSGD_SOURCE_DIR) / "tests/bench" / name}) {
    if (fs::exists(p, ec)) return p.string();
  }
  return "";
}

struct Timed {
  double img_s = 0;
  std::string error;
};

Timed TimeLmsgd(const data::Dataset& ds, const std::vector<uint64_t>& order, bool train, data::PixelFormat format,
                int threads, int batch) {
  data::LoaderOptions o;
  o.batch = batch;
  o.train = train;
  o.seed = 1;
  o.threads = threads;
  o.prefetch = 2 * threads;
  o.format = format;
  data::BatchLoader loader(&ds, order, o);
  if (loader.num_batches() < 2) return {0, "fewer than 2 batches: use more --images or a smaller --data_batch"};
  auto first = loader.Next(absl::Minutes(5));
  if (!first.ok()) return {0, first.status().ToString()};
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t images = 0;
  loader.Recycle(std::move(*first));
  for (uint64_t b = 1; b < loader.num_batches(); ++b) {
    auto next = loader.Next(absl::Minutes(5));
    if (!next.ok()) return {0, next.status().ToString()};
    images += static_cast<uint64_t>(batch);
    loader.Recycle(std::move(*next));
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {images / s, ""};
}

// Runs the torchvision baseline; its last stdout line is "torchvision_img_s=<x>".
Timed TimeTorchvision(const std::string& python, const std::string& path, int threads, int batch, int images) {
  const std::string script = FindScript("torchvision_data.py");
  if (script.empty()) return {0, "tests/bench/torchvision_data.py not found"};
  const std::string cmd = absl::StrFormat("'%s' '%s' --path='%s' --threads=%d --batch=%d --images=%d 2>&1", python,
                                          script, path, threads, batch, images);
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return {0, "cannot run " + python};
  std::string out, last;
  char buf[4096];
  while (fgets(buf, sizeof buf, p) != nullptr) {
    out += buf;
    std::string line(buf);
    if (absl::StartsWith(line, "torchvision_img_s=")) last = line;
  }
  const int rc = pclose(p);
  double v = 0;
  if (rc != 0 || last.empty() ||
      !absl::SimpleAtod(absl::StripAsciiWhitespace(absl::StripPrefix(last, "torchvision_img_s=")), &v)) {
    return {0, absl::StrFormat("torchvision baseline failed (exit %d): %s", WEXITSTATUS(rc), out)};
  }
  return {v, ""};
}

}  // namespace

int RunMakeImages(const std::string& out, int classes, int per_class, uint64_t seed, int threads) {
  if (out.empty()) {
    std::cerr << "make-images: --out=DIR is required\n";
    return 2;
  }
  data::PhotoFolderOptions o;
  o.classes = classes;
  o.per_class = per_class;
  o.seed = seed;
  o.threads = threads;
  const auto t0 = std::chrono::steady_clock::now();
  auto stats = data::WritePhotoFolder(out, o);
  if (!stats.ok()) {
    std::cerr << "make-images: " << stats.status() << "\n";
    return 1;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << absl::StrFormat("wrote %d JPEGs to %s in %.1f s: mean %.0fx%.0f pixels, mean %.1f KB (quality %d)\n",
                               stats->images, out, s, stats->mean_width, stats->mean_height,
                               stats->bytes / 1000.0 / stats->images, o.quality);
  return 0;
}

int RunDataBench(const std::string& path, int threads, int batch, int images, const std::string& compare,
                 const std::string& python) {
  if (path.empty()) {
    std::cerr << "data: --path=IMAGE_FOLDER is required (lmsgd-bench make-images writes one)\n";
    return 2;
  }
  if (threads < 1) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto ds = data::ImageFolderDataset::Open(path, 224);
  if (!ds.ok()) {
    std::cerr << "data: " << ds.status() << "\n";
    return 1;
  }
  const uint64_t n = (*ds)->size();
  const uint64_t use = images > 0 ? std::min<uint64_t>(n, static_cast<uint64_t>(images)) : n;
  int64_t bytes = 0;
  for (uint64_t i = 0; i < n; ++i) {  // warm the page cache for both pipelines
    auto b = ReadFileToString((*ds)->Describe(i));
    if (b.ok()) bytes += static_cast<int64_t>(b->size());
  }
  std::vector<uint64_t> order = data::EpochPermutation(n, 1, 0);
  order.resize(use);
  std::cout << absl::StrFormat("%s: %d images (mean %.1f KB), timing %d in batches of %d, %d threads\n", path, n,
                               bytes / 1000.0 / n, use, batch, threads);
  struct Row {
    std::string name;
    Timed t;
  };
  std::vector<Row> rows;
  rows.push_back({"lmsgd train, float CHW", TimeLmsgd(**ds, order, true, data::PixelFormat::kFloatChw, threads, batch)});
  rows.push_back({"lmsgd train, uint8 HWC", TimeLmsgd(**ds, order, true, data::PixelFormat::kUint8Hwc, threads, batch)});
  rows.push_back({"lmsgd eval,  float CHW", TimeLmsgd(**ds, order, false, data::PixelFormat::kFloatChw, threads, batch)});
  if (compare == "torchvision") {
    rows.push_back({"torchvision train (DataLoader, PIL)",
                    TimeTorchvision(python, path, threads, batch, static_cast<int>(use))});
  }
  bool failed = false;
  std::cout << absl::StrFormat("%-36s %10s %14s\n", "pipeline", "img/s", "img/s/thread");
  for (const Row& r : rows) {
    if (!r.t.error.empty()) {
      std::cout << absl::StrFormat("%-36s failed: %s\n", r.name, r.t.error);
      failed = true;
      continue;
    }
    std::cout << absl::StrFormat("%-36s %10.1f %14.1f\n", r.name, r.t.img_s, r.t.img_s / threads);
  }
  if (compare == "torchvision" && rows[0].t.error.empty() && rows.back().t.img_s > 0) {
    std::cout << absl::StrFormat("lmsgd_img_s=%.1f torchvision_img_s=%.1f ratio=%.2f\n", rows[0].t.img_s,
                                 rows.back().t.img_s, rows[0].t.img_s / rows.back().t.img_s);
  }
  return failed ? 1 : 0;
}

}  // namespace lmsgd::bench
