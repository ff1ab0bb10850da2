// IDX files (the MNIST / Fashion-MNIST format), raw or gzip-compressed (".gz").
//
// Layout: 2 zero bytes, a type byte (0x08 = unsigned byte; the only type these data sets
// use), the number of dimensions, then each dimension as a big-endian uint32, then the data.
// Every error names the file and what is wrong; a file whose size does not match its header
// is rejected (never read as garbage).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lmsgd::data {

struct IdxArray {
  std::vector<uint32_t> dims;
  std::vector<uint8_t> data;  // row-major, product(dims) bytes
};

absl::StatusOr<IdxArray> ReadIdxFile(const std::string& path);
// Parses the bytes of an (uncompressed) IDX file; `name` is used in error messages.
absl::StatusOr<IdxArray> ParseIdx(const std::string& bytes, const std::string& name);

// A labelled image set: images (count, rows, cols) with labels (count).
struct IdxDataset {
  uint32_t count = 0, rows = 0, cols = 0;
  std::vector<uint8_t> images;  // count * rows * cols
  std::vector<uint8_t> labels;  // count
};

// Loads "<dir>/<prefix>-images-idx3-ubyte[.gz]" and "<dir>/<prefix>-labels-idx1-ubyte[.gz]"
// (prefix "train" or "t10k"), checking that the counts agree and labels are < num_classes.
absl::StatusOr<IdxDataset> LoadIdxDataset(const std::string& dir, const std::string& prefix, uint32_t num_classes);

}  // namespace lmsgd::data
