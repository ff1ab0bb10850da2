// tar archives (POSIX ustar, with the pax and GNU long-name extensions readers meet in
// practice): an index of the regular members, and a writer.
//
// The index is one pass over the headers: each 512-byte header is read and its data skipped,
// so a shard is indexed without reading its images. Header checksums are verified; a size or
// offset beyond the end of the archive, a bad checksum or a truncated header is an error
// naming the archive and the byte offset. Directories, links and other non-regular members
// are skipped; pax 'path' and 'size' records and GNU 'L' long names override the header's.
//
// The writer emits ustar headers (names over 100 bytes split into prefix/name, or carried by
// a pax record), mode 0644, mtime 0 so that a packed archive is a function of its input; it
// writes to <path>.tmp and renames on Finish after an fsync, so a crash never leaves a
// half-written shard under the final name.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmsgd::data {

struct TarMember {
  std::string name;
  uint64_t offset = 0;  // of the data, from the start of the archive
  uint64_t size = 0;
};

// Reads n bytes at offset into out (pread semantics; short reads are errors).
using ReadAtFn = std::function<absl::Status(uint64_t offset, size_t n, char* out)>;

// pread of exactly n bytes (EINTR retried; a short file is DATA_LOSS). `what` names it in errors.
absl::Status PreadExactly(int fd, uint64_t offset, size_t n, char* out, const std::string& what);

// The regular members of an archive of `size` bytes. `name` is used in errors.
absl::StatusOr<std::vector<TarMember>> IndexTar(const ReadAtFn& read_at, uint64_t size, const std::string& name);
absl::StatusOr<std::vector<TarMember>> IndexTarFile(const std::string& path);

class TarWriter {
 public:
  ~TarWriter();
  static absl::StatusOr<std::unique_ptr<TarWriter>> Create(const std::string& path);
  absl::Status Add(const std::string& name, std::string_view data);
  // The two zero blocks, fsync, rename into place.
  absl::Status Finish();
  uint64_t bytes() const { return bytes_; }

 private:
  TarWriter() = default;
  absl::Status Write(const char* p, size_t n);
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
  uint64_t bytes_ = 0;
};

}  // namespace lmsgd::data
