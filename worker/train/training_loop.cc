#include "worker/train/training_loop.h"

#include "absl/time/clock.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "common/stopwatch.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/data/loader.h"

namespace lmsgd::train {

const char* LoopPhaseName(LoopPhase phase) {
  switch (phase) {
    case LoopPhase::kNone: return "none";
    case LoopPhase::kStopRequested: return "stop requested";
    case LoopPhase::kData: return "data";
    case LoopPhase::kStep: return "step";
    case LoopPhase::kAverageBnStatistics: return "BN statistics averaged over ranks";
    case LoopPhase::kEvaluate: return "evaluation";
    case LoopPhase::kSumEvalCounts: return "evaluation counts over ranks";
    case LoopPhase::kCheckpoint: return "checkpoint";
  }
  return "?";
}

namespace {

class Loop {
 public:
  Loop(const v1::JobSpec& spec, const v1::Schedule& schedule, Trainer& trainer, const Datasets& datasets,
       const LoopOptions& options, const LoopHooks& hooks)
      : spec_(spec), schedule_(schedule), trainer_(trainer), datasets_(datasets), options_(options), hooks_(hooks) {}

  LoopResult Run(uint64_t start_iteration);

 private:
  void Log(const std::string& line) {
    if (options_.log) options_.log(line);
  }
  LoopResult Fail(LoopPhase phase, absl::Status status) {
    result_.status = std::move(status);
    result_.failed_in = phase;
    result_.iterations = iteration_;
    return std::move(result_);
  }
  bool ShouldCheckpoint(uint32_t epochs_done) const {
    const uint32_t interval = spec_.checkpoint_interval_epochs();
    return (interval > 0 && epochs_done % interval == 0) || epochs_done == spec_.epochs();
  }
  absl::Status Checkpoint(uint32_t epochs_done, double lr);
  // Evaluates into summary->eval, the counts summed over the ranks; phase and status on failure.
  absl::Status Evaluate(EpochSummary* summary, LoopPhase* failed_in);
  LoopResult EvaluateOnly();

