// lmsgd-worker: one training process (one GPU, or one CPU share).
//
//   lmsgd-worker --coordinator HOST:PORT [--job JOB_ID] [--threads N] [--local_device I]
//       joins a job of the coordinator (or the next one that needs workers) and trains its
//       rank's shard with the others (worker/session/distributed.h); re-joins after failures.
//       With --serve it then takes the next job that needs workers, and so on.
//   lmsgd-worker --standalone --job_file JOB.textproto [--threads N]
//       trains the job in this process (k = 1; virtual workers allowed), no coordinator.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/logging.h"
#include "prometheus/exposer.h"
#include "worker/comm/ucx_transport.h"
#include "worker/session/distributed.h"
#include "worker/session/standalone.h"
#include "worker/train/trainer_factory.h"

ABSL_FLAG(bool, standalone, false, "Train --job_file in this process, without a coordinator");
ABSL_FLAG(std::string, job_file, "", "Job spec (text proto or JSON) for --standalone");
ABSL_FLAG(std::string, coordinator, "", "Coordinator address host:port (distributed mode)");
ABSL_FLAG(int32_t, threads, 0, "Compute threads (0 = all cores)");
ABSL_FLAG(int32_t, data_threads, 0, "Decoding threads (0 = dataset.decode_threads, else 2)");
ABSL_FLAG(std::string, checkpoint_dir, "", "Overrides the job's checkpoint_dir");
ABSL_FLAG(bool, resume, true, "Resume from the checkpoint dir's latest checkpoint when there is one");
ABSL_FLAG(int32_t, test_data_delay_ms, 0, "Tests only: sleep this long while waiting for every batch (a slow rank)");
ABSL_FLAG(int32_t, log_every, 0, "Print progress every N iterations (0 = once per epoch)");
ABSL_FLAG(uint64_t, epochs, 0, "Overrides the job's epochs (0 = keep)");
ABSL_FLAG(std::string, job, "", "Job id to join (default: the next job that needs workers)");
ABSL_FLAG(std::string, host, "", "Host name reported to the coordinator (default: this machine's)");
ABSL_FLAG(int32_t, local_device, -1,
          "Index of this worker on its host (its slot; -1: LOCAL_RANK / SLURM_LOCALID / JOB_COMPLETION_INDEX, else "
          "the lowest free one)");
ABSL_FLAG(std::string, slot_dir, "", "Where local device slots are locked (default $XDG_RUNTIME_DIR or /tmp, /lmsgd-slots)");
ABSL_FLAG(std::string, tls_ca, "", "CA certificate to verify the coordinator (enables TLS)");
ABSL_FLAG(std::string, tls_cert, "", "Client certificate for mutual TLS");
ABSL_FLAG(std::string, tls_key, "", "Client private key for mutual TLS");
ABSL_FLAG(int32_t, join_timeout_s, 86400, "How long to wait for a job to join");
ABSL_FLAG(std::string, metrics_listen, "", "Serve Prometheus /metrics here (host:port; empty: off)");
ABSL_FLAG(std::string, device, "cpu", "cpu, or cuda:N (the GPU backend)");
ABSL_FLAG(std::string, history_file, "",
          "--standalone: write the per-epoch history here after every epoch (JSON lines; CSV for *.csv)");
