#include "worker/data/tar_shards.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "worker/data/image_folder.h"
#include "worker/data/image_transform.h"
#include "worker/data/sampler.h"
#include "worker/data/tar.h"

namespace lmsgd::data {
namespace {

namespace fs = std::filesystem;

// Splits a member name into key and extension at the first '.' of its file name.
bool SplitKey(const std::string& name, std::string* key, std::string* ext) {
  const size_t slash = name.rfind('/');
  const size_t dot = name.find('.', slash == std::string::npos ? 0 : slash + 1);
  if (dot == std::string::npos || dot == 0) return false;
  *key = name.substr(0, dot);
  *ext = name.substr(dot + 1);
  return true;
}

absl::StatusOr<std::vector<std::string>> ShardList(const std::string& path) {
  std::vector<std::string> shards;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    for (const auto& e : fs::directory_iterator(path, ec)) {
      if (e.is_regular_file() && e.path().extension() == ".tar") shards.push_back(e.path().string());
    }
    if (ec) return absl::InternalError(absl::StrCat("listing '", path, "': ", ec.message()));
    std::sort(shards.begin(), shards.end());
    if (shards.empty()) return absl::NotFoundError(absl::StrCat("shard directory '", path, "' has no .tar files"));
    return shards;
  }
  for (absl::string_view p : absl::StrSplit(path, ',', absl::SkipWhitespace())) {
    shards.emplace_back(absl::StripAsciiWhitespace(p));
  }
  if (shards.empty()) return absl::InvalidArgumentError("no tar shards given");
  for (const std::string& s : shards) {
    if (!fs::is_regular_file(s, ec)) {
      return absl::NotFoundError(absl::StrCat("tar shard '", s, "' is not a file (give a directory or a comma-separated list of .tar files)"));
    }
  }
  return shards;
}

}  // namespace

TarShardDataset::~TarShardDataset() {
  for (int fd : fds_) ::close(fd);
}

absl::StatusOr<std::unique_ptr<TarShardDataset>> TarShardDataset::Open(const std::string& path, int size,
                                                                      std::vector<std::string> classes) {
  auto ds = std::unique_ptr<TarShardDataset>(new TarShardDataset());
  ds->size_ = size;
  ASSIGN_OR_RETURN(ds->shards_, ShardList(path));
  if (classes.empty()) {
    const fs::path dir = fs::is_directory(path) ? fs::path(path) : fs::path(ds->shards_.front()).parent_path();
    std::error_code ec;
    if (fs::exists(dir / "classes.txt", ec)) {
      ASSIGN_OR_RETURN(const std::string text, ReadFileToString((dir / "classes.txt").string()));
      for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
        classes.emplace_back(absl::StripAsciiWhitespace(line));
      }
    }
  }
  const bool named = !classes.empty();
  int32_t max_label = -1;
  for (uint32_t s = 0; s < ds->shards_.size(); ++s) {
    const std::string& shard = ds->shards_[s];
    const int fd = ::open(shard.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::NotFoundError(absl::StrCat("opening tar shard '", shard, "': ", std::strerror(errno)));
    ds->fds_.push_back(fd);
    ASSIGN_OR_RETURN(const std::vector<TarMember> members, IndexTarFile(shard));
    // Group members by key, in order of first appearance.
    std::map<std::string, size_t> slot;
    struct Parts {
      std::string key;
      const TarMember* jpg = nullptr;
      const TarMember* cls = nullptr;
    };
    std::vector<Parts> parts;
    for (const TarMember& m : members) {
      std::string key, ext;
      if (!SplitKey(m.name, &key, &ext)) continue;
      auto [it, inserted] = slot.emplace(key, parts.size());
      if (inserted) parts.push_back({key});
      Parts& p = parts[it->second];
      if (ext == "jpg" || ext == "jpeg" || ext == "JPEG" || ext == "JPG") p.jpg = &m;
      if (ext == "cls") p.cls = &m;
    }
    for (const Parts& p : parts) {
      if (p.jpg == nullptr && p.cls == nullptr) continue;
      if (p.jpg == nullptr || p.cls == nullptr) {
        return absl::DataLossError(absl::StrCat("tar shard '", shard, "': example '", p.key, "' has no ",
                                                p.jpg == nullptr ? ".jpg" : ".cls", " member"));
      }
      if (p.cls->size > 32) {
        return absl::DataLossError(absl::StrCat("tar shard '", shard, "': '", p.key, ".cls' is ", p.cls->size,
                                                " bytes, not a class index"));
      }
      std::string text(p.cls->size, '\0');
      RETURN_IF_ERROR(PreadExactly(fd, p.cls->offset, text.size(), text.data(), absl::StrCat(shard, ":", p.key, ".cls")));
      int32_t label = -1;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &label) || label < 0 ||
          (named && label >= static_cast<int32_t>(classes.size()))) {
        return absl::DataLossError(absl::StrCat("tar shard '", shard, "': '", p.key, ".cls' holds '",
                                                absl::CHexEscape(text), "', not a class index",
                                                named ? absl::StrCat(" in [0, ", classes.size(), ")") : ""));
      }
      max_label = std::max(max_label, label);
      ds->examples_.push_back({s, p.jpg->offset, p.jpg->size, label, p.key});
    }
  }
  if (ds->examples_.empty()) return absl::NotFoundError(absl::StrCat("tar shards '", path, "' hold no .jpg/.cls examples"));
  if (!named) {
    for (int32_t c = 0; c <= max_label; ++c) classes.push_back(absl::StrCat(c));
  }
  ds->classes_ = std::move(classes);
  return ds;
}

