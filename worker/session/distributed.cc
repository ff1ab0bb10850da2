#include "worker/session/distributed.h"

#include "worker/session/local_slot.h"

#include <unistd.h>

#include <algorithm>
#include <memory>
#include <random>
#include <set>
#include <variant>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/comm/communicator.h"
#include "worker/comm/ucx_transport.h"
#include "worker/session/coordinator_store.h"
#include "worker/session/heartbeater.h"
#include "worker/train/job_setup.h"
#include "worker/train/trainer_factory.h"
#include "worker/train/training_loop.h"

namespace lmsgd::session {
namespace {

// Why a generation ended.
enum class End { kJobDone, kStop, kRejoin };

// `comm` (null before one exists): its completed collectives go with the report.
absl::Status ReportFailureTo(CoordinatorClient* client, const v1::JoinJobResponse& join, bool fatal,
                             const absl::Status& st, comm::Communicator* comm = nullptr) {
  v1::ReportFailureRequest r;
  r.set_job_id(join.job_id());
  r.set_worker_id(join.worker_id());
  r.set_generation(join.generation());
  r.set_fatal(fatal);
  r.set_message(st.ToString());
  if (comm != nullptr) r.set_collectives_completed(comm->completed());
  return client->ReportFailure(r);
}

comm::Algorithm ToAlgorithm(v1::AllreduceAlgorithm a) {
  switch (a) {
    case v1::ALLREDUCE_RING: return comm::Algorithm::kRing;
    case v1::ALLREDUCE_HALVING_DOUBLING: return comm::Algorithm::kHalvingDoubling;
    case v1::ALLREDUCE_HIERARCHICAL: return comm::Algorithm::kHierarchical;
    case v1::ALLREDUCE_SHARED_MEMORY: return comm::Algorithm::kSharedMemory;
    default: return comm::Algorithm::kAuto;
  }
}

// One generation of the job from this worker's side, as named steps:
// Bootstrap -> ResumeOrBroadcast -> Train -> Finish (the protocol at the top of distributed.h).
class Generation {
 public:
  Generation(const WorkerOptions& options, CoordinatorClient* client, const v1::JoinJobResponse& join,
             train::Datasets* datasets)
      : options_(options), client_(client), join_(join), datasets_(datasets) {}

  // Trains this generation; kRejoin with the reason in `why` when it has to re-form.
  absl::StatusOr<End> Run(std::string* why);

 private:
  // Why the generation must re-form (reported to the coordinator unless it asked for it).
  struct Rejoin {
    std::string why;
  };
  // A Status is fatal for the job; a Rejoin re-forms it.
  using StepResult = std::variant<absl::Status, Rejoin>;

  // Builds the trainer, the Communicator's lanes (UCX addresses through the coordinator) and
  // connects the trainer's gradient exchange (NCCL on a GPU).
  StepResult Bootstrap();
  // The job's last checkpoint, or rank 0's initial weights by broadcast.
  StepResult ResumeOrBroadcast();
  // The training loop with this generation's hooks (progress, metrics, reports).
  absl::StatusOr<End> Train(std::string* why);
  // Every rank reports completion until the coordinator confirms the job's end.
  absl::StatusOr<End> Finish(std::string* why);

  Rejoin Failed(const absl::Status& st);
  absl::Time CollectiveDeadline() const { return absl::Now() + comm_options_.collective_timeout * 2; }
  void Log(const std::string& line) {
    if (options_.log) {
      *options_.log << absl::StrFormat("[rank %d/%d gen %d] ", join_.rank(), join_.world_size(), join_.generation())
                    << line << std::endl;
    }
  }

