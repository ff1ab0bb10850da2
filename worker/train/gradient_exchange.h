// How a trainer sums its gradients over the k workers of a generation: the one way in is
// Trainer::ConnectPeers(PeerGroup).
//
//  * CPU trainers report each parameter's final gradient to a GradientExchange as backward
//    produces it (reverse layer order) and call Finish() before the optimizer. The exchange
//    built from a PeerGroup is BucketedExchange: buckets of contiguous gradients allreduced by
//    the host Communicator (UCX / shared memory, c lanes) while backward continues
//    (comm/bucketer.h has the bucket layout and order).
//  * GPU trainers keep the gradients on the device: from the same PeerGroup they bootstrap an
//    NCCL communicator (its unique id through `store`) and allreduce device buckets on its
//    stream (backend/cuda/device_step.h).
// Either way the buckets are the same (model/buckets.h: bucket_bytes, first_bucket_bytes), the
// loss is normalized by the global kn so no scaling pass runs, and every wait has a deadline.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "worker/comm/algorithms/allreduce.h"
#include "worker/model/param_store.h"

namespace lmsgd::comm {
class Communicator;
class Store;
class GradientBuckets;
}  // namespace lmsgd::comm

namespace lmsgd::train {

// The workers of one generation, as a trainer needs them to sum gradients.
struct PeerGroup {
  uint32_t rank = 0, world_size = 1;
  comm::Communicator* communicator = nullptr;  // host collectives (CPU gradients)
  comm::Store* store = nullptr;                // bootstrap of a device library (NCCL unique id)
  std::string key_prefix;                      // scopes the store's keys, e.g. "gen3"
  absl::Time bootstrap_deadline = absl::InfiniteFuture();
  size_t bucket_bytes = 25u << 20;             // 0: the default
  size_t first_bucket_bytes = 1u << 20;        // 0: the default
  absl::Duration collective_timeout = absl::Seconds(60);  // also bounds a step's wait for its buckets
  comm::WireDtype gradient_wire = comm::WireDtype::kFp32;  // JobSpec gradient_exchange_dtype
};

// Sums host gradients across workers. GradReady(i) is called once per parameter per step, in
// reverse layer order, when grads[i] is final locally; Finish() returns when every gradient
// holds the sum over all workers (or an error naming what failed or timed out).
class GradientExchange {
 public:
  virtual ~GradientExchange() = default;
  virtual void GradReady(size_t param_index) = 0;
  virtual absl::Status Finish() = 0;
  virtual uint64_t bytes_reduced() const = 0;
  virtual std::string Describe() const = 0;
};

// Buckets over peers.communicator (the CPU trainers' exchange).
class BucketedExchange final : public GradientExchange {
 public:
  BucketedExchange(const PeerGroup& peers, model::ParamStore* store);
  ~BucketedExchange() override;
  void GradReady(size_t param_index) override;
  absl::Status Finish() override;
  uint64_t bytes_reduced() const override;
  std::string Describe() const override;

 private:
  std::unique_ptr<comm::GradientBuckets> buckets_;
};

}  // namespace lmsgd::train
