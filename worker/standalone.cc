#include "worker/standalone.h"

#include <chrono>

#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/stopwatch.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/data/loader.h"
#include "worker/data/sampler.h"
#include "worker/job_setup.h"

namespace lmsgd::train {
namespace {
using Clock = SteadyClock;
}  // namespace

absl::StatusOr<StandaloneResult> RunStandalone(const v1::JobSpec& job, const StandaloneOptions& opt,
                                               std::unique_ptr<Trainer>* trainer_out) {
  v1::JobSpec spec = job;
  ApplyDefaults(&spec);
  spec.set_world_size(1);
  if (auto st = ValidateJobSpec(spec); !st.ok()) return st;
  const v1::Schedule schedule = MakeSchedule(spec, 1);
  auto config = TrainerConfigFromJob(spec, schedule);
  if (!config.ok()) return config.status();
  if (auto st = CheckDevice(spec, opt.cuda_device); !st.ok()) return st;
  config->cuda_device = opt.cuda_device;
  backend::onednn::SetNumThreads(opt.threads);
  auto datasets = OpenDatasets(spec);
  if (!datasets.ok()) return datasets.status();
  auto trainer_or = Trainer::Create(*config);
  if (!trainer_or.ok()) return trainer_or.status();
  Trainer& trainer = **trainer_or;
  const std::string model_name = trainer.spec().name;
  auto log = [&](const std::string& line) {
    if (opt.log) *opt.log << line << std::endl;
  };
  log(absl::StrFormat("lmsgd standalone: %s, %d examples, kn=%d (n=%d, m=%d), peak lr %.4g, %d iterations/epoch, %s",
                      model_name, datasets->train->size(), schedule.global_batch(), spec.per_worker_batch(),
                      spec.virtual_workers_per_worker(), schedule.peak_lr(), schedule.iterations_per_epoch(),
                      trainer.Describe()));

  StandaloneResult result;
  uint64_t iteration = 0;
  const std::string& ckpt_dir = spec.checkpoint_dir();
  if (opt.resume && !ckpt_dir.empty()) {
    auto latest = checkpoint::LatestCheckpoint(ckpt_dir);
    if (latest.ok()) {
      auto state = checkpoint::LoadCheckpoint(*latest, model_name, &trainer.store(), &trainer.sgd());
      if (!state.ok()) return state.status();
      if (state->global_batch != schedule.global_batch() || state->seed != spec.seed()) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "checkpoint '%s' was made with kn=%d seed=%d; this job has kn=%d seed=%d", *latest, state->global_batch,
            state->seed, schedule.global_batch(), spec.seed()));
      }
      iteration = state->iteration;
      if (auto st = trainer.HostStateChanged(); !st.ok()) return st;
      log(absl::StrFormat("resumed from %s at iteration %d", *latest, iteration));
    } else if (latest.status().code() != absl::StatusCode::kNotFound) {
      return latest.status();
    }
  }

  const uint64_t ipe = schedule.iterations_per_epoch();
  const uint64_t kn_local = static_cast<uint64_t>(spec.per_worker_batch()) * spec.virtual_workers_per_worker();
  const int data_threads = opt.data_threads > 0 ? opt.data_threads
                           : spec.dataset().decode_threads() > 0 ? static_cast<int>(spec.dataset().decode_threads())
                                                                  : 2;
  LocalReducer reducer;
  auto save = [&](uint32_t epochs_done, double lr) -> absl::Status {
    if (ckpt_dir.empty()) return absl::OkStatus();
    if (auto st = trainer.SyncHostState(); !st.ok()) return st;
    checkpoint::TrainingState state{iteration, epochs_done, model_name, spec.seed(), schedule.global_batch(), 1, lr};
    auto path = checkpoint::SaveCheckpoint(ckpt_dir, trainer.store(), trainer.sgd(), state);
    if (!path.ok()) return path.status();
    result.last_checkpoint = *path;
    log(absl::StrFormat("checkpoint %s", *path));
    return absl::OkStatus();
  };

  for (uint32_t epoch = static_cast<uint32_t>(iteration / ipe); epoch < spec.epochs(); ++epoch) {
    const auto epoch_start = Clock::now();
    auto loader_ptr = MakeEpochLoader(spec, datasets->train.get(), epoch, 0, 1,
                                      iteration - static_cast<uint64_t>(epoch) * ipe, data_threads);
    data::BatchLoader& loader = *loader_ptr;
    double loss_sum = 0, lr = 0, data_wait = 0;
    uint64_t steps = 0;
    while (iteration < static_cast<uint64_t>(epoch + 1) * ipe) {
      auto t0 = Clock::now();
      auto batch = loader.Next(absl::Minutes(10));
      if (!batch.ok()) return batch.status();
      data_wait += SecondsSince(t0);
      auto stats = trainer.Step(iteration, (*batch)->images.data(), (*batch)->labels.data(), &reducer);
      if (!stats.ok()) return stats.status();
      ++iteration;
      ++steps;
      loss_sum += stats->loss;
      lr = stats->lr;
      if (opt.log_every > 0 && iteration % opt.log_every == 0) {
        log(absl::StrFormat("  iter %d  loss %.4f  lr %.4f  %.1f img/s", iteration, stats->loss, stats->lr,
                            steps * kn_local / SecondsSince(epoch_start)));
      }
      if (opt.stop_after_iterations > 0 && iteration >= opt.stop_after_iterations) {
        result.iterations = iteration;
        result.op_times = trainer.network().times();
        if (auto st = save(epoch, lr); !st.ok()) return st;
        if (auto st = trainer.SyncHostState(); !st.ok()) return st;
        if (trainer_out) *trainer_out = std::move(*trainer_or);
        return result;
      }
    }
    EpochSummary sum;
    sum.epoch = epoch + 1;
    sum.mean_loss = steps ? loss_sum / steps : 0;
    sum.lr = lr;
    const double train_s = SecondsSince(epoch_start);
    sum.images_per_second = steps * kn_local / train_s;
    if (opt.evaluate && datasets->val) {
      auto counts = trainer.Evaluate(*datasets->val, 0, 1, data_threads);
      if (!counts.ok()) return counts.status();
      sum.eval = *counts;
    }
    sum.seconds = SecondsSince(epoch_start);
    const double n_eval = std::max<double>(1, sum.eval.examples);
    log(absl::StrFormat("epoch %d/%d  iter %d  loss %.4f  lr %.4f  %.1f img/s  data wait %.1f s  val top1_err %.4f "
                        "top5_err %.4f (%d examples)  %.1f s",
                        sum.epoch, spec.epochs(), iteration, sum.mean_loss, sum.lr, sum.images_per_second, data_wait,
                        1 - sum.eval.top1_correct / n_eval, 1 - sum.eval.top5_correct / n_eval, sum.eval.examples,
                        sum.seconds));
    result.epochs.push_back(sum);
    const uint32_t interval = spec.checkpoint_interval_epochs();
    if ((interval > 0 && sum.epoch % interval == 0) || sum.epoch == spec.epochs()) {
      if (auto st = save(sum.epoch, lr); !st.ok()) return st;
    }
  }
  result.iterations = iteration;
  result.op_times = trainer.network().times();
  if (auto st = trainer.SyncHostState(); !st.ok()) return st;
  if (trainer_out) *trainer_out = std::move(*trainer_or);
  return result;
}

}  // namespace lmsgd::train