  const v1::JobSpec& spec_;
  const v1::Schedule& schedule_;
  Trainer& trainer_;
  const Datasets& datasets_;
  const LoopOptions& options_;
  const LoopHooks& hooks_;
  uint64_t iteration_ = 0;
  LoopResult result_;
};

absl::Status Loop::Checkpoint(uint32_t epochs_done, double lr) {
  if (!options_.write_checkpoints || spec_.checkpoint_dir().empty()) return absl::OkStatus();
  RETURN_IF_ERROR(trainer_.ExportState());
  const checkpoint::TrainingState state{iteration_,   epochs_done,           trainer_.spec().name,
                                        spec_.seed(), schedule_.global_batch(), options_.world_size, lr};
  ASSIGN_OR_RETURN(result_.last_checkpoint,
                   checkpoint::SaveCheckpoint(spec_.checkpoint_dir(), trainer_.store(), trainer_.sgd(), state,
                                              checkpoint::kDefaultKeep,
                                              hooks_.retained_checkpoints ? hooks_.retained_checkpoints()
                                                                          : std::set<std::string>{}));
  Log(absl::StrCat("checkpoint ", result_.last_checkpoint));
  if (hooks_.on_checkpoint) hooks_.on_checkpoint(result_.last_checkpoint, epochs_done, iteration_);
  return absl::OkStatus();
}

absl::Status Loop::Evaluate(EpochSummary* summary, LoopPhase* failed_in) {
  auto counts = trainer_.Evaluate(*datasets_.val, options_.rank, options_.world_size, options_.data_threads);
  if (!counts.ok()) {
    *failed_in = LoopPhase::kEvaluate;
    return counts.status();
  }
  summary->eval = *counts;
  if (hooks_.sum_eval_counts) {
    if (auto st = hooks_.sum_eval_counts(&summary->eval); !st.ok()) {
      *failed_in = LoopPhase::kSumEvalCounts;
      return st;
    }
  }
  summary->evaluated = true;
  return absl::OkStatus();
}

LoopResult Loop::EvaluateOnly() {
  if (!datasets_.val) return Fail(LoopPhase::kEvaluate, absl::InvalidArgumentError("the job has no validation set"));
  const auto start = SteadyClock::now();
  EpochSummary summary;
  summary.epoch = options_.evaluated_epoch;
  LoopPhase phase = LoopPhase::kNone;
  if (auto st = Evaluate(&summary, &phase); !st.ok()) return Fail(phase, st);
  summary.seconds = SecondsSince(start);
  const double n = std::max<double>(1, summary.eval.examples);
  Log(absl::StrFormat("evaluated %s: top1_err %.4f top5_err %.4f (%d examples)  %.1f s", spec_.init_checkpoint(),
                      1 - summary.eval.top1_correct / n, 1 - summary.eval.top5_correct / n, summary.eval.examples,
                      summary.seconds));
  if (hooks_.on_epoch_end) hooks_.on_epoch_end(summary);
  result_.epochs.push_back(summary);
  return std::move(result_);
}

LoopResult Loop::Run(uint64_t start_iteration) {
  if (spec_.mode() == v1::JOB_MODE_EVALUATE) return EvaluateOnly();
  iteration_ = start_iteration;
  const uint64_t iterations_per_epoch = schedule_.iterations_per_epoch();
  const uint64_t k = options_.world_size;
  const uint64_t local_batch = static_cast<uint64_t>(spec_.per_worker_batch()) * spec_.virtual_workers_per_worker();
  // 8-bit pixels when both ends can (the GPU normalizes on the device), else normalized floats.
  const bool pixels = trainer_.TakesPixels() && datasets_.train->SupportsUint8();
  const data::PixelFormat format = pixels ? data::PixelFormat::kUint8Hwc : data::PixelFormat::kFloatChw;
  for (uint32_t epoch = static_cast<uint32_t>(iteration_ / iterations_per_epoch); epoch < spec_.epochs(); ++epoch) {
    const auto epoch_start = SteadyClock::now();
    auto loader = MakeEpochLoader(spec_, datasets_.train.get(), epoch, options_.rank, options_.world_size,
                                  iteration_ - static_cast<uint64_t>(epoch) * iterations_per_epoch, options_.data_threads,
                                  format);
    EpochSummary summary;
    summary.epoch = epoch + 1;
    double loss_sum = 0;
    uint64_t steps = 0;
    while (iteration_ < static_cast<uint64_t>(epoch + 1) * iterations_per_epoch) {
      if (hooks_.stop_requested && hooks_.stop_requested()) {
        return Fail(LoopPhase::kStopRequested, absl::AbortedError("stop requested"));
      }
      const auto wait_start = SteadyClock::now();
      if (options_.test_data_delay > absl::ZeroDuration()) absl::SleepFor(options_.test_data_delay);
      auto batch = loader->Next(absl::Minutes(10));
      if (!batch.ok()) return Fail(LoopPhase::kData, batch.status());
      const double data_wait = SecondsSince(wait_start);
      summary.data_wait_seconds += data_wait;
      auto stats = pixels ? trainer_.StepPixels(iteration_, (*batch)->pixels.data(), (*batch)->labels.data())
                          : trainer_.Step(iteration_, (*batch)->images.data(), (*batch)->labels.data());
      if (!stats.ok()) return Fail(LoopPhase::kStep, stats.status());
      loader->Recycle(std::move(*batch));
      ++iteration_;
      ++steps;
      loss_sum += stats->loss;
      summary.forward_seconds += stats->forward_s;
      summary.backward_seconds += stats->backward_s;
      summary.reduce_wait_seconds += stats->reduce_wait_s;
      summary.optimizer_seconds += stats->optimizer_s;
      summary.lr = stats->lr;
      const double elapsed = SecondsSince(epoch_start);
      if (hooks_.on_step) {
        StepReport r;
        r.epoch = epoch;
        r.iteration = iteration_;
        r.stats = *stats;
        r.data_wait_s = data_wait;
        r.worker_images_per_second = steps * local_batch / elapsed;
        hooks_.on_step(r);
      }
      if (options_.log_every > 0 && iteration_ % options_.log_every == 0) {
        Log(absl::StrFormat("  iter %d  loss %.4f  lr %.4f  %.1f img/s", iteration_, stats->loss * k, stats->lr,
                            steps * local_batch * k / elapsed));
      }
      if (options_.stop_after_iterations > 0 && iteration_ >= options_.stop_after_iterations) {
        if (auto st = Checkpoint(epoch, summary.lr); !st.ok()) return Fail(LoopPhase::kCheckpoint, st);
        result_.iterations = iteration_;
        return std::move(result_);
      }
    }
    summary.iteration = iteration_;
    summary.steps = steps;
    summary.mean_loss = steps ? loss_sum * k / steps : 0.0;
    summary.train_seconds = SecondsSince(epoch_start);
    summary.images_per_second = steps * local_batch * k / summary.train_seconds;
    summary.corrupt_skipped = loader->skipped();
    loader.reset();  // its decoder threads stop before evaluation starts its own
    if (hooks_.on_epoch_trained) hooks_.on_epoch_trained(summary);
    if (hooks_.average_bn_statistics) {
      if (auto st = hooks_.average_bn_statistics(); !st.ok()) return Fail(LoopPhase::kAverageBnStatistics, st);
    }

    if (options_.evaluate && datasets_.val) {
      LoopPhase phase = LoopPhase::kNone;
      if (auto st = Evaluate(&summary, &phase); !st.ok()) return Fail(phase, st);
    }
    summary.seconds = SecondsSince(epoch_start);
    const double n_eval = std::max<double>(1, summary.eval.examples);
    Log(absl::StrFormat("epoch %d/%d  iter %d  loss %.4f  lr %.4f  %.1f img/s%s  data wait %.1f s  val top1_err %.4f "
                        "top5_err %.4f (%d examples)  %.1f s",
                        summary.epoch, spec_.epochs(), iteration_, summary.mean_loss, summary.lr,
                        summary.images_per_second, k > 1 ? " (job)" : "", summary.data_wait_seconds,
                        1 - summary.eval.top1_correct / n_eval, 1 - summary.eval.top5_correct / n_eval,
                        summary.eval.examples, summary.seconds));
    if (hooks_.on_epoch_end) hooks_.on_epoch_end(summary);
    result_.epochs.push_back(summary);
    if (ShouldCheckpoint(summary.epoch)) {
      if (auto st = Checkpoint(summary.epoch, summary.lr); !st.ok()) return Fail(LoopPhase::kCheckpoint, st);
    }
  }
  result_.iterations = iteration_;
  return std::move(result_);
}

}  // namespace

v1::EpochRecord ToEpochRecord(const EpochSummary& e, uint32_t world_size, uint64_t global_batch) {
  v1::EpochRecord r;
  r.set_epoch(e.epoch);
  r.set_iteration(e.iteration);
  r.set_mean_loss(e.mean_loss);
  r.set_lr(e.lr);
  r.set_images_per_second(e.images_per_second);
  r.set_train_seconds(e.train_seconds);
  r.set_world_size(world_size);
  r.set_global_batch(global_batch);
  if (e.steps > 0) {
    const double n = static_cast<double>(e.steps);
    auto* t = r.mutable_step_time();
    t->set_data_wait_s(e.data_wait_seconds / n);
    t->set_forward_s(e.forward_seconds / n);
    t->set_backward_s(e.backward_seconds / n);
    t->set_exposed_comm_s(e.reduce_wait_seconds / n);
    t->set_optimizer_s(e.optimizer_seconds / n);
  }
  if (e.evaluated && e.eval.examples > 0) {
    const double n = static_cast<double>(e.eval.examples);
    auto* ev = r.mutable_evaluation();
    ev->set_epoch(e.epoch);
    ev->set_examples(e.eval.examples);
    ev->set_top1_error(1 - static_cast<double>(e.eval.top1_correct) / n);
    ev->set_top5_error(1 - static_cast<double>(e.eval.top5_correct) / n);
  }
  return r;
}

LoopResult RunTrainingLoop(const v1::JobSpec& spec, const v1::Schedule& schedule, Trainer& trainer,
                           const Datasets& datasets, uint64_t start_iteration, const LoopOptions& options,
                           const LoopHooks& hooks) {
  return Loop(spec, schedule, trainer, datasets, options, hooks).Run(start_iteration);
}

}  // namespace lmsgd::train
