// Every worker metric, declared in one place. Names: lmsgd_worker_<what>_<unit>; labels job
// and rank on each.
//
//   lmsgd_worker_images_per_second               gauge: this worker's rate over the current epoch
//   lmsgd_worker_step_phase_seconds_total{phase} counter: time per step phase, summed:
//       data_wait (waiting for the loader), forward, backward, exposed_communication (waiting
//       for gradient buckets after backward: the part of the allreduce NOT hidden by it),
//       optimizer
//   lmsgd_worker_steps_total                     counter
//   lmsgd_worker_allreduce_bytes_total           counter: gradient bytes allreduced
//   lmsgd_worker_loss                            gauge: this worker's share of the last step's loss x k
//   lmsgd_worker_learning_rate                   gauge
//   lmsgd_worker_epoch                           gauge: epochs completed
//   lmsgd_worker_iteration                       gauge: global iteration
//   lmsgd_worker_generation                      gauge
//   lmsgd_worker_eval_top1_error                 gauge: last evaluation (whole validation set)
//   lmsgd_worker_eval_top5_error                 gauge
//   lmsgd_worker_corrupt_examples_total          counter: unreadable examples skipped
#pragma once

#include <memory>
#include <string>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace lmsgd::session {

class WorkerMetrics {
 public:
  WorkerMetrics();
  // (Re)labels every series for a generation: job and rank.
  void SetIdentity(const std::string& job, int rank, uint64_t generation);
  void ObserveStep(double data_wait_s, double forward_s, double backward_s, double exposed_comm_s, double optimizer_s,
                   double loss, double lr, uint64_t iteration, double images_per_second);
  void AddAllreduceBytes(uint64_t bytes);
  void SetEpoch(uint32_t epochs_done);
  void SetEvaluation(double top1_error, double top5_error);
  void AddCorrupt(int64_t n);
  std::shared_ptr<prometheus::Registry> registry() { return registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Gauge>& images_per_second_;
  prometheus::Family<prometheus::Counter>& phase_seconds_;
  prometheus::Family<prometheus::Counter>& steps_;
  prometheus::Family<prometheus::Counter>& allreduce_bytes_;
  prometheus::Family<prometheus::Gauge>& loss_;
  prometheus::Family<prometheus::Gauge>& lr_;
  prometheus::Family<prometheus::Gauge>& epoch_;
  prometheus::Family<prometheus::Gauge>& iteration_;
  prometheus::Family<prometheus::Gauge>& generation_;
  prometheus::Family<prometheus::Gauge>& top1_;
  prometheus::Family<prometheus::Gauge>& top5_;
  prometheus::Family<prometheus::Counter>& corrupt_;
  prometheus::Labels labels_;
};

}  // namespace lmsgd::session
