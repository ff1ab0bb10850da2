#include "coordinator/ctl/ctl.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/history.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "coordinator/ctl/experiment.h"
#include "coordinator/ctl/experiment_runner.h"
#include "coordinator/ctl/report.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "lmsgd/v1/coordinator.grpc.pb.h"
#include "worker/data/tar_shards.h"

namespace lmsgd::ctl {
namespace {

constexpr char kUsage[] =
    "usage: lmsgdctl [--coordinator ADDR] [--output table|json|csv] [--token_file F] [--tls_ca F]\n"
    "                [--tls_cert F --tls_key F] [--timeout SECONDS] COMMAND\n"
    "commands:\n"
    "  submit JOBFILE            submit a job (.textproto/.txtpb text format or .json)\n"
    "  status JOB                show a job\n"
    "  list [--all]              list live jobs (--all: ended ones too)\n"
    "  watch JOB                 follow a job's progress until it ends\n"
    "  cancel JOB [--reason R]   cancel a job\n"
    "  history JOB               the job's per-epoch history (--output table|json|csv)\n"
    "  resubmit JOB              a failed or cancelled job again, continuing from its last checkpoint\n"
    "                            (prints the new job's id)\n"
    "  evaluate CHECKPOINT [--job JOBFILE] [--dataset KIND:VAL_PATH] [--model M] [--world_size K]\n"
    "                            evaluate a checkpoint (lmsgd's, or safetensors with torchvision names)\n"
    "                            on k workers and print top-1 / top-5; the job file gives the model\n"
    "                            and dataset (KIND: image_folder, tar_shards, idx, synthetic)\n"
    "  experiment run FILE [--out DIR] [--standalone [--threads N]] [--run_timeout SECONDS]\n"
    "                            run every arm x seed (through the coordinator, or in this process),\n"
    "                            resuming a sweep that was interrupted, then write the report to DIR\n"
    "                            (default: experiments/<name>)\n"
    "  experiment report DIR     render DIR's table and plots again from its CSVs\n"
    "  dataset pack IMAGE_FOLDER OUT_DIR [--shard_size SIZE] [--shuffle_seed N]\n"
    "                            write the folder as WebDataset tar shards (SIZE: bytes, or with\n"
    "                            K/M/G (1024-based) or KB/MB/GB; default 1G) and classes.txt\n"
    "  dataset unpack SHARDS OUT_DIR\n"
    "                            write the shards (a directory or a comma-separated list) back as an\n"
    "                            ImageFolder\n";

struct Options {
  std::string coordinator = "127.0.0.1:7070";
  std::string output = "table";
  std::string token;
  std::string token_file;
  TlsFiles tls;
  double timeout_s = 10;
  bool all = false;
  bool standalone = false;
  int threads = 0;
  double run_timeout_s = 86400;
  std::string reason;
  std::string out;
  std::string shard_size = "1G";
  std::string job_file, dataset, model, world_size;  // evaluate
  uint64_t shuffle_seed = 0;
  std::vector<std::string> positional;
};

std::string StateLabel(v1::JobState s) {
  std::string n = v1::JobState_Name(s);
  if (absl::StartsWith(n, "JOB_STATE_")) n = n.substr(10);
  for (auto& c : n) c = static_cast<char>(std::tolower(c));
  return n;
}

std::string ToJson(const google::protobuf::Message& m, bool pretty) { return ProtoToJson(m, pretty); }

std::string FormatTime(int64_t ms) {
  if (ms == 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", absl::FromUnixMillis(ms), absl::UTCTimeZone());
}

class Client {
 public:
  Client(const Options& o, std::shared_ptr<grpc::ChannelCredentials> creds)
      : options_(o),
        stub_(v1::Coordinator::NewStub(grpc::CreateChannel(o.coordinator, creds))) {}

  std::unique_ptr<grpc::ClientContext> Context(bool with_deadline = true) const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (with_deadline) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(options_.timeout_s * 1000)));
    }
    if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
    return ctx;
  }

  // Turns a failed call into a message that says what to do about it.
  std::string Explain(const grpc::Status& st, const std::string& what) const {
    switch (st.error_code()) {
      case grpc::StatusCode::UNAVAILABLE:
        return absl::StrCat("cannot reach coordinator at ", options_.coordinator, ": ", st.error_message(),
                            " (is lmsgd-coordinator running? set --coordinator or LMSGD_COORDINATOR)");
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return absl::StrCat("coordinator at ", options_.coordinator, " did not answer ", what, " within ",
                            options_.timeout_s, "s");
      case grpc::StatusCode::UNAUTHENTICATED:
        return absl::StrCat(what, " refused: ", st.error_message(),
                            " (pass --token_file or set LMSGD_TOKEN)");
      default:
        return absl::StrCat(what, " failed: ", st.error_message());
    }
  }

  v1::Coordinator::Stub& stub() { return *stub_; }

 private:
  const Options& options_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

