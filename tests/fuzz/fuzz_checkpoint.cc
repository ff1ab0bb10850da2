// libFuzzer target: the checkpoint (safetensors) reader.
#include <cstddef>
#include <cstdint>
#include <string>

#include "worker/checkpoint/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  (void)lmsgd::checkpoint::ParseSafetensors(bytes, "fuzz.safetensors", /*require_crc=*/false);
  (void)lmsgd::checkpoint::ParseSafetensors(bytes, "fuzz.safetensors", /*require_crc=*/true);
  return 0;
}
