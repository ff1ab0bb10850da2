#include "worker/distributed.h"

#ifdef LMSGD_HAVE_CUDA
#include "worker/comm/nccl_communicator.h"
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/stopwatch.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/comm/bucketer.h"
#include "worker/comm/communicator.h"
#include "worker/comm/ucx_transport.h"
#include "worker/coordinator_store.h"
#include "worker/data/loader.h"
#include "worker/data/sampler.h"
#include "worker/job_setup.h"

namespace lmsgd::worker {
namespace {

using Clock = SteadyClock;

// Why a generation ended.
enum class End { kJobDone, kStop, kRejoin };

// Heartbeats progress from a background thread and sends the reports (evaluation, checkpoint)
// queued by the training loop, so that no coordinator RPC ever blocks a step (the coordinator
// may be restarting: RPCs retry with backoff). Turns the coordinator's directive into flags the
// training loop polls.
class Heartbeater {
 public:
  Heartbeater(CoordinatorClient* client, const v1::JoinJobResponse& join, comm::Communicator* comm)
      : client_(client), join_(join), comm_(comm) {
    const double interval = join.heartbeat_interval_s() > 0 ? join.heartbeat_interval_s() : 2.0;
    thread_ = std::thread([this, interval] { Loop(absl::Seconds(interval)); });
    reporter_ = std::thread([this] { ReportLoop(); });
  }
  ~Heartbeater() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
    reporter_.join();
  }
  void Update(const v1::Progress& p) {
    std::lock_guard<std::mutex> lock(mu_);
    progress_ = p;
  }
  // Runs `report` on the background thread, in order.
  void Post(std::function<void()> report) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      reports_.push_back(std::move(report));
    }
    cv_.notify_all();
  }
  // Waits (bounded) until every posted report has been sent.
  void Flush(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return reports_.empty() && !sending_; });
  }
  bool abort() const { return abort_.load(); }
  bool stop() const { return stop_.load(); }
  std::string message() {
    std::lock_guard<std::mutex> lock(mu_);
    return message_;
  }
  // One synchronous heartbeat (e.g. completed=true); returns the directive.
  absl::StatusOr<v1::HeartbeatResponse> Beat(bool completed) {
    v1::HeartbeatRequest r;
    r.set_job_id(join_.job_id());
    r.set_worker_id(join_.worker_id());
    r.set_generation(join_.generation());
    r.set_rank(join_.rank());
    {
      std::lock_guard<std::mutex> lock(mu_);
      *r.mutable_progress() = progress_;
    }
    r.set_completed(completed);
    auto resp = client_->Heartbeat(r);
    if (resp.ok()) Act(*resp);
    return resp;
  }

 private:
  void Act(const v1::HeartbeatResponse& resp) {
    if (resp.directive() == v1::DIRECTIVE_ABORT_AND_REJOIN || resp.directive() == v1::DIRECTIVE_STOP) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        message_ = resp.message();
      }
      (resp.directive() == v1::DIRECTIVE_STOP ? stop_ : abort_).store(true);
      comm_->Abort();  // a collective in flight returns at once
    }
  }
  // Heartbeats on their own thread: a report retrying through a coordinator restart must not
  // delay them past the heartbeat timeout.
  void Loop(absl::Duration interval) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (cv_.wait_for(lock, absl::ToChronoNanoseconds(interval), [&] { return done_; })) return;
      }
      (void)Beat(false);  // errors: retried by the client; the coordinator's timeout decides
    }
  }
  void ReportLoop() {
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

  CoordinatorClient* client_;
  v1::JoinJobResponse join_;
  comm::Communicator* comm_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false, sending_ = false;
  std::deque<std::function<void()>> reports_;
  v1::Progress progress_;
  std::string message_;
  std::atomic<bool> abort_{false}, stop_{false};
  std::thread thread_, reporter_;
};

