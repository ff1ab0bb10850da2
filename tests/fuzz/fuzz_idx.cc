// libFuzzer target: the IDX (MNIST) parser.
#include <cstddef>
#include <cstdint>
#include <string>

#include "worker/data/idx.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)lmsgd::data::ParseIdx(std::string(reinterpret_cast<const char*>(data), size), "fuzz.idx");
  return 0;
}
