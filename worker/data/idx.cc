#include "worker/data/idx.h"

#include <sys/stat.h>
#include <zlib.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status_macros.h"

namespace lmsgd::data {
namespace {

constexpr uint64_t kMaxIdxBytes = 4ull << 30;  // refuse absurd headers before allocating

absl::StatusOr<std::string> ReadGzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::string out;
  char buf[1 << 16];
  while (true) {
    int n = gzread(f, buf, sizeof(buf));
    if (n < 0) {
      int errnum = 0;
      std::string msg = gzerror(f, &errnum);
      gzclose(f);
      return absl::DataLossError(absl::StrCat("'", path, "' is not a valid gzip file: ", msg));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > kMaxIdxBytes) {
      gzclose(f);
      return absl::InvalidArgumentError(absl::StrCat("'", path, "' decompresses to more than 4 GiB"));
    }
  }
  // gzread returns 0 at a truncated stream too: ask whether it ended cleanly.
  int errnum = 0;
  const char* msg = gzerror(f, &errnum);
  std::string err = (errnum != Z_OK && errnum != Z_STREAM_END) ? msg : "";
  gzclose(f);
  if (!err.empty()) return absl::DataLossError(absl::StrCat("'", path, "' is a damaged gzip file: ", err));
  return out;
}

bool Exists(const std::string& path) {
  struct stat sb;
  return ::stat(path.c_str(), &sb) == 0;
}

}  // namespace

absl::StatusOr<IdxArray> ParseIdx(const std::string& b, const std::string& name) {
  if (b.size() < 4) return absl::DataLossError(absl::StrCat("'", name, "' is too short for an IDX header"));
  const auto* u = reinterpret_cast<const unsigned char*>(b.data());
  if (u[0] != 0 || u[1] != 0) return absl::DataLossError(absl::StrCat("'", name, "' is not an IDX file (bad magic)"));
  if (u[2] != 0x08) {
    return absl::InvalidArgumentError(absl::StrCat("'", name, "' has IDX element type 0x", absl::Hex(u[2]),
                                                   "; only unsigned bytes (0x08) are supported"));
  }
  const unsigned ndims = u[3];
  if (ndims == 0 || ndims > 4) {
    return absl::DataLossError(absl::StrCat("'", name, "' claims ", ndims, " dimensions"));
  }
  const size_t header = 4 + 4 * static_cast<size_t>(ndims);
  if (b.size() < header) return absl::DataLossError(absl::StrCat("'", name, "' is truncated inside its header"));
  IdxArray a;
  uint64_t total = 1;
  for (unsigned d = 0; d < ndims; ++d) {
    const unsigned char* p = u + 4 + 4 * d;
    uint32_t dim = (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
    a.dims.push_back(dim);
    total *= dim;
    if (total > kMaxIdxBytes) return absl::DataLossError(absl::StrCat("'", name, "' claims more than 4 GiB of data"));
  }
  if (b.size() - header != total) {
    return absl::DataLossError(absl::StrCat("'", name, "' holds ", b.size() - header, " data bytes, its header says ",
                                            total, " (truncated or corrupt)"));
  }
  a.data.assign(u + header, u + b.size());
  return a;
}

absl::StatusOr<IdxArray> ReadIdxFile(const std::string& path) {
  std::string bytes;
  if (absl::EndsWith(path, ".gz")) {
    ASSIGN_OR_RETURN(bytes, ReadGzip(path));
  } else {
    ASSIGN_OR_RETURN(bytes, ReadFileToString(path));
  }
  return ParseIdx(bytes, path);
}

absl::StatusOr<IdxDataset> LoadIdxDataset(const std::string& dir, const std::string& prefix, uint32_t num_classes) {
  auto find = [&](const std::string& base) -> absl::StatusOr<std::string> {
    for (const std::string& cand : {dir + "/" + base, dir + "/" + base + ".gz"}) {
      if (Exists(cand)) return cand;
    }
    return absl::NotFoundError(absl::StrCat("no '", base, "[.gz]' in '", dir, "'"));
  };
  ASSIGN_OR_RETURN(std::string images_path, find(prefix + "-images-idx3-ubyte"));
  ASSIGN_OR_RETURN(std::string labels_path, find(prefix + "-labels-idx1-ubyte"));
  ASSIGN_OR_RETURN(IdxArray images, ReadIdxFile(images_path));
  ASSIGN_OR_RETURN(IdxArray labels, ReadIdxFile(labels_path));
  if (images.dims.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat("'", images_path, "' has ", images.dims.size(),
                                                   " dimensions, expected 3 (count, rows, cols)"));
  }
  if (labels.dims.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("'", labels_path, "' has ", labels.dims.size(),
                                                   " dimensions, expected 1"));
  }
  if (images.dims[0] != labels.dims[0]) {
    return absl::InvalidArgumentError(absl::StrCat("'", images_path, "' has ", images.dims[0], " images but '",
                                                   labels_path, "' has ", labels.dims[0], " labels"));
  }
  for (size_t i = 0; i < labels.data.size(); ++i) {
    if (labels.data[i] >= num_classes) {
      return absl::InvalidArgumentError(absl::StrCat("'", labels_path, "': label ", int{labels.data[i]}, " at index ",
                                                     i, " is not below num_classes=", num_classes));
    }
  }
  IdxDataset ds;
  ds.count = images.dims[0];
  ds.rows = images.dims[1];
  ds.cols = images.dims[2];
  ds.images = std::move(images.data);
  ds.labels = std::move(labels.data);
  return ds;
}

}  // namespace lmsgd::data
