// Gradient buckets over a ParamStore (shared by the CPU reducer, comm/bucketer.h, and the GPU
// trainer): the parameters taken in reverse order and grouped until a bucket reaches its byte
// cap are contiguous slices of the flat gradient array (Note [Bucket layout] in
// comm/bucketer.h), so each bucket is allreduced in place.
#pragma once

#include <cstddef>
#include <vector>

#include "worker/model/param_store.h"

namespace lmsgd::model {

struct Bucket {
  size_t first_param = 0, end_param = 0;  // parameters [first, end) in store order
  size_t offset = 0, count = 0;           // the slice of the flat gradient array
};

// Buckets over `store`'s parameters in reverse order: the first capped at first_bucket_bytes,
// the others at bucket_bytes (a parameter larger than the cap gets a bucket of its own).
std::vector<Bucket> MakeBuckets(const ParamStore& store, size_t bucket_bytes, size_t first_bucket_bytes);

}  // namespace lmsgd::model
