// Durable file helpers.
//
// WriteFileAtomically: temp file in the same directory, write, fsync, rename over the target,
// fsync the directory. A crash at any point leaves either the old or the new file, never a
// torn one. Checksummed records (WriteRecordFile / ReadRecordFile) add a header
// (magic, length, CRC-32) so that a file damaged after the fact is detected on read.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmsgd {

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
absl::Status MakeDirs(const std::string& path);
// Names (not paths) of the regular files in `dir`, sorted.
absl::StatusOr<std::vector<std::string>> ListFiles(const std::string& dir);

uint32_t Crc32(absl::string_view data);

// A record file: "LMSGDREC" (8 bytes) | payload length (u64 LE) | CRC-32 of payload (u32 LE)
// | payload. Errors name the file and what is wrong with it.
absl::Status WriteRecordFile(const std::string& path, absl::string_view payload);
absl::StatusOr<std::string> ReadRecordFile(const std::string& path);

}  // namespace lmsgd
