#include "tests/integration/test_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"

namespace lmsgd::testing {

std::string MakeTempDir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* d = mkdtemp(buf.data());
  return d ? std::string(d) : std::string();
}

Subprocess::~Subprocess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

absl::Status Subprocess::Start(const std::vector<std::string>& argv, const std::string& log_path,
                               const std::map<std::string, std::string>& env) {
  int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot open log ", log_path));
  pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(fd);
  pid_ = pid;
  return absl::OkStatus();
}

void Subprocess::Signal(int sig) {
  if (pid_ > 0) ::kill(pid_, sig);
}

absl::StatusOr<int> Subprocess::Wait(absl::Duration timeout) {
  if (pid_ <= 0) return absl::FailedPreconditionError("not running");
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("process did not exit in time");
    absl::SleepFor(absl::Milliseconds(20));
  }
}

CommandResult RunCommand(const std::vector<std::string>& argv, absl::Duration timeout,
                         const std::map<std::string, std::string>& env) {
  CommandResult result;
  const std::string dir = MakeTempDir("lmsgd_cmd");
  const std::string out_path = dir + "/out", err_path = dir + "/err";
  pid_t pid = ::fork();
  if (pid == 0) {
    int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(o, 1);
    ::dup2(e, 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (true) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (absl::Now() >= deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      result.err = "killed after timeout\n";
      break;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.out = ReadFileToString(out_path).value_or("");
  result.err += ReadFileToString(err_path).value_or("");
  return result;
}

absl::StatusOr<std::map<std::string, std::string>> WaitForReadyFile(const std::string& path,
                                                                    absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    auto contents = ReadFileToString(path);
    if (contents.ok()) {
      std::map<std::string, std::string> kv;
      for (absl::string_view line : absl::StrSplit(*contents, '\n', absl::SkipEmpty())) {
        std::pair<std::string, std::string> p = absl::StrSplit(line, absl::MaxSplits('=', 1));
        kv[p.first] = p.second;
      }
      return kv;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("ready file ", path, " did not appear within ",
                                                  absl::FormatDuration(timeout)));
}

absl::StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path) {
  auto colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("bad address ", host_port));
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("connect ", host_port, ": ", std::strerror(errno)));
  }
  std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host_port, "\r\n\r\n");
  if (::write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return absl::InternalError("write failed");
  }
  std::string resp;
  char buf[8192];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) resp.append(buf, static_cast<size_t>(n));
  ::close(fd);
  auto header_end = resp.find("\r\n\r\n");
  if (header_end == std::string::npos) return absl::InternalError("malformed HTTP response");
  if (resp.find(" 200 ") == std::string::npos || resp.find(" 200 ") > resp.find("\r\n")) {
    return absl::InternalError(absl::StrCat("HTTP status: ", resp.substr(0, resp.find("\r\n"))));
  }
  return resp.substr(header_end + 4);
}

absl::Status CoordinatorProcess::Start() {
  ++starts_;
  log_ = absl::StrCat(state_dir_, "/coordinator.log");
  const std::string ready = absl::StrCat(state_dir_, "/ready.", starts_);
  std::vector<std::string> argv = {LMSGD_COORDINATOR_BIN, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                   absl::StrCat("--state_dir=", state_dir_, "/state"),
                                   absl::StrCat("--ready_file=", ready)};
  argv.insert(argv.end(), extra_flags_.begin(), extra_flags_.end());
  auto st = proc_.Start(argv, log_);
  if (!st.ok()) return st;
  auto kv = WaitForReadyFile(ready, absl::Seconds(20));
  if (!kv.ok()) return absl::Status(kv.status().code(), absl::StrCat(kv.status().message(), "; log:\n", Log()));
  grpc_ = (*kv)["grpc"];
  metrics_ = (*kv)["metrics"];
  return absl::OkStatus();
}

void CoordinatorProcess::Kill9() {
  proc_.Signal(SIGKILL);
  (void)proc_.Wait(absl::Seconds(10));
}

absl::StatusOr<int> CoordinatorProcess::Terminate() {
  proc_.Signal(SIGTERM);
  return proc_.Wait(absl::Seconds(15));
}

std::string CoordinatorProcess::Log() const { return ReadFileToString(log_).value_or("(no log)"); }

}  // namespace lmsgd::testing
