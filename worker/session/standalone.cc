#include "worker/session/standalone.h"

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/history.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/train/job_setup.h"
#include "worker/train/trainer_factory.h"

namespace lmsgd::session {

absl::StatusOr<StandaloneResult> RunStandalone(const v1::JobSpec& job, const StandaloneOptions& opt,
                                               std::unique_ptr<train::Trainer>* trainer_out) {
  v1::JobSpec spec = job;
  ApplyDefaults(&spec);
  spec.set_world_size(1);
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  const v1::Schedule schedule = MakeSchedule(spec, 1);
  ASSIGN_OR_RETURN(train::TrainerConfig config, train::TrainerConfigFromJob(spec, schedule));
  RETURN_IF_ERROR(train::CheckDevice(spec, opt.cuda_device));
  config.cuda_device = opt.cuda_device;
  train::SetComputeThreads(opt.threads);
  ASSIGN_OR_RETURN(train::Datasets datasets, train::OpenDatasets(spec));
  ASSIGN_OR_RETURN(std::unique_ptr<train::Trainer> trainer, train::CreateTrainer(config));
  auto log = [&](const std::string& line) {
    if (opt.log) *opt.log << line << std::endl;
  };
  const uint64_t examples = datasets.train ? datasets.train->size() : datasets.val->size();
  log(absl::StrFormat("lmsgd standalone: %s, %d examples, kn=%d (n=%d, m=%d), peak lr %.4g, %d iterations/epoch, %s",
                      trainer->spec().name, examples, schedule.global_batch(), spec.per_worker_batch(),
                      spec.virtual_workers_per_worker(), schedule.peak_lr(), schedule.iterations_per_epoch(),
                      trainer->Describe()));

  uint64_t start_iteration = 0;
  bool resumed = false;
  const bool evaluate = spec.mode() == v1::JOB_MODE_EVALUATE;
  const std::string& ckpt_dir = spec.checkpoint_dir();
  if (opt.resume && !evaluate && !ckpt_dir.empty()) {
    auto latest = checkpoint::LatestCheckpoint(ckpt_dir);
    if (latest.ok()) {
      ASSIGN_OR_RETURN(checkpoint::TrainingState state,
                       checkpoint::LoadCheckpoint(*latest, trainer->spec().name, &trainer->store(), &trainer->sgd()));
      if (state.global_batch != schedule.global_batch() || state.seed != spec.seed()) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "checkpoint '%s' was made with kn=%d seed=%d; this job has kn=%d seed=%d", *latest, state.global_batch,
            state.seed, schedule.global_batch(), spec.seed()));
      }
      start_iteration = state.iteration;
      resumed = true;
      RETURN_IF_ERROR(trainer->ImportState());
      log(absl::StrFormat("resumed from %s at iteration %d", *latest, start_iteration));
    } else if (latest.status().code() != absl::StatusCode::kNotFound) {
      return latest.status();
    }
  }
  // The run's own checkpoint, once there is one, supersedes the weights it started from.
  uint32_t evaluated_epoch = 0;
  if (!resumed && !spec.init_checkpoint().empty()) {
    ASSIGN_OR_RETURN(train::InitFromCheckpoint init, train::ApplyInitCheckpoint(spec, schedule, *trainer, log));
    start_iteration = init.start_iteration;
    evaluated_epoch = init.epoch;
    RETURN_IF_ERROR(trainer->ImportState());
  }

  // The history so far: a resumed run keeps the file's epochs up to where it resumes.
  EpochRecords history;
  uint32_t history_dropped = 0;
  if (!opt.history_file.empty() && start_iteration > 0) {
    auto old = ReadHistoryFile(opt.history_file);
    if (old.ok()) {
      const uint64_t resume_epoch = start_iteration / schedule.iterations_per_epoch();
      for (const auto& r : *old) {
        if (r.epoch() <= resume_epoch) MergeEpochRecord(r, &history, &history_dropped);
      }
    } else if (old.status().code() != absl::StatusCode::kNotFound) {
      return old.status();
    }
  }
  absl::Status history_error;
  train::LoopHooks hooks;
  hooks.stop_requested = [&] { return !history_error.ok(); };
  hooks.on_epoch_end = [&](const train::EpochSummary& e) {
    v1::EpochRecord r = train::ToEpochRecord(e, 1, schedule.global_batch());
    r.set_time_unix_ms(absl::ToUnixMillis(absl::Now()));
    MergeEpochRecord(r, &history, &history_dropped);
    if (!opt.history_file.empty() && history_error.ok()) history_error = WriteHistoryFile(opt.history_file, history);
  };

  train::LoopOptions lo;
  lo.data_threads = train::DataThreads(spec, opt.data_threads);
  lo.evaluate = opt.evaluate;
  lo.evaluated_epoch = evaluated_epoch;
  lo.write_checkpoints = !evaluate;
  lo.stop_after_iterations = opt.stop_after_iterations;
  lo.log_every = opt.log_every;
  lo.log = log;
  train::LoopResult loop = train::RunTrainingLoop(spec, schedule, *trainer, datasets, start_iteration, lo, hooks);
  RETURN_IF_ERROR(history_error);
  if (!loop.status.ok()) return loop.status;
  StandaloneResult result;
  result.iterations = loop.iterations;
  result.epochs = std::move(loop.epochs);
  result.last_checkpoint = std::move(loop.last_checkpoint);
  result.history.assign(history.begin(), history.end());
  result.op_times = trainer->network().times();
  RETURN_IF_ERROR(trainer->ExportState());
  if (trainer_out) *trainer_out = std::move(trainer);
  return result;
}

}  // namespace lmsgd::session
