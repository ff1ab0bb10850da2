#include "worker/session/metrics.h"

namespace lmsgd::session {

WorkerMetrics::WorkerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      images_per_second_(prometheus::BuildGauge()
                             .Name("lmsgd_worker_images_per_second")
                             .Help("This worker's training images per second over the current epoch")
                             .Register(*registry_)),
      phase_seconds_(prometheus::BuildCounter()
                         .Name("lmsgd_worker_step_phase_seconds_total")
                         .Help("Seconds spent per step phase: data_wait, forward, backward, exposed_communication, "
                               "optimizer")
                         .Register(*registry_)),
      steps_(prometheus::BuildCounter().Name("lmsgd_worker_steps_total").Help("Training steps").Register(*registry_)),
      allreduce_bytes_(prometheus::BuildCounter()
                           .Name("lmsgd_worker_allreduce_bytes_total")
                           .Help("Gradient bytes allreduced")
                           .Register(*registry_)),
      loss_(prometheus::BuildGauge()
                .Name("lmsgd_worker_loss")
                .Help("This worker's share of the last step's loss times k")
                .Register(*registry_)),
      lr_(prometheus::BuildGauge().Name("lmsgd_worker_learning_rate").Help("Learning rate").Register(*registry_)),
      epoch_(prometheus::BuildGauge().Name("lmsgd_worker_epoch").Help("Epochs completed").Register(*registry_)),
      iteration_(prometheus::BuildGauge().Name("lmsgd_worker_iteration").Help("Global iteration").Register(*registry_)),
      generation_(prometheus::BuildGauge().Name("lmsgd_worker_generation").Help("Generation").Register(*registry_)),
      top1_(prometheus::BuildGauge()
                .Name("lmsgd_worker_eval_top1_error")
                .Help("Top-1 error of the last evaluation")
                .Register(*registry_)),
      top5_(prometheus::BuildGauge()
                .Name("lmsgd_worker_eval_top5_error")
                .Help("Top-5 error of the last evaluation")
                .Register(*registry_)),
      corrupt_(prometheus::BuildCounter()
                   .Name("lmsgd_worker_corrupt_examples_total")
                   .Help("Unreadable examples skipped (dataset.skip_corrupt)")
                   .Register(*registry_)) {}

void WorkerMetrics::SetIdentity(const std::string& job, int rank, uint64_t generation) {
  labels_ = {{"job", job}, {"rank", std::to_string(rank)}};
  generation_.Add(labels_).Set(static_cast<double>(generation));
}

void WorkerMetrics::ObserveStep(double data_wait_s, double forward_s, double backward_s, double exposed_comm_s,
                                double optimizer_s, double loss, double lr, uint64_t iteration,
                                double images_per_second) {
  auto phase = [&](const char* name, double v) {
    prometheus::Labels l = labels_;
    l["phase"] = name;
    phase_seconds_.Add(l).Increment(v);
  };
  phase("data_wait", data_wait_s);
  phase("forward", forward_s);
  phase("backward", backward_s);
  phase("exposed_communication", exposed_comm_s);
  phase("optimizer", optimizer_s);
  steps_.Add(labels_).Increment();
  loss_.Add(labels_).Set(loss);
  lr_.Add(labels_).Set(lr);
  iteration_.Add(labels_).Set(static_cast<double>(iteration));
  images_per_second_.Add(labels_).Set(images_per_second);
}

void WorkerMetrics::AddAllreduceBytes(uint64_t bytes) { allreduce_bytes_.Add(labels_).Increment(static_cast<double>(bytes)); }
void WorkerMetrics::SetEpoch(uint32_t epochs_done) { epoch_.Add(labels_).Set(epochs_done); }
void WorkerMetrics::SetEvaluation(double top1_error, double top5_error) {
  top1_.Add(labels_).Set(top1_error);
  top5_.Add(labels_).Set(top5_error);
}
void WorkerMetrics::AddCorrupt(int64_t n) {
  if (n > 0) corrupt_.Add(labels_).Increment(static_cast<double>(n));
}

}  // namespace lmsgd::session