bool ParseArgs(const std::vector<std::string>& args, Options* o, std::string* error) {
  if (const char* env = std::getenv("LMSGD_COORDINATOR"); env != nullptr && *env) o->coordinator = env;
  if (const char* env = std::getenv("LMSGD_TOKEN"); env != nullptr && *env) o->token = env;
  if (const char* env = std::getenv("LMSGD_TOKEN_FILE"); env != nullptr && *env) o->token_file = env;
  static const std::map<std::string, std::string Options::*> kStringFlags = {
      {"coordinator", &Options::coordinator}, {"output", &Options::output},
      {"token_file", &Options::token_file}, {"reason", &Options::reason}, {"out", &Options::out},
      {"shard_size", &Options::shard_size}, {"job", &Options::job_file}, {"dataset", &Options::dataset},
      {"model", &Options::model}, {"world_size", &Options::world_size}};
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.size() < 2 || a[0] != '-' || a[1] != '-') {
      o->positional.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (name == "all") {
      o->all = true;
      continue;
    }
    if (name == "standalone") {
      o->standalone = true;
      continue;
    }
    if (name == "help") {
      *error = "";
      return false;
    }
    if (!has_value) {
      if (i + 1 >= args.size()) {
        *error = absl::StrCat("flag --", name, " needs a value");
        return false;
      }
      value = args[++i];
    }
    if (auto it = kStringFlags.find(name); it != kStringFlags.end()) {
      o->*(it->second) = value;
    } else if (name == "tls_ca") {
      o->tls.ca = value;
    } else if (name == "tls_cert") {
      o->tls.cert = value;
    } else if (name == "tls_key") {
      o->tls.key = value;
    } else if (name == "threads") {
      if (!absl::SimpleAtoi(value, &o->threads) || o->threads < 0) {
        *error = absl::StrCat("--threads: '", value, "' is not a number of threads");
        return false;
      }
    } else if (name == "shuffle_seed") {
      if (!absl::SimpleAtoi(value, &o->shuffle_seed)) {
        *error = absl::StrCat("--shuffle_seed: '", value, "' is not a non-negative integer");
        return false;
      }
    } else if (name == "run_timeout") {
      if (!absl::SimpleAtod(value, &o->run_timeout_s) || o->run_timeout_s <= 0) {
        *error = absl::StrCat("--run_timeout: '", value, "' is not a positive number of seconds");
        return false;
      }
    } else if (name == "timeout") {
      if (!absl::SimpleAtod(value, &o->timeout_s) || o->timeout_s <= 0) {
        *error = absl::StrCat("--timeout: '", value, "' is not a positive number of seconds");
        return false;
      }
    } else {
      *error = absl::StrCat("unknown flag --", name);
      return false;
    }
  }
  if (o->output != "table" && o->output != "json" && o->output != "csv") {
    *error = absl::StrCat("--output must be 'table', 'json' or 'csv', not '", o->output, "'");
    return false;
  }
  return true;
}

absl::StatusOr<v1::JobStatus> GetJob(Client& c, const std::string& job_id) {
  v1::GetJobRequest req;
  req.set_job_id(job_id);
  v1::JobStatus resp;
  auto ctx = c.Context();
  grpc::Status st = c.stub().GetJob(ctx.get(), req, &resp);
  if (!st.ok()) return absl::Status(static_cast<absl::StatusCode>(st.error_code()), c.Explain(st, "status"));
  return resp;
}

absl::StatusOr<std::string> SubmitJob(Client& c, const v1::JobSpec& spec) {
  v1::JobSpec filled = spec;
  ApplyDefaults(&filled);
  RETURN_IF_ERROR(ValidateJobSpec(filled));
  v1::SubmitJobRequest req;
  *req.mutable_spec() = spec;
  v1::SubmitJobResponse resp;
  auto ctx = c.Context();
  grpc::Status st = c.stub().SubmitJob(ctx.get(), req, &resp);
  if (!st.ok()) return absl::Status(static_cast<absl::StatusCode>(st.error_code()), c.Explain(st, "submit"));
  return resp.job_id();
}

