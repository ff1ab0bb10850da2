#include "worker/data/image_folder.h"

#include <turbojpeg.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "worker/data/sampler.h"
#include "common/status_macros.h"

namespace lmsgd::data {
namespace {

constexpr float kMean[3] = {0.485f, 0.456f, 0.406f};
constexpr float kStd[3] = {0.229f, 0.224f, 0.225f};

bool IsImageFile(const std::filesystem::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".jpg" || ext == ".jpeg";
}

double Uniform(SplitMix64& rng, double lo, double hi) {
  return lo + (hi - lo) * static_cast<double>(rng.Next() >> 11) * 0x1.0p-53;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ImageFolderDataset>> ImageFolderDataset::Open(const std::string& root, int size,
                                                                              std::vector<std::string> classes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrCat("image folder '", root, "' is not a directory"));
  }
  auto ds = std::unique_ptr<ImageFolderDataset>(new ImageFolderDataset());
  ds->root_ = root;
  ds->size_ = size;
  if (classes.empty()) {
    for (const auto& e : fs::directory_iterator(root, ec)) {
      if (e.is_directory()) classes.push_back(e.path().filename().string());
    }
    if (ec) return absl::InternalError(absl::StrCat("listing '", root, "': ", ec.message()));
    std::sort(classes.begin(), classes.end());
    if (classes.empty()) return absl::NotFoundError(absl::StrCat("image folder '", root, "' has no class directories"));
  }
  ds->classes_ = classes;
  for (size_t c = 0; c < classes.size(); ++c) {
    const fs::path dir = fs::path(root) / classes[c];
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.is_regular_file() && IsImageFile(e.path())) files.push_back(e.path().string());
    }
    std::sort(files.begin(), files.end());
    for (auto& f : files) ds->files_.emplace_back(std::move(f), static_cast<int32_t>(c));
  }
  if (ds->files_.empty()) return absl::NotFoundError(absl::StrCat("image folder '", root, "' has no .jpg/.jpeg files"));
  return ds;
}

absl::Status DecodeJpeg(const std::string& bytes, int min_short_side, const std::string& name,
                        std::vector<uint8_t>* rgb, int* height, int* width) {
  tjhandle tj = tjInitDecompress();
  if (tj == nullptr) return absl::InternalError("tjInitDecompress failed");
  struct Closer {
    tjhandle h;
    ~Closer() { tjDestroy(h); }
  } closer{tj};
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  const auto* buf = reinterpret_cast<const unsigned char*>(bytes.data());
  if (tjDecompressHeader3(tj, buf, bytes.size(), &w, &h, &subsamp, &colorspace) != 0) {
    return absl::DataLossError(absl::StrCat("corrupt JPEG '", name, "': ", tjGetErrorStr2(tj)));
  }
  if (w <= 0 || h <= 0 || static_cast<int64_t>(w) * h > (int64_t{1} << 28)) {
    return absl::DataLossError(absl::StrCat("JPEG '", name, "' has unusable size ", w, "x", h));
  }
  // Largest DCT down-scaling that keeps the shorter side large enough.
  int num = 1, denom = 1;
  for (int d : {8, 4, 2}) {
    if (std::min(w, h) / d >= min_short_side) {
      denom = d;
      break;
    }
  }
  const int sw = TJSCALED(w, (tjscalingfactor{num, denom}));
  const int sh = TJSCALED(h, (tjscalingfactor{num, denom}));
  rgb->resize(static_cast<size_t>(sw) * sh * 3);
  // Warnings count too: a truncated file "decodes" with grey fill, which would be silent garbage.
  if (tjDecompress2(tj, buf, bytes.size(), rgb->data(), sw, 0, sh, TJPF_RGB, TJFLAG_ACCURATEDCT) != 0) {
    return absl::DataLossError(absl::StrCat("corrupt JPEG '", name, "': ", tjGetErrorStr2(tj)));
  }
  *height = sh;
  *width = sw;
  return absl::OkStatus();
}

