// lmsgd-worker: one training process (one GPU, or one CPU share).
//
//   lmsgd-worker --standalone --job_file JOB.textproto [--threads N]
//       trains the job in this process (k = 1; virtual workers allowed), no coordinator.
//
// Joining a coordinator (--coordinator ADDR) arrives with distributed training.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/logging.h"
#include "worker/standalone.h"

ABSL_FLAG(bool, standalone, false, "Train --job_file in this process, without a coordinator");
ABSL_FLAG(std::string, job_file, "", "Job spec (text proto or JSON) for --standalone");
ABSL_FLAG(std::string, coordinator, "", "Coordinator address host:port (distributed mode)");
ABSL_FLAG(int32_t, threads, 0, "Compute threads (0 = all cores)");
ABSL_FLAG(int32_t, data_threads, 0, "Decoding threads (0 = dataset.decode_threads, else 2)");
ABSL_FLAG(std::string, checkpoint_dir, "", "Overrides the job's checkpoint_dir");
ABSL_FLAG(bool, resume, true, "Resume from the checkpoint dir's latest checkpoint when there is one");
ABSL_FLAG(int32_t, log_every, 0, "Print progress every N iterations (0 = once per epoch)");
ABSL_FLAG(uint64_t, epochs, 0, "Overrides the job's epochs (0 = keep)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("lmsgd-worker --standalone --job_file FILE [--threads N]");
  absl::ParseCommandLine(argc, argv);
  if (!absl::GetFlag(FLAGS_standalone)) {
    std::cerr << "lmsgd-worker: only --standalone is available in this build (joining a coordinator with "
                 "--coordinator is not implemented yet)\n";
    return 2;
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
  lmsgd::train::StandaloneOptions opt;
  opt.threads = absl::GetFlag(FLAGS_threads);
  opt.data_threads = absl::GetFlag(FLAGS_data_threads);
  opt.resume = absl::GetFlag(FLAGS_resume);
  opt.log_every = absl::GetFlag(FLAGS_log_every);
  opt.log = &std::cout;
  auto result = lmsgd::train::RunStandalone(*spec, opt);
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
