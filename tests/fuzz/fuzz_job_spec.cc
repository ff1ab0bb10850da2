// libFuzzer target: the job-file parser and validator (text proto and JSON) must return a
// Status for any input, never crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/job_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const char* name : {"job.textproto", "job.json"}) {
    auto spec = lmsgd::ParseJobSpec(name, text);
    if (spec.ok()) {
      lmsgd::ApplyDefaults(&*spec);
      if (lmsgd::ValidateJobSpec(*spec).ok()) (void)lmsgd::MakeSchedule(*spec, spec->world_size());
    }
  }
  return 0;
}
