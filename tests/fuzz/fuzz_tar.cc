// libFuzzer target: the tar index (headers, checksums, pax records, GNU long names) over an
// archive held in memory.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "worker/data/tar.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto read_at = [&](uint64_t off, size_t n, char* out) -> absl::Status {
    if (off > size || n > size - off) return absl::DataLossError("read past the end");
    std::memcpy(out, data + off, n);
    return absl::OkStatus();
  };
  auto members = lmsgd::data::IndexTar(read_at, size, "fuzz.tar");
  if (members.ok()) {
    for (const auto& m : *members) {
      if (m.offset + m.size > size) __builtin_trap();  // the index never points outside the archive
    }
  }
  return 0;
}