// The coordinator for the experiment runner, over lmsgdctl's channel.
class CoordinatorJobs final : public JobService {
 public:
  explicit CoordinatorJobs(Client& c) : c_(c) {}
  absl::StatusOr<std::string> Submit(const v1::JobSpec& spec) override { return SubmitJob(c_, spec); }
  absl::StatusOr<v1::JobStatus> Get(const std::string& job_id) override { return GetJob(c_, job_id); }

 private:
  Client& c_;
};

// "1G", "512MiB", "100MB", "4096": bytes.
bool ParseByteSize(const std::string& text, uint64_t* bytes) {
  static const std::vector<std::pair<std::string, uint64_t>> kUnits = {
      {"KiB", 1ull << 10}, {"MiB", 1ull << 20}, {"GiB", 1ull << 30}, {"KB", 1000ull}, {"MB", 1000000ull},
      {"GB", 1000000000ull}, {"K", 1ull << 10}, {"M", 1ull << 20}, {"G", 1ull << 30}, {"B", 1}};
  uint64_t mul = 1;
  std::string digits = text;
  for (const auto& [suffix, m] : kUnits) {
    if (absl::EndsWith(text, suffix)) {
      mul = m;
      digits = text.substr(0, text.size() - suffix.size());
      break;
    }
  }
  uint64_t v = 0;
  if (!absl::SimpleAtoi(digits, &v) || v == 0 || v > (~0ull) / mul) return false;
  *bytes = v * mul;
  return true;
}

