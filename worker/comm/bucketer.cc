#include "worker/comm/bucketer.h"

#include "absl/strings/str_cat.h"

namespace lmsgd::comm {

GradientBuckets::GradientBuckets(Communicator* comm, model::ParamStore* store, size_t bucket_bytes,
                                 size_t first_bucket_bytes, absl::Duration finish_timeout, WireDtype wire)
    : comm_(comm), store_(store), finish_timeout_(finish_timeout), wire_(wire) {
  buckets_ = model::MakeBuckets(*store, bucket_bytes, first_bucket_bytes);
  bucket_of_param_.assign(store->num_params(), -1);
  for (size_t b = 0; b < buckets_.size(); ++b) {
    for (size_t p = buckets_[b].first_param; p < buckets_[b].end_param; ++p) bucket_of_param_[p] = static_cast<int>(b);
  }
  pending_.resize(buckets_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].end_param - buckets_[b].first_param;
}

void GradientBuckets::GradReady(size_t p) {
  const int b = bucket_of_param_[p];
  if (--pending_[b] != 0) return;
  const model::Bucket& bk = buckets_[b];
  works_.push_back(comm_->AllreduceAsync(store_->grads().data() + bk.offset, bk.count, wire_));
  bytes_reduced_ += bk.count * (wire_ == WireDtype::kBf16 ? sizeof(uint16_t) : sizeof(float));
}

absl::Status GradientBuckets::Finish() {
  absl::Status result;
  if (works_.size() != buckets_.size()) {
    result = absl::InternalError(absl::StrCat("only ", works_.size(), " of ", buckets_.size(),
                                              " gradient buckets were started this step"));
  }
  const absl::Time deadline = absl::Now() + finish_timeout_;
  for (auto& w : works_) {
    absl::Status st = w->Wait(deadline);
    if (result.ok() && !st.ok()) result = st;
  }
  works_.clear();
  for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].end_param - buckets_[b].first_param;
  return result;
}

int GradientBuckets::lanes() const { return comm_->lanes(); }

}  // namespace lmsgd::comm
