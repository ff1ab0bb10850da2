#include "worker/session/heartbeater.h"

namespace lmsgd::session {

Heartbeater::Heartbeater(CoordinatorClient* client, const v1::JoinJobResponse& join, comm::Communicator* comm)
    : client_(client), join_(join), comm_(comm) {
  const double interval = join.heartbeat_interval_s() > 0 ? join.heartbeat_interval_s() : 2.0;
  thread_ = std::thread([this, interval] { Loop(absl::Seconds(interval)); });
  reporter_ = std::thread([this] { ReportLoop(); });
}

Heartbeater::~Heartbeater() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
  }
  cv_.notify_all();
  thread_.join();
  reporter_.join();
}

void Heartbeater::Update(const v1::Progress& p) {
  std::lock_guard<std::mutex> lock(mu_);
  progress_ = p;
}

void Heartbeater::AddStep(const v1::StepTimeSplit& t) {
  std::lock_guard<std::mutex> lock(mu_);
  step_sum_.set_data_wait_s(step_sum_.data_wait_s() + t.data_wait_s());
  step_sum_.set_forward_s(step_sum_.forward_s() + t.forward_s());
  step_sum_.set_backward_s(step_sum_.backward_s() + t.backward_s());
  step_sum_.set_exposed_comm_s(step_sum_.exposed_comm_s() + t.exposed_comm_s());
  step_sum_.set_optimizer_s(step_sum_.optimizer_s() + t.optimizer_s());
  ++steps_;
}

void Heartbeater::Post(std::function<void()> report) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    reports_.push_back(std::move(report));
  }
  cv_.notify_all();
}

void Heartbeater::Flush(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return reports_.empty() && !sending_; });
}

std::string Heartbeater::message() {
  std::lock_guard<std::mutex> lock(mu_);
  return message_;
}

absl::StatusOr<v1::HeartbeatResponse> Heartbeater::Beat(bool completed) {
  v1::HeartbeatRequest r;
  r.set_job_id(join_.job_id());
  r.set_worker_id(join_.worker_id());
  r.set_generation(join_.generation());
  r.set_rank(join_.rank());
  {
    std::lock_guard<std::mutex> lock(mu_);
    *r.mutable_progress() = progress_;
    if (steps_ > 0) {
      const double n = steps_;
      v1::StepTimeSplit* m = r.mutable_recent_step();
      m->set_data_wait_s(step_sum_.data_wait_s() / n);
      m->set_forward_s(step_sum_.forward_s() / n);
      m->set_backward_s(step_sum_.backward_s() / n);
      m->set_exposed_comm_s(step_sum_.exposed_comm_s() / n);
      m->set_optimizer_s(step_sum_.optimizer_s() / n);
      r.set_recent_steps(steps_);
      step_sum_.Clear();
      steps_ = 0;
    }
  }
  r.set_completed(completed);
  r.set_collectives_completed(comm_->completed());
  auto resp = client_->Heartbeat(r);
  if (resp.ok()) Act(*resp);
  return resp;
}

void Heartbeater::Act(const v1::HeartbeatResponse& resp) {
  if (resp.directive() != v1::DIRECTIVE_ABORT_AND_REJOIN && resp.directive() != v1::DIRECTIVE_STOP) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    message_ = resp.message();
  }
  (resp.directive() == v1::DIRECTIVE_STOP ? stop_ : abort_).store(true);
  comm_->Abort();  // a collective in flight returns at once
}

void Heartbeater::Loop(absl::Duration interval) {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, absl::ToChronoNanoseconds(interval), [&] { return done_; })) return;
    }
    (void)Beat(false);  // errors: retried by the client; the coordinator's timeout decides
  }
}

void Heartbeater::ReportLoop() {
  for (;;) {
    std::function<void()> report;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return done_ || !reports_.empty(); });
      if (reports_.empty()) return;  // done and drained
      report = std::move(reports_.front());
      reports_.pop_front();
      sending_ = true;
    }
    report();
    {
      std::lock_guard<std::mutex> lock(mu_);
      sending_ = false;
    }
    cv_.notify_all();
  }
}

}  // namespace lmsgd::session
