// Gradient buckets allreduced while backward runs (after PyTorch DDP's reducer).
//
// Note [Bucket layout]: the ParamStore keeps all gradients in ONE flat array in torchvision's
// parameter order, so the parameters taken in reverse order and grouped until a bucket reaches
// its byte cap form contiguous slices of that array. Each bucket is allreduced in place on its
// slice: no copy in, no copy out. The loss is already normalized by the global kn (the 1/kn
// scale is folded into the loss gradient), so no scaling pass is needed either.
//
// Note [Bucket order]: a bucket starts as soon as all of its parameters are reported ready.
// Backward reports parameters in the same order on every rank, so buckets start in the same
// order everywhere, which the FIFO communicator requires. The first bucket (the last layers,
// whose gradients are ready first) has a smaller cap so that communication starts early.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "worker/comm/communicator.h"
#include "worker/model/buckets.h"
#include "worker/model/param_store.h"

namespace lmsgd::comm {

// Not thread-safe: one step at a time, from the thread that runs backward.
class GradientBuckets {
 public:
  GradientBuckets(Communicator* comm, model::ParamStore* store, size_t bucket_bytes, size_t first_bucket_bytes,
                  absl::Duration finish_timeout = absl::Seconds(120), WireDtype wire = WireDtype::kFp32);
  WireDtype wire() const { return wire_; }
  // Parameter `param_index`'s gradient is final: its bucket starts once all of it is.
  void GradReady(size_t param_index);
  // Waits (finish_timeout) for every bucket of the step; the first error, naming what failed.
  absl::Status Finish();
  const std::vector<model::Bucket>& buckets() const { return buckets_; }
  uint64_t bytes_reduced() const { return bytes_reduced_; }
  int lanes() const;

 private:
  Communicator* comm_;
  model::ParamStore* store_;
  absl::Duration finish_timeout_;
  WireDtype wire_;
  std::vector<model::Bucket> buckets_;
  std::vector<int> bucket_of_param_;
  std::vector<size_t> pending_;  // per bucket: parameters not yet ready this step
  std::vector<std::shared_ptr<Work>> works_;
  uint64_t bytes_reduced_ = 0;
};

}  // namespace lmsgd::comm
