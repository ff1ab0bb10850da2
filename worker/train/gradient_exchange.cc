#include "worker/train/gradient_exchange.h"

#include "absl/strings/str_format.h"
#include "worker/comm/bucketer.h"

namespace lmsgd::train {

BucketedExchange::BucketedExchange(const PeerGroup& peers, model::ParamStore* store)
    : buckets_(std::make_unique<comm::GradientBuckets>(
          peers.communicator, store, peers.bucket_bytes > 0 ? peers.bucket_bytes : size_t{25} << 20,
          peers.first_bucket_bytes > 0 ? peers.first_bucket_bytes : size_t{1} << 20,
          peers.collective_timeout, peers.gradient_wire)) {}

BucketedExchange::~BucketedExchange() = default;

void BucketedExchange::GradReady(size_t param_index) { buckets_->GradReady(param_index); }
absl::Status BucketedExchange::Finish() { return buckets_->Finish(); }
uint64_t BucketedExchange::bytes_reduced() const { return buckets_->bytes_reduced(); }

std::string BucketedExchange::Describe() const {
  return absl::StrFormat("gradients in %d buckets on %d allreduce lane(s)%s", buckets_->buckets().size(),
                         buckets_->lanes(), buckets_->wire() == comm::WireDtype::kBf16 ? ", bf16 on the wire" : "");
}

}  // namespace lmsgd::train