ABSL_FLAG(bool, serve, false,
          "Distributed mode: after a job ends, join the next one that needs workers (a worker pool); "
          "a failed job is logged and the worker goes on");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lmsgd-worker --standalone --job_file FILE [--threads N]");
  absl::ParseCommandLine(argc, argv);
  lmsgd::comm::SetUcxEnvironmentDefaults();  // before any thread starts
  // --device: cpu, or cuda:N (the cuDNN backend; a machine without a GPU gets a clear error
  // when the trainer is built, and the CPU stays available).
  const std::string device = absl::GetFlag(FLAGS_device);
  int cuda_device = -1;
  if (device != "cpu") {
    if (device.rfind("cuda:", 0) != 0 || !absl::SimpleAtoi(device.substr(5), &cuda_device) || cuda_device < 0) {
      std::cerr << "lmsgd-worker: --device " << device << " is not cpu or cuda:N\n";
      return 2;
    }
    // Checked before joining anything: a machine without the GPU must not fail a job.
    if (auto st = lmsgd::train::CheckDeviceAvailable(cuda_device); !st.ok()) {
      std::cerr << "lmsgd-worker: --device " << device << " is not available: " << st.message() << "\n";
      return 2;
    }
  }
  if (!absl::GetFlag(FLAGS_standalone)) {
    if (absl::GetFlag(FLAGS_coordinator).empty()) {
      std::cerr << "lmsgd-worker: give --coordinator HOST:PORT (or --standalone --job_file FILE)\n";
      return 2;
    }
    lmsgd::session::WorkerOptions wo;
    wo.client.address = absl::GetFlag(FLAGS_coordinator);
    wo.client.tls.ca = absl::GetFlag(FLAGS_tls_ca);
    wo.client.tls.cert = absl::GetFlag(FLAGS_tls_cert);
    wo.client.tls.key = absl::GetFlag(FLAGS_tls_key);
    wo.job_id = absl::GetFlag(FLAGS_job);
    wo.host = absl::GetFlag(FLAGS_host);
    if (absl::GetFlag(FLAGS_local_device) < -1) {
      std::cerr << "lmsgd-worker: --local_device " << absl::GetFlag(FLAGS_local_device)
                << " is not a slot index (0, 1, ...; -1 or unset: the launcher's, else a free one)\n";
      return 2;
    }
    if (absl::GetFlag(FLAGS_test_data_delay_ms) < 0) {
      std::cerr << "lmsgd-worker: --test_data_delay_ms must not be negative\n";
      return 2;
    }
    wo.local_device = absl::GetFlag(FLAGS_local_device);
    wo.slot_dir = absl::GetFlag(FLAGS_slot_dir);
    wo.test_data_delay = absl::Milliseconds(absl::GetFlag(FLAGS_test_data_delay_ms));
    wo.cuda_device = cuda_device;
    wo.threads = absl::GetFlag(FLAGS_threads);
    if (absl::GetFlag(FLAGS_data_threads) > 0) wo.data_threads = absl::GetFlag(FLAGS_data_threads);
    wo.join_timeout = absl::Seconds(absl::GetFlag(FLAGS_join_timeout_s));
    wo.log = &std::cout;
    lmsgd::session::WorkerMetrics metrics;
    std::unique_ptr<prometheus::Exposer> exposer;
    if (!absl::GetFlag(FLAGS_metrics_listen).empty()) {
      try {  // prometheus-cpp reports a busy/bad address by throwing; stop here, before training
        exposer = std::make_unique<prometheus::Exposer>(absl::GetFlag(FLAGS_metrics_listen));
      } catch (const std::exception& e) {
        std::cerr << "lmsgd-worker: cannot serve metrics on " << absl::GetFlag(FLAGS_metrics_listen) << ": "
                  << e.what() << "\n";
        return 2;
      }
      exposer->RegisterCollectable(metrics.registry());
      const std::string listen = absl::GetFlag(FLAGS_metrics_listen);
      const auto ports = exposer->GetListeningPorts();  // the real port when asked for port 0
      std::cout << "metrics on http://" << listen.substr(0, listen.rfind(':')) << ":"
                << (ports.empty() ? 0 : ports[0]) << "/metrics" << std::endl;
      wo.metrics = &metrics;
    }
    const bool serve = absl::GetFlag(FLAGS_serve);
    while (true) {
      const absl::Status st = lmsgd::session::RunWorker(wo);
      if (!st.ok()) {
        std::cerr << "lmsgd-worker: " << st.ToString() << "\n";
        // Only a worker that cannot reach the coordinator at all stops serving.
        if (!serve || st.code() == absl::StatusCode::kUnavailable) return 1;
        continue;
      }
      std::cout << "lmsgd-worker: job finished" << std::endl;
      if (!serve) return 0;
    }
  }
  if (absl::GetFlag(FLAGS_job_file).empty()) {
    std::cerr << "lmsgd-worker: --standalone needs --job_file\n";
    return 2;
  }
  auto spec = lmsgd::ReadJobFile(absl::GetFlag(FLAGS_job_file));
  if (!spec.ok()) {
    std::cerr << "lmsgd-worker: " << spec.status().message() << "\n";
    return 2;
  }
  if (!absl::GetFlag(FLAGS_checkpoint_dir).empty()) spec->set_checkpoint_dir(absl::GetFlag(FLAGS_checkpoint_dir));
  if (absl::GetFlag(FLAGS_epochs) > 0) spec->set_epochs(static_cast<uint32_t>(absl::GetFlag(FLAGS_epochs)));
  lmsgd::session::StandaloneOptions opt;
  opt.threads = absl::GetFlag(FLAGS_threads);
  opt.data_threads = absl::GetFlag(FLAGS_data_threads);
  opt.resume = absl::GetFlag(FLAGS_resume);
  opt.log_every = absl::GetFlag(FLAGS_log_every);
  opt.cuda_device = cuda_device;
  opt.log = &std::cout;
  opt.history_file = absl::GetFlag(FLAGS_history_file);
  auto result = lmsgd::session::RunStandalone(*spec, opt);
  if (!result.ok()) {
    std::cerr << "lmsgd-worker: " << result.status().ToString() << "\n";
    return 1;
  }
  if (!result->epochs.empty()) {
    const auto& e = result->epochs.back();
    const double n = std::max<double>(1, e.eval.examples);
    std::cout << absl::StrFormat("done: %d iterations, final val top1_err %.4f top5_err %.4f\n", result->iterations,
                                 1 - e.eval.top1_correct / n, 1 - e.eval.top5_correct / n);
  }
  return 0;
}
