#include "coordinator/service.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/logging.h"

namespace lmsgd::coordinator {

absl::Time CallDeadline(const grpc::ServerContext& ctx, absl::Duration cap) {
  absl::Time capped = absl::Now() + cap;
  auto d = ctx.deadline();
  if (d == std::chrono::system_clock::time_point::max()) return capped;
  return std::min(capped, absl::FromChrono(d));
}

CoordinatorService::CoordinatorService(ServiceOptions options, JobManager* jobs, CoordinatorMetrics* metrics)
    : options_(std::move(options)), jobs_(jobs), metrics_(metrics) {}

absl::Status CoordinatorService::Authenticate(const grpc::ServerContext& ctx) const {
  if (options_.auth_token.empty()) return absl::OkStatus();
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError("this coordinator requires 'authorization: Bearer <token>'");
  }
  absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWith(value, kBearer) ||
      !SecureEquals(value.substr(kBearer.size()), options_.auth_token)) {
    return absl::UnauthenticatedError("invalid bearer token");
  }
  return absl::OkStatus();
}

grpc::Status CoordinatorService::Finish(const char* method, absl::Time start, const absl::Status& status) {
  if (metrics_ != nullptr) {
    metrics_->ObserveRpc(method, static_cast<int>(status.code()), absl::ToDoubleSeconds(absl::Now() - start));
  }
  if (!status.ok() && status.code() != absl::StatusCode::kNotFound &&
      status.code() != absl::StatusCode::kAborted && status.code() != absl::StatusCode::kUnauthenticated) {
    LOG(WARNING) << method << ": " << status;
  }
  return ToGrpcStatus(status);
}

grpc::Status CoordinatorService::SubmitJob(grpc::ServerContext* ctx, const v1::SubmitJobRequest* req,
                                           v1::SubmitJobResponse* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = Authenticate(*ctx);
  if (st.ok()) {
    auto job = jobs_->Submit(req->spec());
    if (job.ok()) {
      resp->set_job_id(job->job_id());
      *resp->mutable_status() = *std::move(job);
    } else {
      st = job.status();
    }
  }
  return Finish("SubmitJob", start, st);
}

grpc::Status CoordinatorService::GetJob(grpc::ServerContext*, const v1::GetJobRequest* req, v1::JobStatus* resp) {
  const absl::Time start = absl::Now();
  auto job = jobs_->Get(req->job_id());
  if (job.ok()) *resp = *std::move(job);
  return Finish("GetJob", start, job.status());
}

grpc::Status CoordinatorService::ListJobs(grpc::ServerContext*, const v1::ListJobsRequest* req,
                                          v1::ListJobsResponse* resp) {
  const absl::Time start = absl::Now();
  for (auto& j : jobs_->List(req->include_finished())) *resp->add_jobs() = std::move(j);
  return Finish("ListJobs", start, absl::OkStatus());
}

grpc::Status CoordinatorService::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                                           v1::JobStatus* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = Authenticate(*ctx);
  if (st.ok()) {
    auto job = jobs_->Cancel(req->job_id(), req->reason());
    if (job.ok()) *resp = *std::move(job);
    st = job.status();
  }
  return Finish("CancelJob", start, st);
}

grpc::Status CoordinatorService::WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                                          grpc::ServerWriter<v1::JobStatus>* writer) {
  const absl::Time start = absl::Now();
  uint64_t version = 0;
  absl::Status st;
  absl::Time last_sent = absl::InfinitePast();
  while (!ctx->IsCancelled()) {
    // Short waits so that a cancelled call or a shutdown is noticed promptly.
    auto upd = jobs_->WaitForUpdate(req->job_id(), version, absl::Now() + absl::Milliseconds(500));
    if (!upd.ok()) {
      st = upd.status();
      break;
    }
    const bool changed = upd->first != version;
    if (changed || absl::Now() - last_sent >= options_.watch_keepalive) {
      if (!writer->Write(upd->second)) break;  // client went away
      last_sent = absl::Now();
      version = upd->first;
      auto s = upd->second.state();
      if (s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED) break;
      absl::SleepFor(absl::Milliseconds(100));  // at most ~10 updates per second
    }
  }
  return Finish("WatchJob", start, st);
}

grpc::Status CoordinatorService::JoinJob(grpc::ServerContext* ctx, const v1::JoinJobRequest* req,
                                         v1::JoinJobResponse* resp) {
  const absl::Time start = absl::Now();
  absl::Duration cap = absl::Seconds(req->max_wait_s() > 0 ? std::min(req->max_wait_s(), 3600.0) : 30.0);
  // Answer a little before the client's deadline so that it gets the reply, not a timeout.
  absl::Time deadline = CallDeadline(*ctx, cap + absl::Milliseconds(500)) - absl::Milliseconds(500);
  auto r = jobs_->Join(*req, deadline);
  if (r.ok()) *resp = *std::move(r);
  return Finish("JoinJob", start, r.status());
}

grpc::Status CoordinatorService::PublishBootstrap(grpc::ServerContext*, const v1::PublishBootstrapRequest* req,
                                                  v1::PublishBootstrapResponse*) {
  const absl::Time start = absl::Now();
  return Finish("PublishBootstrap", start, jobs_->PublishBootstrap(*req));
}

grpc::Status CoordinatorService::GetBootstrap(grpc::ServerContext* ctx, const v1::GetBootstrapRequest* req,
                                              v1::GetBootstrapResponse* resp) {
  const absl::Time start = absl::Now();
  auto r = jobs_->GetBootstrap(*req, CallDeadline(*ctx, absl::Hours(1)) - absl::Milliseconds(200));
  if (r.ok()) *resp = *std::move(r);
  return Finish("GetBootstrap", start, r.status());
}

grpc::Status CoordinatorService::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req,
                                           v1::HeartbeatResponse* resp) {
  const absl::Time start = absl::Now();
  auto r = jobs_->Heartbeat(*req);
  if (r.ok()) *resp = *std::move(r);
  return Finish("Heartbeat", start, r.status());
}

grpc::Status CoordinatorService::ReportCheckpoint(grpc::ServerContext*, const v1::ReportCheckpointRequest* req,
                                                  v1::ReportCheckpointResponse*) {
  const absl::Time start = absl::Now();
  return Finish("ReportCheckpoint", start, jobs_->ReportCheckpoint(*req));
}

grpc::Status CoordinatorService::ReportEvaluation(grpc::ServerContext*, const v1::ReportEvaluationRequest* req,
                                                  v1::ReportEvaluationResponse*) {
  const absl::Time start = absl::Now();
  return Finish("ReportEvaluation", start, jobs_->ReportEvaluation(*req));
}

grpc::Status CoordinatorService::ReportEpoch(grpc::ServerContext*, const v1::ReportEpochRequest* req,
                                             v1::ReportEpochResponse*) {
  const absl::Time start = absl::Now();
  return Finish("ReportEpoch", start, jobs_->ReportEpoch(*req));
}

grpc::Status CoordinatorService::ReportFailure(grpc::ServerContext*, const v1::ReportFailureRequest* req,
                                               v1::ReportFailureResponse*) {
  const absl::Time start = absl::Now();
  return Finish("ReportFailure", start, jobs_->ReportFailure(*req));
}

}  // namespace lmsgd::coordinator
