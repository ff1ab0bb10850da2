// The safetensors format (https://huggingface.co/docs/safetensors): u64 little-endian header
// length N | N bytes of JSON header | raw little-endian tensor data. The header maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end)} (offsets into the data
// section) and may hold "__metadata__": {string: string}.
//
// lmsgd adds "lmsgd_crc32" (CRC-32 of the data section, decimal) to the metadata, so a file
// damaged after it was written is detected; other readers ignore it. Parsing checks sizes,
// offsets, dtypes and shapes and names the file in every error; nothing is trusted.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmsgd::checkpoint {

enum class DType { kF32, kI64 };

struct Tensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<float> f32;    // when kF32
  std::vector<int64_t> i64;  // when kI64
};

struct SafetensorsFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

// Serializes (tensors in name order, 8-byte aligned header) with the CRC in the metadata.
std::string SerializeSafetensors(const SafetensorsFile& file);
// Parses and verifies; `name` (the path) is used in errors. With `require_crc` (lmsgd's own
// files always carry one) a missing lmsgd_crc32 is corruption too: a damaged metadata key must
// not switch the check off. Files from other tools (no CRC) need require_crc = false.
absl::StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes, const std::string& name,
                                                 bool require_crc = true);

absl::Status WriteSafetensors(const std::string& path, const SafetensorsFile& file);  // atomic
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path, bool require_crc = true);

}  // namespace lmsgd::checkpoint
