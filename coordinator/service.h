// CoordinatorService: the thin gRPC adapter over JobManager. It authenticates, converts
// deadlines and statuses, and records RPC metrics; every decision lives in JobManager.
#pragma once

#include <string>

#include "coordinator/job_manager.h"
#include "coordinator/metrics.h"
#include "lmsgd/v1/coordinator.grpc.pb.h"

namespace lmsgd::coordinator {

struct ServiceOptions {
  std::string auth_token;  // empty: no token required
  // WatchJob sends the status at least this often even without changes.
  absl::Duration watch_keepalive = absl::Seconds(5);
};

class CoordinatorService final : public v1::Coordinator::Service {
 public:
  CoordinatorService(ServiceOptions options, JobManager* jobs, CoordinatorMetrics* metrics);

  grpc::Status SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* req,
                         v1::SubmitJobResponse* resp) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req, v1::JobStatus* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                        v1::ListJobsResponse* resp) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                         v1::JobStatus* resp) override;
  grpc::Status WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                        grpc::ServerWriter<v1::JobStatus>* writer) override;
  grpc::Status JoinJob(grpc::ServerContext* ctx, const v1::JoinJobRequest* req,
                       v1::JoinJobResponse* resp) override;
  grpc::Status PublishBootstrap(grpc::ServerContext* ctx, const v1::PublishBootstrapRequest* req,
                                v1::PublishBootstrapResponse* resp) override;
  grpc::Status GetBootstrap(grpc::ServerContext* ctx, const v1::GetBootstrapRequest* req,
                            v1::GetBootstrapResponse* resp) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override;
  grpc::Status ReportCheckpoint(grpc::ServerContext* ctx, const v1::ReportCheckpointRequest* req,
                                v1::ReportCheckpointResponse* resp) override;
  grpc::Status ReportEvaluation(grpc::ServerContext* ctx, const v1::ReportEvaluationRequest* req,
                                v1::ReportEvaluationResponse* resp) override;
  grpc::Status ReportEpoch(grpc::ServerContext* ctx, const v1::ReportEpochRequest* req,
                           v1::ReportEpochResponse* resp) override;
  grpc::Status ReportFailure(grpc::ServerContext* ctx, const v1::ReportFailureRequest* req,
                             v1::ReportFailureResponse* resp) override;

 private:
  // UNAUTHENTICATED unless the call carries "authorization: Bearer <token>" (when required).
  absl::Status Authenticate(const grpc::ServerContext& ctx) const;
  grpc::Status Finish(const char* method, absl::Time start, const absl::Status& status);

  ServiceOptions options_;
  JobManager* jobs_;
  CoordinatorMetrics* metrics_;
};

// The call's deadline as absl::Time, capped at `cap` from now.
absl::Time CallDeadline(const grpc::ServerContext& ctx, absl::Duration cap);

}  // namespace lmsgd::coordinator
