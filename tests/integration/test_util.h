// Helpers for integration tests: real processes, loopback HTTP, temp dirs.
#pragma once

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lmsgd::testing {

std::string MakeTempDir(const std::string& prefix);

// A child process; killed (SIGKILL) on destruction if still running.
class Subprocess {
 public:
  Subprocess() = default;
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  // stdout+stderr go to `log_path`.
  absl::Status Start(const std::vector<std::string>& argv, const std::string& log_path,
                     const std::map<std::string, std::string>& env = {});
  void Signal(int sig);
  // Waits for exit; returns the exit code (128+signal when killed) or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs a command to completion (killed after `timeout`).
CommandResult RunCommand(const std::vector<std::string>& argv, absl::Duration timeout = absl::Seconds(30),
                         const std::map<std::string, std::string>& env = {});

// Polls for `path` (key=value lines) until it exists or the timeout passes.
absl::StatusOr<std::map<std::string, std::string>> WaitForReadyFile(const std::string& path,
                                                                    absl::Duration timeout);

// GET http://<host:port><path> over loopback; returns the body of a 200 response.
absl::StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path);

// A coordinator process on free loopback ports with its own state dir.
class CoordinatorProcess {
 public:
  explicit CoordinatorProcess(std::string state_dir, std::vector<std::string> extra_flags = {})
      : state_dir_(std::move(state_dir)), extra_flags_(std::move(extra_flags)) {}
  absl::Status Start();
  void Kill9();
  absl::StatusOr<int> Terminate();
  const std::string& grpc_address() const { return grpc_; }
  const std::string& metrics_address() const { return metrics_; }
  const std::string& log_path() const { return log_; }
  std::string Log() const;

 private:
  std::string state_dir_;
  std::vector<std::string> extra_flags_;
  Subprocess proc_;
  std::string grpc_, metrics_, log_;
  int starts_ = 0;
};

}  // namespace lmsgd::testing
