#include "worker/model/buckets.h"

namespace lmsgd::model {

std::vector<Bucket> MakeBuckets(const ParamStore& store, size_t bucket_bytes, size_t first_bucket_bytes) {
  std::vector<Bucket> out;
  const size_t n = store.num_params();
  size_t end = n;  // exclusive, walking down
  while (end > 0) {
    const size_t cap = out.empty() ? first_bucket_bytes : bucket_bytes;
    size_t first = end;
    size_t bytes = 0;
    while (first > 0) {
      const size_t b = static_cast<size_t>(store.param_specs()[first - 1].numel()) * sizeof(float);
      if (first != end && bytes + b > cap) break;
      bytes += b;
      --first;
    }
    Bucket bk;
    bk.first_param = first;
    bk.end_param = end;
    bk.offset = static_cast<size_t>(store.param_offset(first));
    bk.count = bytes / sizeof(float);
    out.push_back(bk);
    end = first;
  }
  return out;
}

}  // namespace lmsgd::model