int RunDatasetCommand(const Options& o, std::ostream& out, std::ostream& err) {
  const std::string sub = o.positional.size() > 1 ? o.positional[1] : "";
  if ((sub != "pack" && sub != "unpack") || o.positional.size() != 4) {
    err << "lmsgdctl dataset: expected 'pack IMAGE_FOLDER OUT_DIR' or 'unpack SHARDS OUT_DIR'\n" << kUsage;
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (sub == "unpack") {
    auto n = data::UnpackShards(o.positional[2], o.positional[3]);
    if (!n.ok()) {
      err << "lmsgdctl: dataset unpack: " << n.status().message() << "\n";
      return 1;
    }
    out << "wrote " << *n << " images to " << o.positional[3] << "\n";
    return 0;
  }
  data::PackOptions po;
  if (!ParseByteSize(o.shard_size, &po.shard_bytes)) {
    err << "lmsgdctl dataset pack: --shard_size: '" << o.shard_size
        << "' is not a size (bytes, or a number with K, M, G, KiB, MiB, GiB, KB, MB or GB)\n";
    return 2;
  }
  po.shuffle_seed = o.shuffle_seed;
  auto stats = data::PackImageFolder(o.positional[2], o.positional[3], po);
  if (!stats.ok()) {
    err << "lmsgdctl: dataset pack: " << stats.status().message() << "\n";
    return 1;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out << absl::StrFormat("packed %d images into %d shards (%.1f MB) in %s in %.1f s\n", stats->examples,
                         stats->shards, stats->bytes / 1e6, o.positional[3], s);
  return 0;
}

int RunExperimentCommand(const Options& o, std::shared_ptr<grpc::ChannelCredentials> creds, std::ostream& out,
                         std::ostream& err) {
  const std::string sub = o.positional.size() > 1 ? o.positional[1] : "";
  if (sub == "report" && o.positional.size() == 3) {
    std::string table;
    auto st = RenderReport(o.positional[2], &table);
    out << table;
    if (!st.ok()) {
      err << "lmsgdctl: experiment report: " << st.message() << "\n";
      return 1;
    }
    out << "report: " << o.positional[2] << "/table.md, error_vs_kn.png, curves_*.png (and .svg)\n";
    return 0;
  }
  if (sub != "run" || o.positional.size() != 3) {
    err << "lmsgdctl experiment: expected 'run FILE' or 'report DIR'\n" << kUsage;
    return 2;
  }
  auto x = ReadExperimentFile(o.positional[2]);
  if (!x.ok()) {
    err << "lmsgdctl: " << x.status().message() << "\n";
    return 1;
  }
  auto plan = PlanExperiment(*x, o.standalone);
  if (!plan.ok()) {
    err << "lmsgdctl: " << o.positional[2] << ": " << plan.status().message() << "\n";
    return 1;
  }
  ExperimentOptions eo;
  eo.dir = o.out.empty() ? absl::StrCat("experiments/", x->name()) : o.out;
  eo.threads = o.threads;
  eo.run_timeout = absl::Seconds(o.run_timeout_s);
  eo.log = &out;
  Client c(o, creds);
  CoordinatorJobs jobs(c);
  if (!o.standalone) eo.coordinator = &jobs;
  out << "experiment " << x->name() << ": " << plan->size() << " runs "
      << (o.standalone ? "in this process" : absl::StrCat("through ", o.coordinator)) << ", report in " << eo.dir
      << std::endl;
  auto runs = RunExperiment(*x, *plan, eo);
  if (!runs.ok()) {
    err << "lmsgdctl: experiment " << x->name() << ": " << runs.status().message()
        << " (run the same command again to resume)\n";
    return 1;
  }
  std::string table;
  auto st = RenderReport(eo.dir, &table);
  out << table;
  if (!st.ok()) {
    err << "lmsgdctl: experiment report: " << st.message() << "\n";
    return 1;
  }
  out << "report: " << eo.dir << "/table.md, error_vs_kn.png, curves_*.png (and .svg)\n";
  return 0;
}

// The spec of a failed or cancelled job, set to continue its run from its last checkpoint (or
// to start it again from its own beginning when it has none: `note` says which).
absl::StatusOr<v1::JobSpec> ResubmitSpec(const v1::JobStatus& old, std::string* note) {
  const v1::JobState s = old.state();
  if (s == v1::JOB_STATE_SUCCEEDED) {
    return absl::FailedPreconditionError(absl::StrCat(old.job_id(), " succeeded: there is nothing to continue"));
  }
  if (s != v1::JOB_STATE_FAILED && s != v1::JOB_STATE_CANCELLED) {
    return absl::FailedPreconditionError(absl::StrCat(old.job_id(), " is ", StateLabel(s),
                                                      ": only a failed or cancelled job can be resubmitted (cancel it "
                                                      "first)"));
  }
  v1::JobSpec spec = old.spec();
  const auto& c = old.last_checkpoint();
  if (c.path().empty() || spec.mode() == v1::JOB_MODE_EVALUATE) {
    *note = absl::StrCat(old.job_id(), " has no checkpoint: the new job starts it again from the beginning");
    return spec;
  }
  spec.set_init_checkpoint(c.path());
  spec.set_init_mode(v1::INIT_CONTINUE);
  *note = absl::StrFormat("continuing %s from %s (epoch %d, iteration %d)", old.job_id(), c.path(), c.epoch(),
                          c.iteration());
  return spec;
}

absl::StatusOr<v1::Model> ParseModel(const std::string& name) {
  std::string n = absl::AsciiStrToUpper(name);
  if (!absl::StartsWith(n, "MODEL_")) n = "MODEL_" + n;
  v1::Model m;
  if (!v1::Model_Parse(n, &m) || m == v1::MODEL_UNSPECIFIED) {
    return absl::InvalidArgumentError(absl::StrCat("--model: unknown model '", name,
                                                   "' (resnet50, resnet34, resnet18, resnet20, resnet8)"));
  }
  return m;
}

// The evaluation job `lmsgdctl evaluate` submits: the job file's model and dataset (or the
// flags'), mode EVALUATE on `checkpoint`, no checkpoints of its own.
absl::StatusOr<v1::JobSpec> EvaluateSpec(const Options& o, const std::string& checkpoint) {
  v1::JobSpec spec;
  if (!o.job_file.empty()) {
    ASSIGN_OR_RETURN(spec, ReadJobFile(o.job_file));
  }
  if (!o.dataset.empty()) {
    const auto colon = o.dataset.find(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("--dataset: '", o.dataset, "' is not KIND:VAL_PATH"));
    }
    std::string kind = absl::AsciiStrToUpper(o.dataset.substr(0, colon));
    v1::DatasetKind k;
    if (!v1::DatasetKind_Parse("DATASET_" + kind, &k) || k == v1::DATASET_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat("--dataset: unknown kind '", o.dataset.substr(0, colon),
                                                     "' (image_folder, tar_shards, idx, synthetic)"));
    }
    if (spec.dataset().kind() != k) spec.mutable_dataset()->Clear();
    spec.mutable_dataset()->set_kind(k);
    spec.mutable_dataset()->set_val_path(o.dataset.substr(colon + 1));
  }
  if (!o.model.empty()) {
    ASSIGN_OR_RETURN(v1::Model m, ParseModel(o.model));
    spec.set_model(m);
  }
  if (!o.world_size.empty()) {
    uint32_t k = 0;
    if (!absl::SimpleAtoi(o.world_size, &k) || k == 0) {
      return absl::InvalidArgumentError(absl::StrCat("--world_size: '", o.world_size, "' is not a worker count"));
    }
    spec.set_world_size(k);
  }
  if (spec.dataset().kind() == v1::DATASET_UNSPECIFIED) {
    return absl::InvalidArgumentError("evaluate: say which validation set, with --job JOBFILE or --dataset KIND:PATH");
  }
  if (spec.name().empty()) spec.set_name(absl::StrCat("evaluate ", checkpoint).substr(0, 256));
  spec.set_mode(v1::JOB_MODE_EVALUATE);
  spec.set_init_checkpoint(checkpoint);
  spec.set_init_mode(v1::INIT_WEIGHTS);
  spec.clear_checkpoint_dir();
  spec.clear_checkpoint_interval_epochs();
  spec.clear_min_workers();  // not elastic: exactly world_size workers
  spec.clear_max_workers();
  return spec;
}