absl::Status ReportFailureTo(CoordinatorClient* client, const v1::JoinJobResponse& join, bool fatal,
                             const absl::Status& st) {
  v1::ReportFailureRequest r;
  r.set_job_id(join.job_id());
  r.set_worker_id(join.worker_id());
  r.set_generation(join.generation());
  r.set_fatal(fatal);
  r.set_message(st.ToString());
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

class Generation {
 public:
  Generation(const WorkerOptions& o, CoordinatorClient* client, const v1::JoinJobResponse& join,
             train::Datasets* datasets)
      : o_(o), client_(client), join_(join), datasets_(datasets) {}

  // Trains this generation; kRejoin with the reason in `why` when it has to re-form.
  absl::StatusOr<End> Run(std::string* why);

 private:
  void Log(const std::string& line) {
    if (o_.log) *o_.log << absl::StrFormat("[rank %d/%d gen %d] ", join_.rank(), join_.world_size(), join_.generation())
                        << line << std::endl;
  }
  absl::Status ReportFailure(const absl::Status& st) { return ReportFailureTo(client_, join_, false, st); }

  const WorkerOptions& o_;
  CoordinatorClient* client_;
  v1::JoinJobResponse join_;
  train::Datasets* datasets_;
};

absl::StatusOr<End> Generation::Run(std::string* why) {
  const v1::JobSpec& spec = join_.spec();
  const v1::Schedule& schedule = join_.schedule();
  const int rank = join_.rank(), k = join_.world_size();
  auto config = train::TrainerConfigFromJob(spec, schedule);
  if (!config.ok()) return config.status();
  if (auto st = train::CheckDevice(spec, o_.cuda_device); !st.ok()) return st;
  config->cuda_device = o_.cuda_device;
  auto trainer_or = train::Trainer::Create(*config);
  if (!trainer_or.ok()) return trainer_or.status();
  train::Trainer& trainer = **trainer_or;

  // Communicator for (job, generation), bootstrapped through the coordinator.
  std::vector<std::string> hosts;
  for (const auto& m : join_.members()) hosts.push_back(m.host());
  const bool single_host = std::set<std::string>(hosts.begin(), hosts.end()).size() <= 1;
  CoordinatorStore store(client_, join_.job_id(), join_.generation(), rank);
  // c lanes (JobSpec concurrent_allreduces) for the CPU gradient exchange; on the GPU the
  // gradients go over NCCL and this communicator only broadcasts and counts: one lane.
  const int lanes = trainer.on_gpu() ? 1 : static_cast<int>(std::max<uint32_t>(1, spec.concurrent_allreduces()));
  std::vector<std::unique_ptr<comm::Transport>> transports;
  const absl::Time bootstrap_deadline = absl::Now() + absl::Seconds(120);  // for all the lanes together
  for (int lane = 0; lane < lanes; ++lane) {
    auto transport = comm::UcxTransport::Create(rank, k, &store, absl::StrCat("gen", join_.generation()),
                                                bootstrap_deadline, single_host,
                                                rank < static_cast<int>(hosts.size()) ? hosts[rank] : "", lane);
    if (!transport.ok()) {
      *why = absl::StrCat("communicator bootstrap", lanes > 1 ? absl::StrCat(" (lane ", lane, ")") : "", ": ",
                          transport.status().message());
      (void)ReportFailure(transport.status());
      return End::kRejoin;
    }
    transports.push_back(std::move(*transport));
  }
  comm::CommunicatorOptions copt;
  copt.algorithm = ToAlgorithm(spec.allreduce());
  if (static_cast<int>(hosts.size()) == k) copt.host_of_rank = hosts;
  copt.collective_timeout = absl::Seconds(spec.collective_timeout_s() > 0 ? spec.collective_timeout_s() : 60);
  auto comm = comm::Communicator::Create(std::move(transports), copt);
  if (!comm.ok()) return comm.status();
#ifdef LMSGD_HAVE_CUDA
  // GPU gradients go over NCCL (unique id through the coordinator, like the UCX addresses);
  // the UCX communicator stays for the broadcast of initial weights and evaluation counts.
  std::unique_ptr<comm::NcclCommunicator> nccl;
  if (trainer.on_gpu() && k > 1) {
    auto n = comm::NcclCommunicator::Create(rank, k, o_.cuda_device, &store, absl::StrCat("gen", join_.generation()),
                                            absl::Now() + absl::Seconds(120));
    if (!n.ok()) {
      *why = absl::StrCat("NCCL bootstrap: ", n.status().message());
      (void)ReportFailure(n.status());
      return End::kRejoin;
    }
    nccl = std::move(*n);
    if (auto st = trainer.AttachNccl(nccl.get(), spec.bucket_bytes(), spec.first_bucket_bytes()); !st.ok()) return st;
  }
#endif
  Heartbeater heart(client_, join_, comm->get());
  WorkerMetrics* metrics = o_.metrics;
  if (metrics) metrics->SetIdentity(join_.job_id(), rank, join_.generation());
  // Deadline for waiting on one collective, from now (each collective also has its own timeout).
  auto far = [&] { return absl::Now() + copt.collective_timeout * 2; };

  auto failed = [&](const absl::Status& st) -> absl::StatusOr<End> {
    if (heart.stop()) return End::kStop;
    *why = heart.abort() ? absl::StrCat("coordinator: ", heart.message()) : std::string(st.message());
    if (!heart.abort()) (void)ReportFailure(st);
    return End::kRejoin;
  };

  // Starting point: the job's last checkpoint, or rank 0's initial weights.
  uint64_t iteration = 0;
  const std::string model_name = trainer.spec().name;
  if (!join_.resume_from().path().empty()) {
    auto state = checkpoint::LoadCheckpoint(join_.resume_from().path(), model_name, &trainer.store(), &trainer.sgd());
    if (!state.ok()) return state.status();
    iteration = state->iteration;
    if (state->global_batch != schedule.global_batch()) {
      // Elastic re-formation: kn changed, so did iterations per epoch; checkpoints sit at epoch
      // boundaries, so resume at the same epoch under the new schedule.
      iteration = static_cast<uint64_t>(state->epoch) * schedule.iterations_per_epoch();
      Log(absl::StrFormat("kn %d -> %d: resuming at epoch %d (iteration %d), peak lr %.4g", state->global_batch,
                          schedule.global_batch(), state->epoch, iteration, schedule.peak_lr()));
    }
    Log(absl::StrCat("resumed from ", join_.resume_from().path(), " at iteration ", iteration));
  } else {
    auto w1 = (*comm)->BroadcastAsync(trainer.store().params().data(), trainer.store().params().size(), 0);
    auto w2 = (*comm)->BroadcastAsync(trainer.store().buffers().data(), trainer.store().buffers().size(), 0);
    for (auto* w : {&w1, &w2}) {
      if (auto st = (*w)->Wait(far()); !st.ok()) return failed(st);
    }
  }
  if (auto st = trainer.HostStateChanged(); !st.ok()) return st;  // GPU: weights to the device

  const uint64_t ipe = schedule.iterations_per_epoch();
  const uint64_t local_batch = static_cast<uint64_t>(spec.per_worker_batch()) * spec.virtual_workers_per_worker();
  comm::BucketedReducer reducer(comm->get(), &trainer.store(), spec.bucket_bytes(), spec.first_bucket_bytes(),
                                copt.collective_timeout);
  if (!trainer.on_gpu()) {
    Log(absl::StrFormat("generation %d: rank %d of %d, gradients in %d buckets on %d allreduce lane(s)",
                        join_.generation(), rank, k, reducer.buckets().size(), (*comm)->lanes()));
  }
  for (uint32_t epoch = static_cast<uint32_t>(iteration / ipe); epoch < spec.epochs(); ++epoch) {
    const auto epoch_start = Clock::now();
    auto loader_ptr = train::MakeEpochLoader(spec, datasets_->train.get(), epoch, static_cast<uint32_t>(rank),
                                             static_cast<uint32_t>(k),
                                      iteration - static_cast<uint64_t>(epoch) * ipe, o_.data_threads);
    data::BatchLoader& loader = *loader_ptr;
    double loss_sum = 0, lr = 0;
    uint64_t steps = 0;
    while (iteration < static_cast<uint64_t>(epoch + 1) * ipe) {
      if (heart.abort() || heart.stop()) return failed(absl::AbortedError("directive"));
      const auto wait_start = Clock::now();
      auto batch = loader.Next(absl::Minutes(10));
      if (!batch.ok()) return batch.status();
      const double data_wait = SecondsSince(wait_start);
      const uint64_t bytes_before = reducer.bytes_reduced();
      auto stats = trainer.Step(iteration, (*batch)->images.data(), (*batch)->labels.data(), &reducer);
      if (!stats.ok()) return failed(stats.status());
      ++iteration;
      ++steps;
      loss_sum += stats->loss;
      lr = stats->lr;
      v1::Progress p;
      p.set_epoch(epoch);
      p.set_iteration(iteration);
      p.set_lr(stats->lr);
      p.set_loss(stats->loss * k);  // rank 0's share x k: the global loss estimated from one shard
      p.set_images_per_second(steps * local_batch * k / SecondsSince(epoch_start));
      heart.Update(p);
      if (metrics) {
        metrics->ObserveStep(data_wait, stats->forward_s, stats->backward_s, stats->reduce_wait_s, stats->optimizer_s,
                             stats->loss * k, stats->lr, iteration, steps * local_batch / SecondsSince(epoch_start));
        metrics->AddAllreduceBytes(reducer.bytes_reduced() - bytes_before);
      }
    }
    if (metrics) {
      metrics->SetEpoch(epoch + 1);
      metrics->AddCorrupt(loader.skipped());
    }
    {
      v1::Progress p;  // the epoch is complete
      p.set_epoch(epoch + 1);
      p.set_iteration(iteration);
      p.set_lr(lr);
      p.set_loss(steps ? loss_sum * k / steps : 0.0);
      p.set_images_per_second(steps * local_batch * k / SecondsSince(epoch_start));
      heart.Update(p);
    }
    // Sharded evaluation, counts summed over ranks.
    const double train_s = SecondsSince(epoch_start);
    float counts[3] = {0, 0, 0};
    if (datasets_->val) {
      auto c = trainer.Evaluate(*datasets_->val, static_cast<uint32_t>(rank), static_cast<uint32_t>(k), o_.data_threads);
      if (!c.ok()) return c.status();
      counts[0] = static_cast<float>(c->examples);
      counts[1] = static_cast<float>(c->top1_correct);
      counts[2] = static_cast<float>(c->top5_correct);
      if (auto st = (*comm)->AllreduceAsync(counts, 3)->Wait(far()); !st.ok()) return failed(st);
    }
    const double n_eval = std::max(1.0f, counts[0]);
    v1::Evaluation ev;
    ev.set_epoch(epoch + 1);
    ev.set_examples(static_cast<uint64_t>(counts[0]));
    ev.set_top1_error(1 - counts[1] / n_eval);
    ev.set_top5_error(1 - counts[2] / n_eval);
    if (metrics && counts[0] > 0) metrics->SetEvaluation(ev.top1_error(), ev.top5_error());
    Log(absl::StrFormat("epoch %d/%d  iter %d  loss %.4f  lr %.4f  %.1f img/s (job)  val top1_err %.4f top5_err %.4f",
                        epoch + 1, spec.epochs(), iteration, steps ? loss_sum * k / steps : 0.0, lr,
                        steps * local_batch * k / train_s, ev.top1_error(), ev.top5_error()));
    if (rank == 0 && counts[0] > 0) {
      v1::ReportEvaluationRequest r;
      r.set_job_id(join_.job_id());
      r.set_worker_id(join_.worker_id());
      r.set_generation(join_.generation());
      *r.mutable_evaluation() = ev;
      heart.Post([this, r] { (void)client_->ReportEvaluation(r); });
    }
    const uint32_t interval = spec.checkpoint_interval_epochs();
    const uint32_t done_epochs = epoch + 1;
    if (rank == 0 && !spec.checkpoint_dir().empty() &&
        ((interval > 0 && done_epochs % interval == 0) || done_epochs == spec.epochs())) {
      checkpoint::TrainingState state{iteration, done_epochs, model_name, spec.seed(), schedule.global_batch(),
                                      static_cast<uint32_t>(k), lr};
      if (auto st = trainer.SyncHostState(); !st.ok()) return st;
      auto path = checkpoint::SaveCheckpoint(spec.checkpoint_dir(), trainer.store(), trainer.sgd(), state);
      if (!path.ok()) return path.status();
      v1::ReportCheckpointRequest r;
      r.set_job_id(join_.job_id());
      r.set_worker_id(join_.worker_id());
      auto* ci = r.mutable_checkpoint();
      ci->set_path(*path);
      ci->set_epoch(done_epochs);
      ci->set_iteration(iteration);
      ci->set_generation(join_.generation());
      heart.Post([this, r] {
        if (auto st = client_->ReportCheckpoint(r); !st.ok()) Log(absl::StrCat("ReportCheckpoint: ", st.ToString()));
      });
      Log(absl::StrCat("checkpoint ", *path));
    }
  }
  // Every rank reports completion (after its queued reports) until the coordinator says the job
  // ended (STOP); rank 0's report ends it. If the job is being re-formed instead (e.g. the
  // coordinator restarted and lost track of a worker), re-join: the new generation resumes
  // from the last checkpoint and finishes.
  heart.Flush(absl::Minutes(2));
  const absl::Time give_up = absl::Now() + absl::Minutes(10);
  while (absl::Now() < give_up) {
    auto resp = heart.Beat(true);
    if (resp.ok() && resp->directive() == v1::DIRECTIVE_STOP) return End::kJobDone;
    if (heart.abort() || (resp.ok() && resp->directive() == v1::DIRECTIVE_ABORT_AND_REJOIN)) {
      *why = absl::StrCat("finished, but the coordinator re-forms the job: ", heart.message());
      return End::kRejoin;
    }
    if (!resp.ok()) Log(absl::StrCat("final heartbeat: ", resp.status().ToString()));
    absl::SleepFor(absl::Milliseconds(200));
  }
  return absl::DeadlineExceededError("finished training, but the coordinator never confirmed the job's end");
}

}  // namespace

absl::Status RunWorker(const WorkerOptions& o) {
  auto client = CoordinatorClient::Create(o.client);
  if (!client.ok()) return client.status();
  v1::WorkerIdentity id;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  id.set_host(o.host.empty() ? host : o.host);
  id.set_local_device(o.local_device);
  std::random_device rd;
  id.set_incarnation(absl::StrFormat("%08x%08x-%d", rd(), rd(), getpid()));
  id.set_build_version(LMSGD_VERSION);
  id.set_device(o.cuda_device >= 0 ? v1::DEVICE_CUDA : v1::DEVICE_CPU);
  backend::onednn::SetNumThreads(o.threads);
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

}  // namespace lmsgd::worker
