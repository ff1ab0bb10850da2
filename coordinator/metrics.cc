#include "coordinator/metrics.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

namespace lmsgd::coordinator {

std::string JobStateLabel(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  constexpr absl::string_view kPrefix = "JOB_STATE_";
  if (absl::StartsWith(name, kPrefix)) name = name.substr(kPrefix.size());
  return absl::AsciiStrToLower(name);
}

CoordinatorMetrics::CoordinatorMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)),
      jobs_(prometheus::BuildGauge().Name("lmsgd_coordinator_jobs").Help("Jobs by state").Register(*registry_)),
      workers_alive_(prometheus::BuildGauge()
                         .Name("lmsgd_coordinator_workers_alive")
                         .Help("Workers heard from within the heartbeat timeout, per job")
                         .Register(*registry_)),
      generation_(prometheus::BuildGauge()
                      .Name("lmsgd_coordinator_job_generation")
                      .Help("Current generation (worker-set formation) of each job")
                      .Register(*registry_)),
      epoch_(prometheus::BuildGauge()
                 .Name("lmsgd_coordinator_job_epoch")
                 .Help("Epochs completed, per job")
                 .Register(*registry_)),
      iteration_(prometheus::BuildGauge()
                     .Name("lmsgd_coordinator_job_iteration")
                     .Help("Global iteration, per job")
                     .Register(*registry_)),
      lr_(prometheus::BuildGauge()
              .Name("lmsgd_coordinator_job_learning_rate")
              .Help("Learning rate last reported by rank 0, per job")
              .Register(*registry_)),
      loss_(prometheus::BuildGauge()
                .Name("lmsgd_coordinator_job_loss")
                .Help("Training loss last reported by rank 0, per job")
                .Register(*registry_)),
      images_per_second_(prometheus::BuildGauge()
                             .Name("lmsgd_coordinator_job_images_per_second")
                             .Help("Training throughput last reported by rank 0, per job")
                             .Register(*registry_)),
      heartbeats_missed_(prometheus::BuildCounter()
                             .Name("lmsgd_coordinator_heartbeats_missed_total")
                             .Help("Workers declared dead after missing heartbeats, per job")
                             .Register(*registry_)),
      rank_step_(prometheus::BuildGauge()
                     .Name("lmsgd_rank_step_seconds")
                     .Help("A rank's mean step time by phase over its last heartbeat's steps")
                     .Register(*registry_)),
      rank_busy_ratio_(prometheus::BuildGauge()
                           .Name("lmsgd_rank_busy_ratio")
                           .Help("A rank's busy time per step (step less exposed communication) over the median rank's")
                           .Register(*registry_)),
      stragglers_(prometheus::BuildCounter()
                      .Name("lmsgd_stragglers_flagged_total")
                      .Help("Times a rank was flagged a straggler (busy above --straggler_factor x the median for "
                            "--straggler_heartbeats heartbeats)")
                      .Register(*registry_)),
      rpcs_(prometheus::BuildCounter()
                .Name("lmsgd_coordinator_rpcs_total")
                .Help("RPCs handled, by method and gRPC status code")
                .Register(*registry_)),
      rpc_latency_(prometheus::BuildHistogram()
                       .Name("lmsgd_coordinator_rpc_latency_seconds")
                       .Help("RPC handling time, by method (blocking waits included)")
                       .Register(*registry_)) {
  for (int s = v1::JOB_STATE_PENDING; s <= v1::JOB_STATE_CANCELLED; ++s) {
    jobs_.Add({{"state", JobStateLabel(static_cast<v1::JobState>(s))}}).Set(0);
  }
}

void CoordinatorMetrics::SetJobsByState(const std::map<v1::JobState, int>& counts) {
  for (int s = v1::JOB_STATE_PENDING; s <= v1::JOB_STATE_CANCELLED; ++s) {
    auto state = static_cast<v1::JobState>(s);
    auto it = counts.find(state);
    jobs_.Add({{"state", JobStateLabel(state)}}).Set(it == counts.end() ? 0 : it->second);
  }
}

void CoordinatorMetrics::SetJob(const v1::JobStatus& job, int workers_alive) {
  const prometheus::Labels labels{{"job", job.job_id()}};
  workers_alive_.Add(labels).Set(workers_alive);
  generation_.Add(labels).Set(static_cast<double>(job.generation()));
  epoch_.Add(labels).Set(job.progress().epoch());
  iteration_.Add(labels).Set(static_cast<double>(job.progress().iteration()));
  lr_.Add(labels).Set(job.progress().lr());
  loss_.Add(labels).Set(job.progress().loss());
  images_per_second_.Add(labels).Set(job.progress().images_per_second());
}

void CoordinatorMetrics::AddHeartbeatsMissed(const std::string& job_id, int n) {
  heartbeats_missed_.Add({{"job", job_id}}).Increment(n);
}

void CoordinatorMetrics::SetRankStep(const std::string& job_id, const std::string& host, int rank,
                                     const v1::StepTimeSplit& step, double busy_ratio) {
  const std::string r = std::to_string(rank);
  const std::pair<const char*, double> phases[] = {{"data_wait", step.data_wait_s()},
                                                   {"forward", step.forward_s()},
                                                   {"backward", step.backward_s()},
                                                   {"exposed_comm", step.exposed_comm_s()},
                                                   {"optimizer", step.optimizer_s()}};
  for (const auto& [phase, v] : phases) {
    rank_step_.Add({{"job", job_id}, {"rank", r}, {"host", host}, {"phase", phase}}).Set(v);
  }
  rank_busy_ratio_.Add({{"job", job_id}, {"rank", r}, {"host", host}}).Set(busy_ratio);
}

void CoordinatorMetrics::AddStraggler(const std::string& job_id, const std::string& host, int rank) {
  stragglers_.Add({{"job", job_id}, {"rank", std::to_string(rank)}, {"host", host}}).Increment();
}

void CoordinatorMetrics::ObserveRpc(const std::string& method, int grpc_code, double seconds) {
  static const char* kCodes[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                 "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const char* code = (grpc_code >= 0 && grpc_code <= 16) ? kCodes[grpc_code] : "UNKNOWN";
  rpcs_.Add({{"method", method}, {"code", code}}).Increment();
  prometheus::Histogram* h;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = latency_by_method_.find(method);
    if (it == latency_by_method_.end()) {
      h = &rpc_latency_.Add({{"method", method}},
                            prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001,
                                                                    0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30});
      latency_by_method_[method] = h;
    } else {
      h = it->second;
    }
  }
  h->Observe(seconds);
}

}  // namespace lmsgd::coordinator