void CropResizeNormalize(const uint8_t* rgb, int height, int width, double x0, double y0, double w, double h,
                         int out_size, bool flip, float* out) {
  const double sx = w / out_size, sy = h / out_size;
  const size_t plane = static_cast<size_t>(out_size) * out_size;
  for (int oy = 0; oy < out_size; ++oy) {
    // Pixel centres map to pixel centres (align_corners = false).
    double fy = y0 + (oy + 0.5) * sy - 0.5;
    fy = std::clamp(fy, 0.0, static_cast<double>(height - 1));
    const int y1 = static_cast<int>(fy), y2 = std::min(y1 + 1, height - 1);
    const float wy = static_cast<float>(fy - y1);
    for (int ox = 0; ox < out_size; ++ox) {
      double fx = x0 + (ox + 0.5) * sx - 0.5;
      fx = std::clamp(fx, 0.0, static_cast<double>(width - 1));
      const int x1 = static_cast<int>(fx), x2 = std::min(x1 + 1, width - 1);
      const float wx = static_cast<float>(fx - x1);
      const int dst_x = flip ? out_size - 1 - ox : ox;
      for (int c = 0; c < 3; ++c) {
        const float a = rgb[(static_cast<size_t>(y1) * width + x1) * 3 + c];
        const float b = rgb[(static_cast<size_t>(y1) * width + x2) * 3 + c];
        const float d = rgb[(static_cast<size_t>(y2) * width + x1) * 3 + c];
        const float e = rgb[(static_cast<size_t>(y2) * width + x2) * 3 + c];
        const float v = (a * (1 - wx) + b * wx) * (1 - wy) + (d * (1 - wx) + e * wx) * wy;
        out[c * plane + static_cast<size_t>(oy) * out_size + dst_x] = (v / 255.0f - kMean[c]) / kStd[c];
      }
    }
  }
}

absl::Status ImageFolderDataset::Get(uint64_t index, bool train, uint64_t aug_seed, float* out,
                                     int32_t* label) const {
  if (index >= files_.size()) {
    return absl::OutOfRangeError(absl::StrCat("example ", index, " of image folder '", root_, "': only ",
                                              files_.size()));
  }
  const std::string& path = files_[index].first;
  auto bytes = ReadFileToString(path);
  if (!bytes.ok()) return absl::Status(bytes.status().code(), absl::StrCat("reading image: ", bytes.status().message()));
  std::vector<uint8_t> rgb;
  int h = 0, w = 0;
  // Evaluation resizes the shorter side to size*256/224; training crops at least 8% of the area.
  const int need = train ? size_ / 4 : size_ * 256 / 224;
  RETURN_IF_ERROR(DecodeJpeg(*bytes, std::max(need, 1), path, &rgb, &h, &w));
  if (train) {
    SplitMix64 rng(aug_seed);
    const double area = static_cast<double>(h) * w;
    double cx = 0, cy = 0, cw = w, ch = h;
    bool found = false;
    for (int attempt = 0; attempt < 10 && !found; ++attempt) {
      const double target = area * Uniform(rng, 0.08, 1.0);
      const double ratio = std::exp(Uniform(rng, std::log(3.0 / 4), std::log(4.0 / 3)));
      const double tw = std::round(std::sqrt(target * ratio)), th = std::round(std::sqrt(target / ratio));
      if (tw >= 1 && th >= 1 && tw <= w && th <= h) {
        cx = std::floor(Uniform(rng, 0, w - tw + 1));
        cy = std::floor(Uniform(rng, 0, h - th + 1));
        cw = tw;
        ch = th;
        found = true;
      }
    }
    if (!found) {  // central crop with the ratio clamped to [3/4, 4/3]
      const double r = static_cast<double>(w) / h;
      if (r < 3.0 / 4) {
        cw = w;
        ch = std::round(w / (3.0 / 4));
      } else if (r > 4.0 / 3) {
        ch = h;
        cw = std::round(h * (4.0 / 3));
      }
      cx = (w - cw) / 2;
      cy = (h - ch) / 2;
    }
    const bool flip = rng.Next() & 1;
    CropResizeNormalize(rgb.data(), h, w, cx, cy, cw, ch, size_, flip, out);
  } else {
    const double resize_short = size_ * 256.0 / 224.0;
    const double scale = std::min(h, w) / resize_short;  // source pixels per resized pixel
    const double crop = size_ * scale;
    CropResizeNormalize(rgb.data(), h, w, (w - crop) / 2, (h - crop) / 2, crop, crop, size_, false, out);
  }
  *label = files_[index].second;
  return absl::OkStatus();
}

std::string ImageFolderDataset::Describe(uint64_t index) const {
  return index < files_.size() ? files_[index].first : absl::StrCat(root_, "[#", index, "]");
}

}  // namespace lmsgd::data