// Polls the job until it ends (or `timeout`); its final status.
absl::StatusOr<v1::JobStatus> WaitForJob(Client& c, const std::string& job_id, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  absl::Status last_error;
  while (absl::Now() < give_up) {
    auto j = GetJob(c, job_id);
    if (j.ok()) {
      const auto s = j->state();
      if (s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED) return j;
    } else if (j.status().code() != absl::StatusCode::kUnavailable) {
      return j.status();
    }
    absl::SleepFor(absl::Milliseconds(300));
  }
  return absl::DeadlineExceededError(absl::StrCat(job_id, " did not end within ", absl::FormatDuration(timeout),
                                                  " (--run_timeout)"));
}

}  // namespace

std::string FormatStatusTable(const v1::JobStatus& j) {
  std::string s;
  auto row = [&s](absl::string_view k, const std::string& v) { absl::StrAppend(&s, absl::StrFormat("%-16s %s\n", k, v)); };
  row("job", j.job_id());
  if (!j.spec().name().empty()) row("name", j.spec().name());
  row("state", StateLabel(j.state()));
  if (!j.message().empty()) row("message", j.message());
  row("generation", absl::StrCat(j.generation()));
  row("workers", absl::StrCat(j.world_size(), " (", j.workers_size(), " registered)"));
  const auto& sc = j.schedule();
  row("global batch", absl::StrCat(sc.global_batch(), " (", j.spec().world_size(), " x ",
                                   j.spec().virtual_workers_per_worker(), " x ", j.spec().per_worker_batch(), ")"));
  row("schedule", absl::StrFormat("peak lr %.6g, warmup %s %.3g epochs, decay x%.3g at [%s], %u epochs, %u it/epoch",
                                  sc.peak_lr(), absl::AsciiStrToLower(v1::WarmupKind_Name(sc.warmup()).substr(7)),
                                  sc.warmup_epochs(), sc.decay_factor(),
                                  absl::StrJoin(sc.decay_epochs(), ","), sc.epochs(),
                                  static_cast<unsigned>(sc.iterations_per_epoch())));
  const auto& p = j.progress();
  row("progress", absl::StrFormat("epoch %u/%u, iteration %d/%d", p.epoch(), j.spec().epochs(),
                                  p.iteration(), p.total_iterations()));
  row("lr", absl::StrFormat("%.6g", p.lr()));
  row("loss", absl::StrFormat("%.4f", p.loss()));
  row("throughput", absl::StrFormat("%.1f img/s", p.images_per_second()));
  if (j.has_last_evaluation()) {
    const auto& e = j.last_evaluation();
    row("evaluation", absl::StrFormat("epoch %u: top-1 error %.2f%%, top-5 error %.2f%% (%d images)", e.epoch(),
                                      100 * e.top1_error(), 100 * e.top5_error(), e.examples()));
  }
  if (j.has_final_error()) row("error", DescribeFinalError(j.final_error()));
  if (!j.last_checkpoint().path().empty()) {
    const auto& c = j.last_checkpoint();
    row("checkpoint", absl::StrFormat("%s (epoch %u, iteration %d, %s)", c.path(), c.epoch(), c.iteration(),
                                      FormatTime(c.time_unix_ms())));
  }
  row("recoveries", absl::StrCat(j.recoveries()));
  for (const auto& g : j.generations()) {
    row(absl::StrCat("  generation ", g.generation()),
        absl::StrFormat("%s  k=%d kn=%d peak lr %.4g%s: %s", FormatTime(g.start_time_unix_ms()), g.world_size(),
                        g.global_batch(), g.peak_lr(),
                        g.resume_epoch() > 0 ? absl::StrCat(", from epoch ", g.resume_epoch()) : "", g.reason()));
  }
  row("created", FormatTime(j.create_time_unix_ms()));
  row("updated", FormatTime(j.update_time_unix_ms()));
  for (const auto& w : j.workers()) {
    std::string step;
    if (w.has_recent_step()) {
      const auto& t = w.recent_step();
      step = absl::StrFormat(
          "; step ms: data %.1f, fwd %.1f, bwd %.1f, comm %.1f, opt %.1f; busy %.2fx median%s", 1e3 * t.data_wait_s(),
          1e3 * t.forward_s(), 1e3 * t.backward_s(), 1e3 * t.exposed_comm_s(), 1e3 * t.optimizer_s(), w.busy_ratio(),
          w.straggler() ? "  STRAGGLER" : "");
    }
    row(w.rank() >= 0 ? absl::StrCat("  rank ", w.rank()) : "  standby",
        absl::StrCat(w.host(), " device ", w.local_device(), " (local rank ", w.local_rank(), ", ", w.worker_id(),
                     ")", step));
  }
  for (const auto& w : j.workers()) {
    if (w.straggler()) {
      row("straggler", absl::StrFormat("rank %d on %s: busy %.2fx the median rank's per step", w.rank(), w.host(),
                                       w.busy_ratio()));
    }
  }
  return s;
}