  const WorkerOptions& options_;
  CoordinatorClient* client_;
  v1::JoinJobResponse join_;
  train::Datasets* datasets_;
  // Checkpoints whose files must outlive retention (checkpoint.h): the one the job's record
  // points at and rank 0's reports not yet acknowledged. Written by the heartbeater's thread
  // (acknowledgements) and the training thread; declared before heartbeater_, which outlives
  // them in destruction order otherwise.
  absl::Mutex retained_mu_;
  std::string recorded_checkpoint_ ABSL_GUARDED_BY(retained_mu_);
  std::vector<std::string> unacknowledged_checkpoints_ ABSL_GUARDED_BY(retained_mu_);
  std::unique_ptr<train::Trainer> trainer_;
  std::unique_ptr<CoordinatorStore> store_;
  comm::CommunicatorOptions comm_options_;
  std::unique_ptr<comm::Communicator> comm_;
  std::unique_ptr<Heartbeater> heartbeater_;
  uint64_t start_iteration_ = 0;
  uint32_t evaluated_epoch_ = 0;  // an evaluation job: the epoch its checkpoint finished
};

Generation::Rejoin Generation::Failed(const absl::Status& st) {
  // The coordinator's directive caused it: nothing to report.
  if (heartbeater_ && (heartbeater_->abort() || heartbeater_->stop())) {
    return Rejoin{absl::StrCat("coordinator: ", heartbeater_->message())};
  }
  // A collective that failed logged the recorder itself; a wait that timed out did not.
  if (comm_ && !comm_->failed()) Log(comm_->FlightRecord());
  (void)ReportFailureTo(client_, join_, /*fatal=*/false, st, comm_.get());
  return Rejoin{std::string(st.message())};
}

Generation::StepResult Generation::Bootstrap() {
  const v1::JobSpec& spec = join_.spec();
  const int rank = join_.rank(), k = join_.world_size();
  ASSIGN_OR_RETURN(train::TrainerConfig config, train::TrainerConfigFromJob(spec, join_.schedule()));
  RETURN_IF_ERROR(train::CheckDevice(spec, options_.cuda_device));
  config.cuda_device = options_.cuda_device;
  ASSIGN_OR_RETURN(trainer_, train::CreateTrainer(config));

  std::vector<std::string> hosts;
  for (const auto& m : join_.members()) hosts.push_back(m.host());
  const bool single_host = std::set<std::string>(hosts.begin(), hosts.end()).size() <= 1;
  store_ = std::make_unique<CoordinatorStore>(client_, join_.job_id(), join_.generation(), rank);
  // c lanes (JobSpec concurrent_allreduces) when the gradients go over the Communicator; a
  // trainer with its own device collectives leaves it the broadcast and the counts: one lane.
  const int lanes =
      trainer_->SumsGradientsOnHost() ? static_cast<int>(std::max<uint32_t>(1, spec.concurrent_allreduces())) : 1;
  const std::string prefix = absl::StrCat("gen", join_.generation());
  const absl::Time bootstrap_deadline = absl::Now() + absl::Seconds(120);  // every lane and NCCL together
  std::vector<std::unique_ptr<comm::Transport>> transports;
  for (int lane = 0; lane < lanes; ++lane) {
    auto transport = comm::UcxTransport::Create(rank, k, store_.get(), prefix, bootstrap_deadline, single_host,
                                                rank < static_cast<int>(hosts.size()) ? hosts[rank] : "", lane);
    if (!transport.ok()) {
      return Failed(Annotate(transport.status(), absl::StrCat("communicator bootstrap",
                                                             lanes > 1 ? absl::StrCat(" (lane ", lane, ")") : "")));
    }
    transports.push_back(std::move(*transport));
  }
  comm_options_.algorithm = ToAlgorithm(spec.allreduce());
  if (static_cast<int>(hosts.size()) == k) comm_options_.host_of_rank = hosts;
  comm_options_.collective_timeout = absl::Seconds(spec.collective_timeout_s() > 0 ? spec.collective_timeout_s() : 60);
  ASSIGN_OR_RETURN(comm_, comm::Communicator::Create(std::move(transports), comm_options_));

  train::PeerGroup peers;
  peers.rank = static_cast<uint32_t>(rank);
  peers.world_size = static_cast<uint32_t>(k);
  peers.communicator = comm_.get();
  peers.store = store_.get();
  peers.key_prefix = prefix;
  peers.bootstrap_deadline = bootstrap_deadline;
  peers.bucket_bytes = spec.bucket_bytes();
  peers.first_bucket_bytes = spec.first_bucket_bytes();
  peers.collective_timeout = comm_options_.collective_timeout;
  peers.gradient_wire =
      spec.gradient_exchange_dtype() == v1::GRADIENT_EXCHANGE_BF16 ? comm::WireDtype::kBf16 : comm::WireDtype::kFp32;
  if (auto st = trainer_->ConnectPeers(peers); !st.ok()) return Failed(Annotate(st, "gradient exchange bootstrap"));
  heartbeater_ = std::make_unique<Heartbeater>(client_, join_, comm_.get());
  if (options_.metrics) options_.metrics->SetIdentity(join_.job_id(), rank, join_.generation());
  Log(absl::StrFormat("generation %d: rank %d of %d, %s", join_.generation(), rank, k, trainer_->DescribeExchange()));
  return absl::OkStatus();
}

Generation::StepResult Generation::ResumeOrBroadcast() {
  const v1::Schedule& schedule = join_.schedule();
  const std::string& path = join_.resume_from().path();
  {
    // Until rank 0's first report is acknowledged, a re-formation starts from this again.
    absl::MutexLock lock(&retained_mu_);
    recorded_checkpoint_ = !path.empty() ? path : join_.spec().init_checkpoint();
  }
  if (!path.empty()) {
    ASSIGN_OR_RETURN(checkpoint::TrainingState state,
                     checkpoint::LoadCheckpoint(path, trainer_->spec().name, &trainer_->store(), &trainer_->sgd()));
    start_iteration_ = state.iteration;
    if (state.global_batch != schedule.global_batch()) {
      // Elastic re-formation: kn changed, so did iterations per epoch; checkpoints sit at epoch
      // boundaries, so resume at the same epoch under the new schedule.
      start_iteration_ = static_cast<uint64_t>(state.epoch) * schedule.iterations_per_epoch();
      Log(absl::StrFormat("kn %d -> %d: resuming at epoch %d (iteration %d), peak lr %.4g", state.global_batch,
                          schedule.global_batch(), state.epoch, start_iteration_, schedule.peak_lr()));
    }
    Log(absl::StrCat("resumed from ", path, " at iteration ", start_iteration_));
  } else if (!join_.spec().init_checkpoint().empty()) {
    // Every rank reads the same file, as it reads the job's resume checkpoints.
    ASSIGN_OR_RETURN(train::InitFromCheckpoint init,
                     train::ApplyInitCheckpoint(join_.spec(), schedule, *trainer_,
                                                [this](const std::string& line) { Log(line); }));
    start_iteration_ = init.start_iteration;
    evaluated_epoch_ = init.epoch;
  } else {
    model::ParamStore& store = trainer_->store();
    auto params = comm_->BroadcastAsync(store.params().data(), store.params().size(), 0);
    auto buffers = comm_->BroadcastAsync(store.buffers().data(), store.buffers().size(), 0);
    for (auto* w : {&params, &buffers}) {
      if (auto st = (*w)->Wait(CollectiveDeadline()); !st.ok()) return Failed(Annotate(st, "initial weights"));
    }
  }
  return trainer_->ImportState();
}

absl::StatusOr<End> Generation::Train(std::string* why) {
  const v1::JobSpec& spec = join_.spec();
  const int rank = join_.rank(), k = join_.world_size();
  WorkerMetrics* metrics = options_.metrics;
  Heartbeater& heartbeater = *heartbeater_;
  uint64_t bytes_seen = trainer_->bytes_reduced();

  train::LoopOptions lo;
  lo.rank = static_cast<uint32_t>(rank);
  lo.world_size = static_cast<uint32_t>(k);
  lo.data_threads = train::DataThreads(spec, options_.data_threads);
  lo.write_checkpoints = rank == 0 && spec.mode() != v1::JOB_MODE_EVALUATE;
  lo.evaluated_epoch = evaluated_epoch_;
  lo.test_data_delay = options_.test_data_delay;
  lo.log = [this](const std::string& line) { Log(line); };
  train::LoopHooks hooks;
  hooks.stop_requested = [&] { return heartbeater.abort() || heartbeater.stop(); };
  hooks.on_step = [&](const train::StepReport& r) {
    v1::Progress p;
    p.set_epoch(r.epoch);
    p.set_iteration(r.iteration);
    p.set_lr(r.stats.lr);
    p.set_loss(r.stats.loss * k);  // this rank's share x k: the global loss estimated from one shard
    p.set_images_per_second(r.worker_images_per_second * k);
    heartbeater.Update(p);
    v1::StepTimeSplit t;
    t.set_data_wait_s(r.data_wait_s);
    t.set_forward_s(r.stats.forward_s);
    t.set_backward_s(r.stats.backward_s);
    t.set_exposed_comm_s(r.stats.reduce_wait_s);
    t.set_optimizer_s(r.stats.optimizer_s);
    heartbeater.AddStep(t);
    if (metrics) {
      metrics->ObserveStep(r.data_wait_s, r.stats.forward_s, r.stats.backward_s, r.stats.reduce_wait_s,
                           r.stats.optimizer_s, r.stats.loss * k, r.stats.lr, r.iteration,
                           r.worker_images_per_second);
      const uint64_t bytes = trainer_->bytes_reduced();
      metrics->AddAllreduceBytes(bytes - bytes_seen);
      bytes_seen = bytes;
    }
  };
  hooks.on_epoch_trained = [&](const train::EpochSummary& e) {
    if (metrics) {
      metrics->SetEpoch(e.epoch);
      metrics->AddCorrupt(e.corrupt_skipped);
    }
    v1::Progress p;  // the epoch is complete
    p.set_epoch(e.epoch);
    p.set_iteration(e.iteration);
    p.set_lr(e.lr);
    p.set_loss(e.mean_loss);
    p.set_images_per_second(e.images_per_second);
    heartbeater.Update(p);
  };
  if (k > 1) {
    hooks.average_bn_statistics = [&]() -> absl::Status {
      RETURN_IF_ERROR(trainer_->ExportState());
      std::vector<float>& b = trainer_->store().buffers();
      RETURN_IF_ERROR(comm_->AllreduceAsync(b.data(), b.size())->Wait(CollectiveDeadline()));
      for (float& v : b) v /= static_cast<float>(k);
      return trainer_->ImportState();
    };
  }
  // The counts travel as floats: exact up to 2^24 examples per count.
  hooks.sum_eval_counts = [&](train::EvalCounts* c) -> absl::Status {
    float counts[3] = {static_cast<float>(c->examples), static_cast<float>(c->top1_correct),
                       static_cast<float>(c->top5_correct)};
    RETURN_IF_ERROR(comm_->AllreduceAsync(counts, 3)->Wait(CollectiveDeadline()));
    c->examples = static_cast<uint64_t>(counts[0]);
    c->top1_correct = static_cast<uint64_t>(counts[1]);
    c->top5_correct = static_cast<uint64_t>(counts[2]);
    return absl::OkStatus();
  };
  hooks.on_epoch_end = [&](const train::EpochSummary& e) {
    v1::ReportEpochRequest r;
    *r.mutable_record() = train::ToEpochRecord(e, static_cast<uint32_t>(k), join_.schedule().global_batch());
    if (metrics && r.record().has_evaluation()) {
      metrics->SetEvaluation(r.record().evaluation().top1_error(), r.record().evaluation().top5_error());
    }
    if (rank != 0) return;
    r.set_job_id(join_.job_id());
    r.set_worker_id(join_.worker_id());
    r.set_generation(join_.generation());
    heartbeater.Post([this, r] { (void)client_->ReportEpoch(r); });
  };
  hooks.on_checkpoint = [&](const std::string& path, uint32_t epochs_done, uint64_t iteration) {
    v1::ReportCheckpointRequest r;
    r.set_job_id(join_.job_id());
    r.set_worker_id(join_.worker_id());
    auto* ci = r.mutable_checkpoint();
    ci->set_path(path);
    ci->set_epoch(epochs_done);
    ci->set_iteration(iteration);
    ci->set_generation(join_.generation());
    {
      absl::MutexLock lock(&retained_mu_);
      unacknowledged_checkpoints_.push_back(path);
    }
    heartbeater.Post([this, r] {
      if (auto st = client_->ReportCheckpoint(r); !st.ok()) {
        // Not recorded (or not known to be): the file stays until a later one is.
        Log(absl::StrCat("ReportCheckpoint: ", st.ToString()));
        return;
      }
      absl::MutexLock lock(&retained_mu_);
      recorded_checkpoint_ = r.checkpoint().path();
      auto& u = unacknowledged_checkpoints_;
      auto it = std::find(u.begin(), u.end(), recorded_checkpoint_);
      if (it != u.end()) u.erase(u.begin(), it + 1);
    });
  };
  hooks.retained_checkpoints = [this] {
    absl::MutexLock lock(&retained_mu_);
    std::set<std::string> keep(unacknowledged_checkpoints_.begin(), unacknowledged_checkpoints_.end());
    if (!recorded_checkpoint_.empty()) keep.insert(recorded_checkpoint_);
    return keep;
  };

  train::LoopResult result =
      train::RunTrainingLoop(spec, join_.schedule(), *trainer_, *datasets_, start_iteration_, lo, hooks);
  switch (result.failed_in) {
    case train::LoopPhase::kNone: return Finish(why);
    case train::LoopPhase::kStopRequested:
    case train::LoopPhase::kStep:
    case train::LoopPhase::kAverageBnStatistics:
    case train::LoopPhase::kSumEvalCounts: {
      // A peer, the network or the coordinator ended this generation: re-form.
      if (heartbeater.stop()) return End::kStop;
      *why = Failed(result.status).why;
      return End::kRejoin;
    }
    default:  // the data, the evaluation or the checkpoint: the same in every generation
      return Annotate(result.status, train::LoopPhaseName(result.failed_in));
  }
}

absl::StatusOr<End> Generation::Finish(std::string* why) {
  // Every rank reports completion (after its queued reports) until the coordinator says the job
  // ended (STOP); rank 0's report ends it. If the job is being re-formed instead (e.g. the
  // coordinator restarted and lost track of a worker), re-join: the new generation resumes
  // from the last checkpoint and finishes.
  Heartbeater& heartbeater = *heartbeater_;
  heartbeater.Flush(absl::Minutes(2));
  const absl::Time give_up = absl::Now() + absl::Minutes(10);
  while (absl::Now() < give_up) {
    auto resp = heartbeater.Beat(true);
    if (resp.ok() && resp->directive() == v1::DIRECTIVE_STOP) return End::kJobDone;
    if (heartbeater.abort() || (resp.ok() && resp->directive() == v1::DIRECTIVE_ABORT_AND_REJOIN)) {
      *why = absl::StrCat("finished, but the coordinator re-forms the job: ", heartbeater.message());
      return End::kRejoin;
    }
    if (!resp.ok()) Log(absl::StrCat("final heartbeat: ", resp.status().ToString()));
    absl::SleepFor(absl::Milliseconds(200));
  }
  return absl::DeadlineExceededError("finished training, but the coordinator never confirmed the job's end");
}

absl::StatusOr<End> Generation::Run(std::string* why) {
  for (StepResult (Generation::*step)() : {&Generation::Bootstrap, &Generation::ResumeOrBroadcast}) {
    StepResult r = (this->*step)();
    if (auto* rejoin = std::get_if<Rejoin>(&r)) {
      if (heartbeater_ && heartbeater_->stop()) return End::kStop;
      *why = rejoin->why;
      return End::kRejoin;
    }
    RETURN_IF_ERROR(std::get<absl::Status>(r));
  }
  return Train(why);
}

}  // namespace

absl::Status RunWorker(const WorkerOptions& o) {
  auto client = CoordinatorClient::Create(o.client);
  if (!client.ok()) return client.status();
  v1::WorkerIdentity id;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  id.set_host(o.host.empty() ? host : o.host);
  std::random_device rd;
  id.set_incarnation(absl::StrFormat("%08x%08x-%d", rd(), rd(), getpid()));
  // Held until this function returns (the process's life as a worker).
  auto slot = LocalSlot::Claim(o.slot_dir.empty() ? DefaultSlotDir() : o.slot_dir, o.client.address, id.host(),
                               o.local_device, id.incarnation());
  if (!slot.ok()) return slot.status();
  id.set_local_device(static_cast<uint32_t>((*slot)->index()));
  id.set_replaces_incarnation((*slot)->previous_incarnation());
  if (o.log != nullptr && o.local_device < 0) {
    *o.log << "local device " << (*slot)->index() << " (" << (*slot)->source() << ")" << std::endl;
  }
  id.set_build_version(LMSGD_VERSION);
  id.set_device(o.cuda_device >= 0 ? v1::DEVICE_CUDA : v1::DEVICE_CPU);
  train::SetComputeThreads(o.threads);
  std::string job_id = o.job_id;
  uint64_t last_generation = 0;
  std::unique_ptr<train::Datasets> datasets;
  std::string datasets_for;  // job id the datasets were opened for
  for (int g = 0; g < o.max_generations; ++g) {
    auto join = (*client)->Join(id, job_id, absl::Now() + o.join_timeout, last_generation);
    if (!join.ok()) return join.status();
    if (datasets == nullptr || datasets_for != join->job_id()) {
      auto ds = train::OpenDatasets(join->spec());
      if (!ds.ok()) {
        (void)ReportFailureTo(client->get(), *join, /*fatal=*/true, ds.status());
        return ds.status();
      }
      datasets = std::make_unique<train::Datasets>(std::move(*ds));
      datasets_for = join->job_id();
    }
    if (o.log) {
      *o.log << absl::StrFormat("joined job %s as rank %d of %d (generation %d, kn=%d, peak lr %.4g)%s", join->job_id(),
                                join->rank(), join->world_size(), join->generation(), join->schedule().global_batch(),
                                join->schedule().peak_lr(),
                                join->resume_from().path().empty() ? "" : ", resuming from " + join->resume_from().path())
             << std::endl;
    }
    std::string why;
    auto end = Generation(o, client->get(), *join, datasets.get()).Run(&why);
    if (!end.ok()) {
      // Deterministic failures (a corrupt file without skip_corrupt, an unloadable checkpoint, a
      // bad spec) would fail every re-formation the same way: they fail the job, naming the cause.
      const absl::StatusCode c = end.status().code();
      const bool fatal = c == absl::StatusCode::kDataLoss || c == absl::StatusCode::kInvalidArgument ||
                         c == absl::StatusCode::kNotFound || c == absl::StatusCode::kFailedPrecondition;
      (void)ReportFailureTo(client->get(), *join, fatal, end.status());
      return end.status();
    }
    if (*end == End::kJobDone || *end == End::kStop) return absl::OkStatus();
    if (o.log) *o.log << "generation " << join->generation() << " ended: " << why << "; re-joining" << std::endl;
    job_id = join->job_id();
    last_generation = join->generation();
  }
  return absl::ResourceExhaustedError(absl::StrCat("gave up after ", o.max_generations, " generations"));
}

}  // namespace lmsgd::session
