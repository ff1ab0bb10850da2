// lmsgd-coordinator: the control-plane daemon (see proto/lmsgd/v1/coordinator.proto).
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/file_util.h"
#include "common/grpc_util.h"
#include "common/logging.h"
#include "coordinator/job_manager.h"
#include "coordinator/metrics.h"
#include "coordinator/service.h"
#include "coordinator/state_store.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:7070", "gRPC address (host:port; port 0 picks a free one)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464", "Prometheus /metrics address; empty disables");
ABSL_FLAG(std::string, state_dir, "/var/lib/lmsgd/coordinator", "Directory for durable job state");
ABSL_FLAG(absl::Duration, heartbeat_timeout, absl::Seconds(30), "A worker silent this long is dead");
ABSL_FLAG(double, straggler_factor, 1.5,
          "A rank whose busy time per step stays above this multiple of the median rank's is a straggler");
ABSL_FLAG(int32_t, straggler_heartbeats, 5, "... for this many heartbeats in a row");
ABSL_FLAG(absl::Duration, restart_grace, absl::Seconds(3),
          "After a restart, members of recovered jobs are alive for --heartbeat_timeout plus this long (the "
          "workers' reconnect backoff)");
ABSL_FLAG(absl::Duration, grow_interval, absl::Minutes(5),
          "An elastic job with ready standby workers grows at its next checkpoint, at most once per this long");
