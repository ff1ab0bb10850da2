// CoordinatorClient: a worker's side of the control plane (proto/lmsgd/v1/coordinator.proto).
//
// Every call has a deadline. Transient failures (UNAVAILABLE: the coordinator is restarting
// or not yet up) are retried with exponential backoff (100 ms doubling to kMaxRetryBackoff,
// jittered) until the call's overall deadline; other errors return at once. Errors name the
// coordinator address and the RPC.
//
// The channel's own reconnect backoff is bounded the same way (gRPC's default grows to 120 s):
// a worker reaches a restarted coordinator within about kMaxRetryBackoff + kMaxReconnectBackoff
// of it serving again, which the coordinator's restart grace (JobManagerOptions::restart_grace)
// covers, so a restart never makes a live worker look dead.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "lmsgd/v1/coordinator.grpc.pb.h"

namespace lmsgd::session {

constexpr absl::Duration kMaxRetryBackoff = absl::Seconds(1);
constexpr absl::Duration kMaxReconnectBackoff = absl::Seconds(1);

struct CoordinatorClientOptions {
  std::string address = "127.0.0.1:7070";
  TlsFiles tls;
  absl::Duration rpc_timeout = absl::Seconds(10);  // per attempt of a non-blocking RPC
};

class CoordinatorClient {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Create(CoordinatorClientOptions options);

  // Calls JoinJob until a rank is assigned or `deadline` passes (DEADLINE_EXCEEDED saying how
  // many workers had joined). FAILED_PRECONDITION/NOT_FOUND from the coordinator are final.
  // `last_generation`: the generation this worker last trained in (0: none); see JoinJobRequest.
  absl::StatusOr<v1::JoinJobResponse> Join(const v1::WorkerIdentity& identity, const std::string& job_id,
                                           absl::Time deadline, uint64_t last_generation = 0);
  absl::Status PublishBootstrap(const std::string& job_id, uint64_t generation, int rank,
                                const std::string& key, const std::string& value);
  // Waits (server side) up to `timeout` for every rank's `key`; returns values by rank.
  absl::StatusOr<std::vector<std::string>> GetBootstrap(const std::string& job_id, uint64_t generation,
                                                        const std::string& key, absl::Duration timeout);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status ReportCheckpoint(const v1::ReportCheckpointRequest& request);
  absl::Status ReportEvaluation(const v1::ReportEvaluationRequest& request);
  absl::Status ReportEpoch(const v1::ReportEpochRequest& request);
  absl::Status ReportFailure(const v1::ReportFailureRequest& request);

  const std::string& address() const { return options_.address; }

 private:
  CoordinatorClient(CoordinatorClientOptions options, std::shared_ptr<grpc::Channel> channel);
  // Runs `attempt` (one RPC with the given deadline) with retries on UNAVAILABLE.
  template <typename Fn>
  absl::Status WithRetries(const char* rpc, absl::Time deadline, Fn attempt);
  template <typename Req, typename Resp>
  using UnaryMethod = grpc::Status (v1::Coordinator::Stub::*)(grpc::ClientContext*, const Req&, Resp*);
  // One unary RPC with per-attempt deadlines and retries (see WithRetries).
  template <typename Req, typename Resp>
  absl::Status Unary(const char* rpc, UnaryMethod<Req, Resp> method, const Req& request, Resp* response,
                     int attempts_worth);

  CoordinatorClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

}  // namespace lmsgd::session