std::string FormatListTable(const std::vector<v1::JobStatus>& jobs) {
  std::string s = absl::StrFormat("%-12s %-26s %-20s %4s %8s %9s %14s %10s %8s\n", "JOB", "NAME", "STATE", "GEN",
                                  "WORKERS", "EPOCH", "ITERATION", "LR", "LOSS");
  for (const auto& j : jobs) {
    std::string name = j.spec().name().substr(0, 26);
    absl::StrAppend(&s, absl::StrFormat("%-12s %-26s %-20s %4d %8s %9s %14d %10.4g %8.4f\n", j.job_id(), name,
                                        StateLabel(j.state()), j.generation(),
                                        absl::StrCat(j.world_size()),
                                        absl::StrCat(j.progress().epoch(), "/", j.spec().epochs()),
                                        j.progress().iteration(), j.progress().lr(), j.progress().loss()));
  }
  if (jobs.empty()) absl::StrAppend(&s, "(no jobs)\n");
  return s;
}

std::string FormatProgressLine(const v1::JobStatus& j, int bar_width) {
  const auto& p = j.progress();
  const uint64_t ipe = j.schedule().iterations_per_epoch();
  double frac = 0;
  if (ipe > 0) frac = static_cast<double>(p.iteration() % ipe) / static_cast<double>(ipe);
  if (j.state() == v1::JOB_STATE_SUCCEEDED) frac = 1;
  int filled = static_cast<int>(frac * bar_width);
  std::string bar = std::string(filled, '#') + std::string(bar_width - filled, '.');
  return absl::StrFormat("%s [%s] %-10s gen %d  epoch %u/%u  iter %d/%d  lr %.4g  loss %.4f  %.1f img/s",
                         j.job_id(), bar, StateLabel(j.state()), j.generation(), p.epoch(), j.spec().epochs(),
                         p.iteration(), p.total_iterations(), p.lr(), p.loss(), p.images_per_second());
}