ABSL_FLAG(absl::Duration, heartbeat_interval, absl::Seconds(5), "How often workers are told to heartbeat");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate (enables TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM server private key");
ABSL_FLAG(std::string, tls_client_ca, "", "PEM CA for client certificates (enables mutual TLS)");
ABSL_FLAG(std::string, auth_token_file, "", "File with the bearer token SubmitJob/CancelJob require");
ABSL_FLAG(int, max_message_bytes, 4 << 20, "Largest accepted gRPC message");
ABSL_FLAG(int, max_jobs, 1000, "Most live (not ended) jobs held at once");
ABSL_FLAG(std::string, ready_file, "", "Written (atomically) with the bound addresses once serving");

namespace {

using lmsgd::coordinator::CoordinatorMetrics;
using lmsgd::coordinator::CoordinatorService;
using lmsgd::coordinator::FileStateStore;
using lmsgd::coordinator::JobManager;
using lmsgd::coordinator::JobManagerOptions;
using lmsgd::coordinator::ServiceOptions;

std::string HostOf(const std::string& addr) {
  auto pos = addr.rfind(':');
  return pos == std::string::npos ? addr : addr.substr(0, pos);
}

int Run() {
  // Signals are taken by sigwait below; block them before any thread starts.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  auto store = FileStateStore::Open(absl::GetFlag(FLAGS_state_dir));
  if (!store.ok()) {
    LOG(ERROR) << "cannot open --state_dir: " << store.status();
    return 1;
  }
  lmsgd::TlsFiles tls{absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                      absl::GetFlag(FLAGS_tls_client_ca), ""};
  auto creds = lmsgd::MakeServerCredentials(tls);
  if (!creds.ok()) {
    LOG(ERROR) << "TLS configuration: " << creds.status();
    return 1;
  }
  ServiceOptions service_options;
  if (!absl::GetFlag(FLAGS_auth_token_file).empty()) {
    auto token = lmsgd::ReadTokenFile(absl::GetFlag(FLAGS_auth_token_file));
    if (!token.ok()) {
      LOG(ERROR) << "--auth_token_file: " << token.status();
      return 1;
    }
    service_options.auth_token = *token;
  }

  auto registry = std::make_shared<prometheus::Registry>();
  CoordinatorMetrics metrics(registry);
  std::unique_ptr<prometheus::Exposer> exposer;
  std::string metrics_addr;
  if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(absl::GetFlag(FLAGS_metrics_listen));
    } catch (const std::exception& e) {
      LOG(ERROR) << "cannot serve metrics on " << absl::GetFlag(FLAGS_metrics_listen) << ": " << e.what();
      return 1;
    }
    exposer->RegisterCollectable(registry);
    auto ports = exposer->GetListeningPorts();
    metrics_addr = absl::StrCat(HostOf(absl::GetFlag(FLAGS_metrics_listen)), ":", ports.empty() ? 0 : ports[0]);
  }

  JobManagerOptions options;
  options.heartbeat_timeout = absl::GetFlag(FLAGS_heartbeat_timeout);
  options.restart_grace = absl::GetFlag(FLAGS_restart_grace);
  options.straggler_factor = absl::GetFlag(FLAGS_straggler_factor);
  options.straggler_heartbeats = absl::GetFlag(FLAGS_straggler_heartbeats);
  if (!(options.straggler_factor > 1.0) || options.straggler_heartbeats < 1) {
    LOG(ERROR) << "--straggler_factor must be above 1 (is " << options.straggler_factor
               << ") and --straggler_heartbeats at least 1 (is " << options.straggler_heartbeats << ")";
    return 2;
  }
  if (options.restart_grace < absl::ZeroDuration()) {
    LOG(ERROR) << "--restart_grace must not be negative";
    return 2;
  }
  options.grow_interval = absl::GetFlag(FLAGS_grow_interval);
  if (options.grow_interval < absl::ZeroDuration()) {
    LOG(ERROR) << "--grow_interval must not be negative";
    return 2;
  }
  options.heartbeat_interval = absl::GetFlag(FLAGS_heartbeat_interval);
  options.max_live_jobs = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_jobs)));
  if (options.heartbeat_interval >= options.heartbeat_timeout) {
    LOG(ERROR) << "--heartbeat_interval must be shorter than --heartbeat_timeout";
    return 1;
  }
  JobManager jobs(options, store->get(), &metrics);
  auto warnings = jobs.Recover();
  if (!warnings.ok()) {
    LOG(ERROR) << "cannot load state from " << absl::GetFlag(FLAGS_state_dir) << ": " << warnings.status();
    return 1;
  }

  CoordinatorService service(service_options, &jobs, &metrics);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), *creds, &port);
  // gRPC sets SO_REUSEPORT by default: a second coordinator on this address would start and the
  // kernel would spread clients over two processes with two states.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(absl::GetFlag(FLAGS_max_message_bytes));
  builder.SetMaxSendMessageSize(64 << 20);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    LOG(ERROR) << "cannot listen on " << absl::GetFlag(FLAGS_listen)
               << " (address in use, by another lmsgd-coordinator perhaps, or invalid)";
    return 1;
  }
  const std::string grpc_addr = absl::StrCat(HostOf(absl::GetFlag(FLAGS_listen)), ":", port);
  LOG(INFO) << "lmsgd-coordinator " << LMSGD_VERSION << " serving gRPC on " << grpc_addr
            << (tls.cert.empty() ? " (plaintext)" : (tls.client_ca.empty() ? " (TLS)" : " (mutual TLS)"))
            << (service_options.auth_token.empty() ? "" : ", bearer token required for submit/cancel")
            << "; metrics on " << (metrics_addr.empty() ? "(disabled)" : metrics_addr + "/metrics")
            << "; state in " << absl::GetFlag(FLAGS_state_dir);
  if (!absl::GetFlag(FLAGS_ready_file).empty()) {
    auto st = lmsgd::WriteFileAtomically(absl::GetFlag(FLAGS_ready_file),
                                         absl::StrCat("grpc=", grpc_addr, "\nmetrics=", metrics_addr, "\n"));
    if (!st.ok()) LOG(ERROR) << "--ready_file: " << st;
  }

  std::atomic<bool> stop{false};
  std::thread ticker([&] {
    while (!stop.load()) {
      jobs.Tick();
      absl::SleepFor(absl::Milliseconds(200));
    }
  });

  int sig = 0;
  sigwait(&sigs, &sig);
  LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", shutting down";
  jobs.Shutdown();
  // Every blocking handler returned when JobManager shut down; the grace only covers unary calls
  // in flight. gRPC also waits for connected clients to drop their channels until the deadline.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  stop = true;
  ticker.join();
  jobs.Tick();  // last chance for pending durable writes
  LOG(INFO) << "stopped";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lmsgd-coordinator [--listen ADDR] [--state_dir DIR] [--metrics_listen ADDR] ...");
  absl::ParseCommandLine(argc, argv);
  return Run();
}
