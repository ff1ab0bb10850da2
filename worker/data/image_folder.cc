#include "worker/data/image_folder.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "worker/data/image_transform.h"
#include "common/status_macros.h"

namespace lmsgd::data {
namespace {

bool IsImageFile(const std::filesystem::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".jpg" || ext == ".jpeg";
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

absl::Status ImageFolderDataset::Get(uint64_t index, bool train, uint64_t aug_seed, float* out,
                                     int32_t* label) const {
  return GetPixels(index, train, aug_seed, PixelFormat::kFloatChw, out, label);
}

absl::Status ImageFolderDataset::GetPixels(uint64_t index, bool train, uint64_t aug_seed, PixelFormat format,
                                           void* out, int32_t* label) const {
  if (index >= files_.size()) {
    return absl::OutOfRangeError(absl::StrCat("example ", index, " of image folder '", root_, "': only ",
                                              files_.size()));
  }
  const std::string& path = files_[index].first;
  auto bytes = ReadFileToString(path);
  if (!bytes.ok()) return absl::Status(bytes.status().code(), absl::StrCat("reading image: ", bytes.status().message()));
  RETURN_IF_ERROR(TransformJpeg(*bytes, path, train, aug_seed, size_, format, out));
  *label = files_[index].second;
  return absl::OkStatus();
}

std::string ImageFolderDataset::Describe(uint64_t index) const {
  return index < files_.size() ? files_[index].first : absl::StrCat(root_, "[#", index, "]");
}

}  // namespace lmsgd::data
