// Every coordinator metric, declared in one place. Names: lmsgd_coordinator_<what>_<unit>.
//
//   lmsgd_coordinator_jobs{state}                         gauge: jobs in each state
//   lmsgd_coordinator_workers_alive{job}                  gauge: workers heard from within the timeout
//   lmsgd_coordinator_job_generation{job}                 gauge
//   lmsgd_coordinator_job_epoch{job}                      gauge: epochs completed
//   lmsgd_coordinator_job_iteration{job}                  gauge: global iteration
//   lmsgd_coordinator_job_learning_rate{job}              gauge: the rate rank 0 last reported
//   lmsgd_coordinator_job_loss{job}                       gauge: training loss rank 0 last reported
//   lmsgd_coordinator_job_images_per_second{job}          gauge
//   lmsgd_coordinator_heartbeats_missed_total{job}        counter: workers declared dead
//   lmsgd_coordinator_rpcs_total{method,code}             counter
//   lmsgd_coordinator_rpc_latency_seconds{method}         histogram
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "lmsgd/v1/job.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace lmsgd::coordinator {

class CoordinatorMetrics {
 public:
  explicit CoordinatorMetrics(std::shared_ptr<prometheus::Registry> registry);

  void SetJobsByState(const std::map<v1::JobState, int>& counts);
  void SetJob(const v1::JobStatus& job, int workers_alive);
  void AddHeartbeatsMissed(const std::string& job_id, int n);
  // A rank's mean step split from its last heartbeat (phase: data_wait, forward, backward,
  // exposed_comm, optimizer), its busy time over the median rank's, and a straggler flagged.
  void SetRankStep(const std::string& job_id, const std::string& host, int rank, const v1::StepTimeSplit& step,
                   double busy_ratio);
  void AddStraggler(const std::string& job_id, const std::string& host, int rank);
  void ObserveRpc(const std::string& method, int grpc_code, double seconds);

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Gauge>& jobs_;
  prometheus::Family<prometheus::Gauge>& workers_alive_;
  prometheus::Family<prometheus::Gauge>& generation_;
  prometheus::Family<prometheus::Gauge>& epoch_;
  prometheus::Family<prometheus::Gauge>& iteration_;
  prometheus::Family<prometheus::Gauge>& lr_;
  prometheus::Family<prometheus::Gauge>& loss_;
  prometheus::Family<prometheus::Gauge>& images_per_second_;
  prometheus::Family<prometheus::Counter>& heartbeats_missed_;
  prometheus::Family<prometheus::Gauge>& rank_step_;
  prometheus::Family<prometheus::Gauge>& rank_busy_ratio_;
  prometheus::Family<prometheus::Counter>& stragglers_;
  prometheus::Family<prometheus::Counter>& rpcs_;
  prometheus::Family<prometheus::Histogram>& rpc_latency_;
  std::mutex mu_;
  std::map<std::string, prometheus::Histogram*> latency_by_method_;
};

// Lower-case state name used as the `state` label ("running", "succeeded", ...).
std::string JobStateLabel(v1::JobState state);

}  // namespace lmsgd::coordinator
