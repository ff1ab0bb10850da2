#include "coordinator/ctl/report.h"

#include <fcntl.h>
#include <spawn.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/csv.h"
#include "common/file_util.h"
#include "common/history.h"
#include "common/status_macros.h"
#include "coordinator/ctl/experiment.h"

extern char** environ;

namespace lmsgd::ctl {
namespace {

std::string G(double v) { return absl::StrFormat("%.9g", v); }

std::string CsvField(std::string s) {
  return absl::StrReplaceAll(s, {{",", ";"}, {"\"", "'"}, {"\n", " "}, {"\r", " "}});
}

struct RunRow {
  std::string arm, warmup, scaling, state, message;
  uint64_t seed = 0, kn = 0, iterations = 0, epochs = 0, final_epochs = 0;
  bool reference = false, succeeded = false;
  double peak_lr = 0, warmup_epochs = 0, top1 = 0, top5 = 0, wall = 0;
};

struct HistoryRow {
  std::string arm;
  uint64_t seed = 0, epoch = 0;
  double loss = 0;
  bool evaluated = false;
  double top1 = 0;
};

struct ArmSummary {
  RunRow recipe;  // the first run's recipe fields
  std::vector<double> errors;  // succeeded runs' final top-1 errors
  std::vector<double> last;    // succeeded runs' last evaluated epoch's top-1 error
  std::vector<std::string> failures;
  uint64_t min_final_epochs = 0, max_final_epochs = 0;
  double mean = 0, std = 0;
};

absl::StatusOr<std::vector<RunRow>> ReadRuns(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  ASSIGN_OR_RETURN(CsvTable t, CsvTable::Parse(text, path));
  for (const char* c : {"arm", "seed", "reference", "kn", "peak_lr", "warmup", "warmup_epochs", "lr_scaling",
                        "iterations", "state", "top1_error", "final_epochs"}) {
    if (!t.has_column(c)) return absl::InvalidArgumentError(absl::StrCat(path, ": no column '", c, "'"));
  }
  std::vector<RunRow> rows;
  for (size_t i = 0; i < t.rows(); ++i) {
    RunRow r;
    r.arm = t.Get(i, "arm");
    r.warmup = t.Get(i, "warmup");
    r.scaling = t.Get(i, "lr_scaling");
    r.state = t.Get(i, "state");
    r.message = t.Get(i, "message");
    r.reference = t.Get(i, "reference") == "1";
    r.succeeded = r.state == "succeeded";
    ASSIGN_OR_RETURN(r.seed, t.GetUint(i, "seed"));
    ASSIGN_OR_RETURN(r.kn, t.GetUint(i, "kn"));
    ASSIGN_OR_RETURN(r.iterations, t.GetUint(i, "iterations"));
    ASSIGN_OR_RETURN(r.peak_lr, t.GetDouble(i, "peak_lr"));
    ASSIGN_OR_RETURN(r.warmup_epochs, t.GetDouble(i, "warmup_epochs"));
    if (t.has_column("epochs")) {
      ASSIGN_OR_RETURN(r.epochs, t.GetUint(i, "epochs"));
    }
    if (t.has_column("wall_seconds")) {
      ASSIGN_OR_RETURN(r.wall, t.GetDouble(i, "wall_seconds"));
    }
    if (r.succeeded) {
      ASSIGN_OR_RETURN(r.top1, t.GetDouble(i, "top1_error"));
      ASSIGN_OR_RETURN(r.final_epochs, t.GetUint(i, "final_epochs"));
      if (t.has_column("top5_error")) {
      ASSIGN_OR_RETURN(r.top5, t.GetDouble(i, "top5_error"));
    }
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

absl::StatusOr<std::vector<HistoryRow>> ReadHistory(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  ASSIGN_OR_RETURN(CsvTable t, CsvTable::Parse(text, path));
  for (const char* c : {"arm", "seed", "epoch", "mean_loss", "top1_error"}) {
    if (!t.has_column(c)) return absl::InvalidArgumentError(absl::StrCat(path, ": no column '", c, "'"));
  }
  std::vector<HistoryRow> rows;
  for (size_t i = 0; i < t.rows(); ++i) {
    HistoryRow r;
    r.arm = t.Get(i, "arm");
    ASSIGN_OR_RETURN(r.seed, t.GetUint(i, "seed"));
    ASSIGN_OR_RETURN(r.epoch, t.GetUint(i, "epoch"));
    ASSIGN_OR_RETURN(r.loss, t.GetDouble(i, "mean_loss"));
    if (!t.Get(i, "top1_error").empty()) {
      r.evaluated = true;
      ASSIGN_OR_RETURN(r.top1, t.GetDouble(i, "top1_error"));
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

// Runs `gnuplot script` with its output appended to `log`; the error names the script.
// It runs in `dir`, the report directory: the scripts' paths are relative to it.
absl::Status RunGnuplot(const std::string& dir, const std::string& script) {
  const std::string log = "plots/gnuplot.log";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addchdir_np(&fa, dir.c_str());
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  std::string prog = "gnuplot";
  std::vector<char*> argv = {prog.data(), const_cast<char*>(script.c_str()), nullptr};
  pid_t pid;
  const int rc = posix_spawnp(&pid, "gnuplot", &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot run gnuplot for ", script, ": ", strerror(rc),
                                                      " (deploy/setup.sh installs gnuplot-nox)"));
  }
  // A plot takes well under a second; a gnuplot that hangs (a broken font setup) is killed.
  int status = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (true) {
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return absl::InternalError(absl::StrCat("waitpid(gnuplot): ", strerror(errno)));
    if (absl::Now() > deadline) {
      kill(pid, SIGKILL);
      (void)waitpid(pid, &status, 0);
      return absl::DeadlineExceededError(absl::StrCat("gnuplot did not finish ", script, " within 60 s"));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
      return absl::FailedPreconditionError("gnuplot is not installed (deploy/setup.sh installs gnuplot-nox)");
    }
    return absl::InternalError(absl::StrCat("gnuplot failed on ", script, " (exit status ", WEXITSTATUS(status),
                                            "); its messages are in ", dir, "/", log));
  }
  return absl::OkStatus();
}

// A script that draws `body` twice: to <out>.png and <out>.svg.
std::string Script(const std::string& out, int width, int height, const std::string& body) {
  return absl::StrCat("# Generated by lmsgdctl experiment report; run in the report directory: gnuplot plots/", out,
                      ".gp\n",
                      "set terminal pngcairo noenhanced size ", width, ",", height, " font ',10'\n",
                      "set output '", out, ".png'\n", body, "unset multiplot\n",
                      "set terminal svg noenhanced size ", width, ",", height, " font 'sans,10'\n",
                      "set output '", out, ".svg'\n", body, "unset multiplot\nset output\n");
}

}  // namespace

absl::Status WriteExperimentCsv(const std::string& dir, const std::vector<v1::ExperimentRun>& runs) {
  std::string r =
      "arm,seed,reference,kn,world_size,virtual_workers,per_worker_batch,peak_lr,warmup,warmup_epochs,lr_scaling,"
      "epochs,iterations,state,top1_error,top5_error,final_epochs,wall_seconds,job_id,message\n";
  std::string h = "arm,seed,kn,epoch,iteration,mean_loss,lr,images_per_second,top1_error,top5_error\n";
  for (const auto& x : runs) {
    std::string state = absl::AsciiStrToLower(v1::JobState_Name(x.state()).substr(10));
    const bool ok = x.state() == v1::JOB_STATE_SUCCEEDED && x.has_final_error();
    absl::StrAppend(&r, x.arm(), ",", x.seed(), ",", x.reference() ? 1 : 0, ",", x.kn(), ",", x.world_size(), ",",
                    x.virtual_workers(), ",", x.per_worker_batch(), ",", G(x.peak_lr()), ",", WarmupName(x.warmup()),
                    ",", G(x.warmup_epochs()), ",", ScalingName(x.lr_scaling()), ",", x.epochs(), ",", x.iterations(),
                    ",", state, ",", ok ? G(x.final_error().top1_error()) : "", ",",
                    ok ? G(x.final_error().top5_error()) : "", ",", ok ? absl::StrCat(x.final_error().epochs()) : "",
                    ",", G(x.wall_seconds()), ",", CsvField(x.job_id()), ",", CsvField(x.message()), "\n");
    for (const auto& e : x.history()) {
      const bool ev = e.has_evaluation();
      absl::StrAppend(&h, x.arm(), ",", x.seed(), ",", x.kn(), ",", e.epoch(), ",", e.iteration(), ",",
                      G(e.mean_loss()), ",", G(e.lr()), ",", G(e.images_per_second()), ",",
                      ev ? G(e.evaluation().top1_error()) : "", ",", ev ? G(e.evaluation().top5_error()) : "", "\n");
    }
  }
  RETURN_IF_ERROR(MakeDirs(dir));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/runs.csv", r));
  return WriteFileAtomically(dir + "/history.csv", h);
}

absl::Status RenderReport(const std::string& dir, std::string* table_out) {
  ASSIGN_OR_RETURN(std::vector<RunRow> runs, ReadRuns(dir + "/runs.csv"));
  ASSIGN_OR_RETURN(std::vector<HistoryRow> history, ReadHistory(dir + "/history.csv"));
  if (runs.empty()) return absl::FailedPreconditionError(absl::StrCat(dir, "/runs.csv has no runs"));

  // Arms in the order of their first run.
  std::vector<std::string> order;
  std::map<std::string, ArmSummary> arms;
  std::string reference;
  for (const auto& r : runs) {
    auto [it, fresh] = arms.try_emplace(r.arm);
    if (fresh) {
      order.push_back(r.arm);
      it->second.recipe = r;
    }
    if (r.reference) reference = r.arm;
    ArmSummary& a = it->second;
    if (r.succeeded) {
      a.errors.push_back(r.top1);
      a.min_final_epochs = a.errors.size() == 1 ? r.final_epochs : std::min(a.min_final_epochs, r.final_epochs);
      a.max_final_epochs = std::max(a.max_final_epochs, r.final_epochs);
    } else {
      a.failures.push_back(absl::StrCat("seed ", r.seed, " ", r.state, r.message.empty() ? "" : ": ", r.message));
    }
  }
  for (auto& [name, a] : arms) {
    if (a.errors.empty()) continue;
    double s = 0;
    for (double e : a.errors) s += e;
    a.mean = s / a.errors.size();
    double v = 0;
    for (double e : a.errors) v += (e - a.mean) * (e - a.mean);
    a.std = a.errors.size() > 1 ? std::sqrt(v / (a.errors.size() - 1)) : 0;
  }
  const ArmSummary* ref = reference.empty() ? nullptr : &arms[reference];

  // The table.
  std::string t = absl::StrCat(
      "| arm | kn | peak lr | warmup | lr scaling | iterations | top-1 error (%) | seeds | vs reference (points) | "
      "last epoch (%) |\n",
      "|---|---:|---:|---|---|---:|---:|---:|---:|---:|\n");
  // The last evaluated epoch of each succeeded run, from the history.
  {
    std::map<std::pair<std::string, uint64_t>, std::pair<uint64_t, double>> last;  // (arm, seed) -> (epoch, err)
    for (const auto& h : history) {
      if (!h.evaluated) continue;
      auto& l = last[{h.arm, h.seed}];
      if (h.epoch >= l.first) l = {h.epoch, h.top1};
    }
    for (const auto& r : runs) {
      auto it = last.find({r.arm, r.seed});
      if (r.succeeded && it != last.end()) arms[r.arm].last.push_back(it->second.second);
    }
  }
  uint64_t min_f = ~0ull, max_f = 0;
  for (const auto& name : order) {
    const ArmSummary& a = arms[name];
    const RunRow& x = a.recipe;
    std::string warm = x.warmup == "none" ? "none"
                                            : absl::StrFormat("%s, %g epoch%s", x.warmup, x.warmup_epochs,
                                                              x.warmup_epochs == 1 ? "" : "s");
    std::string err = "-", delta = "-";
    if (!a.errors.empty()) {
      err = a.errors.size() > 1 ? absl::StrFormat("%.2f ± %.2f", 100 * a.mean, 100 * a.std)
                                : absl::StrFormat("%.2f", 100 * a.mean);
      min_f = std::min(min_f, a.min_final_epochs);
      max_f = std::max(max_f, a.max_final_epochs);
      if (ref != nullptr && name != reference && !ref->errors.empty()) {
        delta = absl::StrFormat("%+.2f", 100 * (a.mean - ref->mean));
      }
    }
    if (name == reference) delta = "reference";
    std::string seeds = absl::StrCat(a.errors.size());
    if (!a.failures.empty()) absl::StrAppend(&seeds, " (", a.failures.size(), " did not finish)");
    std::string last = "-";
    if (!a.last.empty()) {
      double sum = 0;
      for (double v : a.last) sum += v;
      last = absl::StrFormat("%.2f", 100 * sum / a.last.size());
    }
    absl::StrAppend(&t, absl::StrFormat("| %s | %d | %.4g | %s | %s | %d | %s | %s | %s | %s |\n", name, x.kn,
                                        x.peak_lr, warm, x.scaling, x.iterations, err, seeds, delta, last));
  }
  if (max_f > 0) {
    absl::StrAppend(&t, "\nError: each run's median top-1 validation error over its final ",
                    min_f == max_f ? absl::StrCat(min_f) : absl::StrCat(min_f, "-", max_f),
                    " evaluated epochs (the paper's metric: the final 5, or all when fewer), then the mean ± sample "
                    "standard deviation over seeds. Last epoch: the mean over seeds of the last evaluated epoch's "
                    "error.\n");
  }
  for (const auto& name : order) {
    for (const auto& f : arms[name].failures) absl::StrAppend(&t, "\n", name, ": ", f, "\n");
  }
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/table.md", t));
  if (table_out) *table_out = t;

  // Plot data: Figure 1 per recipe (warmup, scaling), curves per arm (means over seeds).
  const std::string pd = dir + "/plots";
  RETURN_IF_ERROR(MakeDirs(pd));
  std::vector<std::pair<std::string, std::vector<std::string>>> series;  // recipe -> arms
  std::set<uint64_t> kns;
  for (const auto& name : order) {
    const RunRow& x = arms[name].recipe;
    if (arms[name].errors.empty()) continue;
    kns.insert(x.kn);
    const std::string recipe =
        absl::StrCat(x.warmup == "none" ? "no" : x.warmup, " warmup, ", x.scaling == "none" ? "no" : x.scaling,
                     " LR scaling");
    auto it = std::find_if(series.begin(), series.end(), [&](const auto& s) { return s.first == recipe; });
    if (it == series.end()) {
      series.push_back({recipe, {}});
      it = series.end() - 1;
    }
    it->second.push_back(name);
  }
  std::vector<std::string> plot_errors;
  std::string fig1;
  if (kns.size() >= 2) {
    std::string plots;
    for (size_t i = 0; i < series.size(); ++i) {
      std::vector<std::pair<uint64_t, std::string>> pts;
      for (const auto& name : series[i].second) pts.push_back({arms[name].recipe.kn, name});
      std::sort(pts.begin(), pts.end());
      std::string d = "# kn mean_top1_error_percent std_percent\n";
      for (const auto& [kn, name] : pts) {
        absl::StrAppend(&d, kn, " ", G(100 * arms[name].mean), " ", G(100 * arms[name].std), "\n");
      }
      const std::string file = absl::StrCat("error_vs_kn.", i, ".dat");
      RETURN_IF_ERROR(WriteFileAtomically(pd + "/" + file, d));
      absl::StrAppend(&plots, i ? ", \\\n     " : "plot ", "'plots/", file,
                      "' using 1:2:3 with yerrorlines lw 2 pt 7 title '", series[i].first, "'");
    }
    std::string xtics;
    for (uint64_t kn : kns) absl::StrAppend(&xtics, xtics.empty() ? "" : ", ", "'", kn, "' ", kn);
    fig1 = absl::StrCat("set title 'Validation error against minibatch size kn'\nset logscale x 2\n",
                        "set xtics (", xtics, ")\nset xlabel 'kn (log2)'\n",
                        "set ylabel 'top-1 error (%)'\nset grid\nset key top left\n",
                        "set xrange [", *kns.begin() / 1.5, ":", *kns.rbegin() * 1.5, "]\n", plots, "\n");
    RETURN_IF_ERROR(WriteFileAtomically(pd + "/error_vs_kn.gp", Script("error_vs_kn", 720, 480, fig1)));
    if (auto st = RunGnuplot(dir, "plots/error_vs_kn.gp"); !st.ok()) plot_errors.push_back(st.ToString());
  }
  // Per-epoch means over an arm's seeds.
  auto curve = [&](const std::string& arm) {
    std::map<uint64_t, std::array<double, 4>> by_epoch;  // loss sum, n, err sum, n
    for (const auto& h : history) {
      if (h.arm != arm) continue;
      auto& c = by_epoch[h.epoch];
      c[0] += h.loss;
      c[1] += 1;
      if (h.evaluated) {
        c[2] += 100 * h.top1;
        c[3] += 1;
      }
    }
    std::string d = "# epoch mean_training_loss mean_top1_error_percent\n";
    for (const auto& [e, c] : by_epoch) {
      absl::StrAppend(&d, e, " ", G(c[0] / c[1]), " ", c[3] > 0 ? G(c[2] / c[3]) : "NaN", "\n");
    }
    return d;
  };
  uint64_t max_epoch = 0;
  for (const auto& h : history) max_epoch = std::max(max_epoch, h.epoch);
  if (!reference.empty()) {
    RETURN_IF_ERROR(WriteFileAtomically(pd + "/curve." + reference + ".dat", curve(reference)));
  }
  for (const auto& name : order) {
    if (name == reference || arms[name].errors.empty()) continue;
    RETURN_IF_ERROR(WriteFileAtomically(pd + "/curve." + name + ".dat", curve(name)));
    auto lines = [&](int column) {
      std::string s = absl::StrCat("plot 'plots/curve.", name, ".dat' using 1:", column,
                                   " with linespoints lw 2 pt 7 title '", name, "'");
      if (!reference.empty()) {
        absl::StrAppend(&s, ", 'plots/curve.", reference, ".dat' using 1:", column,
                        " with linespoints lw 2 pt 6 dt 2 title '", reference, " (reference)'");
      }
      return s + "\n";
    };
    const std::string body = absl::StrCat(
        "set multiplot layout 1,2 title '", name, " against ", reference.empty() ? "-" : reference, "'\n",
        "set grid\nset xlabel 'epoch'\nset key top right\n", max_epoch <= 16 ? "set xtics 1\n" : "",
        "set ylabel 'training loss'\n", lines(2),
        "set ylabel 'validation top-1 error (%)'\n", lines(3));
    const std::string out = "curves_" + name;
    RETURN_IF_ERROR(WriteFileAtomically(pd + "/" + out + ".gp", Script(out, 960, 400, body)));
    if (auto st = RunGnuplot(dir, "plots/" + out + ".gp"); !st.ok()) {
      plot_errors.push_back(st.ToString());
      if (st.code() == absl::StatusCode::kFailedPrecondition) break;  // no gnuplot: one message is enough
    }
  }
  if (!plot_errors.empty()) {
    return absl::Status(absl::StatusCode::kFailedPrecondition,
                        absl::StrCat("table.md written; plots failed: ", absl::StrJoin(plot_errors, "; ")));
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::ctl
