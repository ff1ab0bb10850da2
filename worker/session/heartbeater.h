// The worker's background link to the coordinator during a generation.
//
// One thread heartbeats progress every heartbeat interval; a second sends the reports
// (evaluation, checkpoint) the training loop queues with Post, in order. So no coordinator RPC
// ever blocks a step (the coordinator may be restarting: RPCs retry with backoff), and a report
// retrying through a restart never delays a heartbeat past the coordinator's timeout. The
// coordinator's directive becomes flags the training loop polls: ABORT_AND_REJOIN and STOP also
// abort the communicator, so a collective in flight returns at once.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lmsgd/v1/coordinator.pb.h"
#include "worker/comm/communicator.h"
#include "worker/session/coordinator_client.h"

namespace lmsgd::session {

class Heartbeater {
 public:
  Heartbeater(CoordinatorClient* client, const v1::JoinJobResponse& join, comm::Communicator* comm);
  ~Heartbeater();
  void Update(const v1::Progress& p);
  // Adds one step's time split; each heartbeat sends the mean over the steps since the last.
  void AddStep(const v1::StepTimeSplit& step);
  // Runs `report` on the background thread, in order.
  void Post(std::function<void()> report);
  // Waits (bounded) until every posted report has been sent.
  void Flush(absl::Duration timeout);
  bool abort() const { return abort_.load(); }
  bool stop() const { return stop_.load(); }
  std::string message();
  // One synchronous heartbeat (e.g. completed=true); returns the directive.
  absl::StatusOr<v1::HeartbeatResponse> Beat(bool completed);

 private:
  void Act(const v1::HeartbeatResponse& resp);
  void Loop(absl::Duration interval);
  void ReportLoop();

  CoordinatorClient* client_;
  v1::JoinJobResponse join_;
  comm::Communicator* comm_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false, sending_ = false;
  std::deque<std::function<void()>> reports_;
  v1::Progress progress_;
  v1::StepTimeSplit step_sum_;
  uint32_t steps_ = 0;
  std::string message_;
  std::atomic<bool> abort_{false}, stop_{false};
  std::thread thread_, reporter_;
};

}  // namespace lmsgd::session
