// One data-parallel training step on a GPU, entirely on the device (the paper's per-GPU
// worker): forward, backward with each gradient bucket allreduced by NCCL on the
// communicator's stream as soon as backward has enqueued its last gradient (events only, no
// host synchronization), then the fused SGD kernel on the compute stream once every bucket is
// done. The host waits only where it asks for a result (LastLoss, Finish), always with a
// deadline; a failed or timed-out collective aborts the communicator and the Status names it.
//
// Without a communicator (one GPU, or the throughput benchmark) the step is the same minus the
// allreduce. The loss is normalized by the global kn (network.h), so summed gradients are
// the gradient of the mean loss and no scaling pass runs.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/backend/cuda/kernels.h"
#include "worker/backend/cuda/resnet.h"
#include "worker/model/buckets.h"
#include "worker/optim/sgd.h"

namespace lmsgd::comm {
class NcclCommunicator;
}

namespace lmsgd::backend::cuda {

struct DeviceStepOptions {
  optim::SgdConfig sgd;
  size_t bucket_bytes = 25u << 20;
  size_t first_bucket_bytes = 1u << 20;
  // Buckets go to NCCL as bf16 (ncclBfloat16): cast into a bf16 copy on the communicator's
  // stream, summed, cast back; the update stays fp32.
  bool bf16_gradients = false;
};

class DeviceStep {
 public:
  // `net` and `nccl` (may be null: no allreduce) must outlive the trainer.
  static absl::StatusOr<std::unique_ptr<DeviceStep>> Create(GpuResNet* net, comm::NcclCommunicator* nccl,
                                                            const DeviceStepOptions& options);
  ~DeviceStep();

  // Enqueues one step on the batch staged with net->StageBatch: forward (loss / normalizer),
  // backward + bucketed allreduce, SGD with learning rate `lr` and momentum correction
  // `correction`. Returns once enqueued.
  absl::Status Step(double normalizer, double lr, double correction);
  // Waits (deadline) for the last step, checking NCCL's error state; returns its loss.
  absl::StatusOr<double> Finish();

  // Optimizer state (velocities, flat, in the device order of resnet.h: conv weights KRSC)
  // to and from the host.
  absl::Status DownloadVelocity(std::vector<float>* velocity);
  absl::Status UploadVelocity(const std::vector<float>& velocity);
  const std::vector<model::Bucket>& buckets() const { return buckets_; }

 private:
  DeviceStep() = default;
  GpuResNet* net_ = nullptr;
  comm::NcclCommunicator* nccl_ = nullptr;
  DeviceStepOptions options_;
  std::vector<model::Bucket> buckets_;
  std::vector<int> bucket_of_param_;
  std::vector<size_t> pending_;
  std::vector<cudaEvent_t> ready_, done_;
  uint16_t* wire_ = nullptr;  // bf16_gradients: the bf16 copy of the gradients
  size_t started_ = 0;
  float* velocity_ = nullptr;
  ::lmsgd::backend::cuda::SgdChunk* chunks_ = nullptr;
  int num_chunks_ = 0;
  absl::Status step_status_;
};

}  // namespace lmsgd::backend::cuda