absl::Status TarShardDataset::ReadExample(uint64_t index, std::string* bytes, std::string* key, int32_t* label) const {
  if (index >= examples_.size()) {
    return absl::OutOfRangeError(absl::StrCat("example ", index, " of tar shards: only ", examples_.size()));
  }
  const Example& e = examples_[index];
  bytes->resize(e.bytes);
  RETURN_IF_ERROR(PreadExactly(fds_[e.shard], e.offset, e.bytes, bytes->data(), Describe(index)));
  if (key != nullptr) *key = e.key;
  if (label != nullptr) *label = e.label;
  return absl::OkStatus();
}

absl::Status TarShardDataset::Get(uint64_t index, bool train, uint64_t aug_seed, float* out, int32_t* label) const {
  return GetPixels(index, train, aug_seed, PixelFormat::kFloatChw, out, label);
}

absl::Status TarShardDataset::GetPixels(uint64_t index, bool train, uint64_t aug_seed, PixelFormat format, void* out,
                                        int32_t* label) const {
  thread_local std::string bytes;
  RETURN_IF_ERROR(ReadExample(index, &bytes, nullptr, label));
  return TransformJpeg(bytes, Describe(index), train, aug_seed, size_, format, out);
}

std::string TarShardDataset::Describe(uint64_t index) const {
  if (index >= examples_.size()) return absl::StrCat("tar shards [#", index, "]");
  const Example& e = examples_[index];
  return absl::StrCat(shards_[e.shard], ":", e.key, ".jpg");
}

absl::StatusOr<PackStats> PackImageFolder(const std::string& image_folder, const std::string& out_dir,
                                          const PackOptions& options) {
  if (options.shard_bytes < 4096) {
    return absl::InvalidArgumentError(absl::StrCat("shard size ", options.shard_bytes, " bytes is below 4096"));
  }
  ASSIGN_OR_RETURN(auto folder, ImageFolderDataset::Open(image_folder, 224));
  RETURN_IF_ERROR(MakeDirs(out_dir));
  std::string class_text;
  for (const std::string& c : folder->classes()) {
    if (c.find('\n') != std::string::npos) return absl::InvalidArgumentError(absl::StrCat("class name '", c, "' has a newline"));
    absl::StrAppend(&class_text, c, "\n");
  }
  const std::vector<uint64_t> order = EpochPermutation(folder->size(), options.shuffle_seed, 0);
  PackStats stats;
  std::unique_ptr<TarWriter> writer;
  auto finish = [&]() -> absl::Status {
    if (writer == nullptr) return absl::OkStatus();
    stats.bytes += writer->bytes() + 1024;
    RETURN_IF_ERROR(writer->Finish());
    writer.reset();
    return absl::OkStatus();
  };
  for (uint64_t i : order) {
    const std::string file = folder->Describe(i);
    ASSIGN_OR_RETURN(const std::string jpeg, ReadFileToString(file));
    const fs::path p(file);
    std::string stem = p.stem().string();
    std::replace(stem.begin(), stem.end(), '.', '_');
    const std::string key = absl::StrCat(p.parent_path().filename().string(), "/", stem);
    const int32_t label = folder->label(i);
    const uint64_t member = 512 + (jpeg.size() + 511) / 512 * 512 + 1024;
    if (writer != nullptr && writer->bytes() + member > options.shard_bytes) RETURN_IF_ERROR(finish());
    if (writer == nullptr) {
      ASSIGN_OR_RETURN(writer, TarWriter::Create(absl::StrFormat("%s/shard-%06d.tar", out_dir, stats.shards)));
      ++stats.shards;
    }
    RETURN_IF_ERROR(writer->Add(key + ".jpg", jpeg));
    RETURN_IF_ERROR(writer->Add(key + ".cls", absl::StrCat(label)));
    ++stats.examples;
  }
  RETURN_IF_ERROR(finish());
  RETURN_IF_ERROR(WriteFileAtomically(out_dir + "/classes.txt", class_text));
  return stats;
}

absl::StatusOr<uint64_t> UnpackShards(const std::string& path, const std::string& out_dir) {
  ASSIGN_OR_RETURN(auto ds, TarShardDataset::Open(path, 224));
  std::string bytes, key;
  for (uint64_t i = 0; i < ds->size(); ++i) {
    int32_t label = 0;
    RETURN_IF_ERROR(ds->ReadExample(i, &bytes, &key, &label));
    const std::string stem = fs::path(key).filename().string();
    const std::string dir = absl::StrCat(out_dir, "/", ds->classes()[label]);
    RETURN_IF_ERROR(MakeDirs(dir));
    RETURN_IF_ERROR(WriteFileAtomically(absl::StrCat(dir, "/", stem, ".jpg"), bytes));
  }
  return ds->size();
}

}  // namespace lmsgd::data
