#include "worker/session/coordinator_client.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace lmsgd::session {
namespace {

std::unique_ptr<grpc::ClientContext> ContextUntil(absl::Time deadline) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(deadline));
  return ctx;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Create(CoordinatorClientOptions options) {
  ASSIGN_OR_RETURN(auto creds, MakeChannelCredentials(options.tls));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  const int max_reconnect_ms = static_cast<int>(absl::ToInt64Milliseconds(kMaxReconnectBackoff));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, max_reconnect_ms);  // also the minimum connect timeout
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, max_reconnect_ms);
  auto channel = grpc::CreateCustomChannel(options.address, creds, args);
  return std::unique_ptr<CoordinatorClient>(new CoordinatorClient(std::move(options), std::move(channel)));
}

CoordinatorClient::CoordinatorClient(CoordinatorClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)), channel_(std::move(channel)), stub_(v1::Coordinator::NewStub(channel_)) {}

template <typename Fn>
absl::Status CoordinatorClient::WithRetries(const char* rpc, absl::Time deadline, Fn attempt) {
  thread_local std::mt19937 rng{std::random_device{}()};
  absl::Duration backoff = absl::Milliseconds(100);
  int attempts = 0;
  while (true) {
    ++attempts;
    grpc::Status st = attempt();
    if (st.ok()) return absl::OkStatus();
    const bool transient = st.error_code() == grpc::StatusCode::UNAVAILABLE;
    const absl::Time now = absl::Now();
    if (!transient || now + backoff >= deadline) {
      return FromGrpcStatus(st, absl::StrCat(rpc, " to coordinator ", options_.address,
                                             attempts > 1 ? absl::StrCat(" (", attempts, " attempts)") : ""));
    }
    std::uniform_real_distribution<double> jitter(0.5, 1.0);
    absl::SleepFor(backoff * jitter(rng));
    backoff = std::min(backoff * 2, kMaxRetryBackoff);
  }
}

template <typename Req, typename Resp>
absl::Status CoordinatorClient::Unary(const char* rpc, UnaryMethod<Req, Resp> method, const Req& request, Resp* response,
                                      int attempts_worth) {
  // Each attempt gets rpc_timeout; retries on UNAVAILABLE for up to `attempts_worth` of them.
  const absl::Time deadline = absl::Now() + options_.rpc_timeout * attempts_worth;
  return WithRetries(rpc, deadline, [&] {
    auto ctx = ContextUntil(std::min(deadline, absl::Now() + options_.rpc_timeout));
    return (stub_.get()->*method)(ctx.get(), request, response);
  });
}

absl::StatusOr<v1::JoinJobResponse> CoordinatorClient::Join(const v1::WorkerIdentity& identity,
                                                            const std::string& job_id, absl::Time deadline,
                                                            uint64_t last_generation) {
  v1::JoinJobResponse resp;
  while (true) {
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "JoinJob to coordinator ", options_.address, ": no rank assigned before the deadline (",
          resp.joined(), " of ", resp.needed(), " workers had joined job '", resp.job_id(), "')"));
    }
    // One server-side wait of at most 30 s per call.
    const absl::Duration wait = std::min(deadline - now, absl::Seconds(30));
    v1::JoinJobRequest req;
    *req.mutable_identity() = identity;
    req.set_job_id(job_id);
    req.set_max_wait_s(absl::ToDoubleSeconds(wait));
    req.set_last_generation(last_generation);
    v1::JoinJobResponse r;
    RETURN_IF_ERROR(WithRetries("JoinJob", deadline, [&] {
      auto ctx = ContextUntil(absl::Now() + wait + absl::Seconds(5));
      r.Clear();
      return stub_->JoinJob(ctx.get(), req, &r);
    }));
    if (r.assigned()) return r;
    resp = r;
  }
}

absl::Status CoordinatorClient::PublishBootstrap(const std::string& job_id, uint64_t generation, int rank,
                                                 const std::string& key, const std::string& value) {
  v1::PublishBootstrapRequest req;
  req.set_job_id(job_id);
  req.set_generation(generation);
  req.set_rank(rank);
  req.set_key(key);
  req.set_value(value);
  v1::PublishBootstrapResponse resp;
  return Unary("PublishBootstrap", &v1::Coordinator::Stub::PublishBootstrap, req, &resp, 3);
}

absl::StatusOr<std::vector<std::string>> CoordinatorClient::GetBootstrap(const std::string& job_id,
                                                                         uint64_t generation,
                                                                         const std::string& key,
                                                                         absl::Duration timeout) {
  v1::GetBootstrapRequest req;
  req.set_job_id(job_id);
  req.set_generation(generation);
  req.set_key(key);
  req.set_timeout_s(absl::ToDoubleSeconds(timeout));
  const absl::Time deadline = absl::Now() + timeout + absl::Seconds(2);
  v1::GetBootstrapResponse resp;
  RETURN_IF_ERROR(WithRetries("GetBootstrap", deadline, [&] {
    resp.Clear();
    auto ctx = ContextUntil(deadline);
    return stub_->GetBootstrap(ctx.get(), req, &resp);
  }));
  std::vector<std::string> values;
  for (const auto& e : resp.entries()) {
    if (e.rank() != static_cast<int>(values.size())) {
      return absl::InternalError(absl::StrCat("GetBootstrap: coordinator returned rank ", e.rank(),
                                              " out of order"));
    }
    values.push_back(e.value());
  }
  return values;
}

absl::StatusOr<v1::HeartbeatResponse> CoordinatorClient::Heartbeat(const v1::HeartbeatRequest& request) {
  v1::HeartbeatResponse resp;
  auto ctx = ContextUntil(absl::Now() + options_.rpc_timeout);
  grpc::Status st = stub_->Heartbeat(ctx.get(), request, &resp);
  RETURN_IF_ERROR(FromGrpcStatus(st, absl::StrCat("Heartbeat to coordinator ", options_.address)));
  return resp;
}

absl::Status CoordinatorClient::ReportCheckpoint(const v1::ReportCheckpointRequest& request) {
  v1::ReportCheckpointResponse resp;
  return Unary("ReportCheckpoint", &v1::Coordinator::Stub::ReportCheckpoint, request, &resp, 3);
}

absl::Status CoordinatorClient::ReportEpoch(const v1::ReportEpochRequest& request) {
  v1::ReportEpochResponse resp;
  return Unary("ReportEpoch", &v1::Coordinator::Stub::ReportEpoch, request, &resp, 3);
}

absl::Status CoordinatorClient::ReportEvaluation(const v1::ReportEvaluationRequest& request) {
  v1::ReportEvaluationResponse resp;
  return Unary("ReportEvaluation", &v1::Coordinator::Stub::ReportEvaluation, request, &resp, 3);
}

absl::Status CoordinatorClient::ReportFailure(const v1::ReportFailureRequest& request) {
  v1::ReportFailureResponse resp;
  return Unary("ReportFailure", &v1::Coordinator::Stub::ReportFailure, request, &resp, 1);
}

}  // namespace lmsgd::session