int RunCtl(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  Options o;
  std::string perr;
  if (!ParseArgs(args, &o, &perr)) {
    if (!perr.empty()) err << "lmsgdctl: " << perr << "\n";
    err << kUsage;
    return 2;
  }
  if (o.positional.empty()) {
    err << kUsage;
    return 2;
  }
  const std::string cmd = o.positional[0];
  auto need_args = [&](size_t n, const char* what) {
    if (o.positional.size() != n + 1) {
      err << "lmsgdctl " << cmd << ": expected " << what << "\n" << kUsage;
      return false;
    }
    return true;
  };
  if (cmd == "dataset") return RunDatasetCommand(o, out, err);
  if (o.token.empty() && !o.token_file.empty()) {
    auto t = ReadTokenFile(o.token_file);
    if (!t.ok()) {
      err << "lmsgdctl: " << t.status().message() << "\n";
      return 1;
    }
    o.token = *t;
  }
  auto creds = MakeChannelCredentials(o.tls);
  if (!creds.ok()) {
    err << "lmsgdctl: " << creds.status().message() << "\n";
    return 1;
  }
  const bool json = o.output == "json";

  if (cmd == "submit") {
    if (!need_args(1, "a job file")) return 2;
    auto spec = ReadJobFile(o.positional[1]);
    if (!spec.ok()) {
      err << "lmsgdctl: " << spec.status().message() << "\n";
      return 1;
    }
    // Validate locally first for an immediate, complete answer; the coordinator validates again.
    v1::JobSpec filled = *spec;
    ApplyDefaults(&filled);
    if (auto st = ValidateJobSpec(filled); !st.ok()) {
      err << "lmsgdctl: " << o.positional[1] << ": " << st.message() << "\n";
      return 1;
    }
    Client c(o, *creds);
    v1::SubmitJobRequest req;
    *req.mutable_spec() = *spec;
    v1::SubmitJobResponse resp;
    auto ctx = c.Context();
    grpc::Status st = c.stub().SubmitJob(ctx.get(), req, &resp);
    if (!st.ok()) {
      err << "lmsgdctl: " << c.Explain(st, "submit") << "\n";
      return 1;
    }
    if (json) {
      out << ToJson(resp, false) << "\n";
    } else {
      out << resp.job_id() << "\n";
    }
    return 0;
  }
  if (cmd == "experiment") return RunExperimentCommand(o, *creds, out, err);
  if (cmd == "resubmit") {
    if (!need_args(1, "a job id")) return 2;
    Client c(o, *creds);
    auto old = GetJob(c, o.positional[1]);
    if (!old.ok()) {
      err << "lmsgdctl: " << old.status().message() << "\n";
      return 1;
    }
    std::string note;
    auto spec = ResubmitSpec(*old, &note);
    if (!spec.ok()) {
      err << "lmsgdctl: resubmit: " << spec.status().message() << "\n";
      return 1;
    }
    auto id = SubmitJob(c, *spec);
    if (!id.ok()) {
      err << "lmsgdctl: resubmit " << o.positional[1] << ": " << id.status().message() << "\n";
      return 1;
    }
    out << *id << "\n";
    err << *id << ": " << note << "\n";
    return 0;
  }
  if (cmd == "evaluate") {
    if (!need_args(1, "a checkpoint path")) return 2;
    auto spec = EvaluateSpec(o, o.positional[1]);
    if (!spec.ok()) {
      err << "lmsgdctl: evaluate: " << spec.status().message() << "\n";
      return 1;
    }
    Client c(o, *creds);
    auto id = SubmitJob(c, *spec);
    if (!id.ok()) {
      err << "lmsgdctl: evaluate: " << id.status().message() << "\n";
      return 1;
    }
    if (!json) out << *id << ": evaluating " << o.positional[1] << " on " << std::max(1u, spec->world_size())
                   << " worker(s)" << std::endl;
    auto end = WaitForJob(c, *id, absl::Seconds(o.run_timeout_s));
    if (!end.ok()) {
      err << "lmsgdctl: evaluate: " << end.status().message() << "\n";
      return 1;
    }
    if (json) {
      out << ToJson(*end, false) << "\n";
    } else {
      out << end->job_id() << " " << StateLabel(end->state()) << ": " << end->message() << "\n";
    }
    return end->state() == v1::JOB_STATE_SUCCEEDED ? 0 : 3;
  }
  if (cmd == "status" || cmd == "history") {
    if (!need_args(1, "a job id")) return 2;
    Client c(o, *creds);
    v1::GetJobRequest req;
    req.set_job_id(o.positional[1]);
    v1::JobStatus resp;
    auto ctx = c.Context();
    grpc::Status st = c.stub().GetJob(ctx.get(), req, &resp);
    if (!st.ok()) {
      err << "lmsgdctl: " << c.Explain(st, cmd) << "\n";
      return 1;
    }
    if (cmd == "status") {
      out << (json ? ToJson(resp, true) + "\n" : FormatStatusTable(resp));
    } else if (o.output == "csv") {
      out << HistoryCsv(resp.history());
    } else if (json) {
      out << HistoryJsonLines(resp.history());
    } else {
      if (resp.history_dropped() > 0) out << "(" << resp.history_dropped() << " oldest epochs dropped)\n";
      out << HistoryTable(resp.history());
    }
    return 0;
  }
  if (cmd == "list") {
    if (!need_args(0, "no arguments")) return 2;
    Client c(o, *creds);
    v1::ListJobsRequest req;
    req.set_include_finished(o.all);
    v1::ListJobsResponse resp;
    auto ctx = c.Context();
    grpc::Status st = c.stub().ListJobs(ctx.get(), req, &resp);
    if (!st.ok()) {
      err << "lmsgdctl: " << c.Explain(st, "list") << "\n";
      return 1;
    }
    if (json) {
      out << ToJson(resp, true) << "\n";
    } else {
      out << FormatListTable({resp.jobs().begin(), resp.jobs().end()});
    }
    return 0;
  }
  if (cmd == "cancel") {
    if (!need_args(1, "a job id")) return 2;
    Client c(o, *creds);
    v1::CancelJobRequest req;
    req.set_job_id(o.positional[1]);
    req.set_reason(o.reason);
    v1::JobStatus resp;
    auto ctx = c.Context();
    grpc::Status st = c.stub().CancelJob(ctx.get(), req, &resp);
    if (!st.ok()) {
      err << "lmsgdctl: " << c.Explain(st, "cancel") << "\n";
      return 1;
    }
    out << (json ? ToJson(resp, false) + "\n" : absl::StrCat(resp.job_id(), " ", StateLabel(resp.state()), "\n"));
    return 0;
  }
  if (cmd == "watch") {
    if (!need_args(1, "a job id")) return 2;
    Client c(o, *creds);
    const bool tty = !json && ::isatty(STDOUT_FILENO) && &out == &std::cout;
    v1::JobStatus last;
    // Reconnect on transient failures (the coordinator may be restarting), up to the timeout.
    absl::Time unreachable_since = absl::InfiniteFuture();
    while (true) {
      v1::WatchJobRequest req;
      req.set_job_id(o.positional[1]);
      auto ctx = c.Context(/*with_deadline=*/false);
      auto reader = c.stub().WatchJob(ctx.get(), req);
      v1::JobStatus st;
      bool got_any = false;
      while (reader->Read(&st)) {
        got_any = true;
        unreachable_since = absl::InfiniteFuture();
        last = st;
        if (json) {
          out << ToJson(st, false) << "\n";
        } else if (tty) {
          out << "\r\033[K" << FormatProgressLine(st, 30) << std::flush;
        } else {
          out << FormatProgressLine(st, 30) << "\n" << std::flush;
        }
      }
      grpc::Status fin = reader->Finish();
      auto s = last.state();
      if (s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED) {
        if (tty) out << "\n";
        if (!json) {
          out << last.job_id() << " " << StateLabel(s) << (last.message().empty() ? "" : ": ") << last.message()
              << "\n";
        }
        return s == v1::JOB_STATE_SUCCEEDED ? 0 : 3;
      }
      if (!fin.ok() && fin.error_code() != grpc::StatusCode::UNAVAILABLE) {
        if (tty) out << "\n";
        err << "lmsgdctl: " << c.Explain(fin, "watch") << "\n";
        return 1;
      }
      if (!got_any) {
        if (unreachable_since == absl::InfiniteFuture()) unreachable_since = absl::Now();
        if (absl::Now() - unreachable_since > absl::Seconds(o.timeout_s)) {
          if (tty) out << "\n";
          err << "lmsgdctl: " << c.Explain(fin.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream ended") : fin, "watch") << "\n";
          return 1;
        }
      }
      absl::SleepFor(absl::Milliseconds(500));
    }
  }
  err << "lmsgdctl: unknown command '" << cmd << "'\n" << kUsage;
  return 2;
}

}  // namespace lmsgd::ctl
