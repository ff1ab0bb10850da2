#include "coordinator/ctl/experiment.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/job_spec.h"
#include "common/status_macros.h"

namespace lmsgd::ctl {
namespace {

bool ValidName(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s) {
    if (!(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  }
  return true;
}

struct Arm {
  std::string field;  // "arms[1]" or "sweep" (for errors)
  v1::ExperimentArm arm;
};

}  // namespace

std::string PlannedRun::key() const { return absl::StrCat(arm, ".seed", seed); }

std::string WarmupName(v1::WarmupKind kind) {
  if (kind == v1::WARMUP_UNSPECIFIED) kind = v1::WARMUP_GRADUAL;
  return absl::AsciiStrToLower(v1::WarmupKind_Name(kind).substr(7));
}

std::string ScalingName(v1::LrScaling scaling) {
  if (scaling == v1::LR_SCALING_UNSPECIFIED) scaling = v1::LR_SCALING_LINEAR;
  return absl::AsciiStrToLower(v1::LrScaling_Name(scaling).substr(11));
}

absl::StatusOr<v1::Experiment> ReadExperimentFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string contents, ReadFileToString(path));
  if (contents.size() > (4u << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("experiment file '", path, "' is larger than 4 MiB"));
  }
  v1::Experiment e;
  auto st = ParseProtoText(path, contents, &e);
  if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("experiment file ", st.message()));
  return e;
}

absl::StatusOr<std::vector<PlannedRun>> PlanExperiment(const v1::Experiment& x, bool standalone) {
  std::vector<std::string> errors;
  if (!ValidName(x.name())) errors.push_back("name: must be 1-64 letters, digits, '_', '-' or '.'");

  // The arms: explicit ones, then the sweep's product.
  std::vector<Arm> arms;
  for (int i = 0; i < x.arms_size(); ++i) arms.push_back({absl::StrCat("arms[", i, "]"), x.arms(i)});
  const auto& sw = x.sweep();
  if (sw.kn_size() + sw.warmup_size() + sw.lr_scaling_size() > 0) {
    std::vector<uint32_t> kns(sw.kn().begin(), sw.kn().end());
    std::vector<int> warmups(sw.warmup().begin(), sw.warmup().end());
    std::vector<int> scalings(sw.lr_scaling().begin(), sw.lr_scaling().end());
    if (kns.empty()) kns.push_back(0);
    if (warmups.empty()) warmups.push_back(v1::WARMUP_UNSPECIFIED);
    if (scalings.empty()) scalings.push_back(v1::LR_SCALING_UNSPECIFIED);
    for (uint32_t kn : kns) {
      for (int w : warmups) {
        for (int s : scalings) {
          v1::ExperimentArm a;
          std::vector<std::string> parts;
          if (kn != 0) {
            a.set_kn(kn);
            parts.push_back(absl::StrCat("kn", kn));
          }
          if (sw.warmup_size() > 0) {
            a.set_warmup(static_cast<v1::WarmupKind>(w));
            parts.push_back(WarmupName(a.warmup()));
          }
          if (sw.lr_scaling_size() > 0) {
            a.set_lr_scaling(static_cast<v1::LrScaling>(s));
            parts.push_back(ScalingName(a.lr_scaling()));
          }
          a.set_name(absl::StrJoin(parts, "-"));
          arms.push_back({"sweep", a});
        }
      }
    }
  }
  if (arms.empty()) errors.push_back("arms: the experiment has no arms (give arms or a sweep)");

  v1::JobSpec base = x.base();
  ApplyDefaults(&base);
  const bool via_world = !standalone && x.kn_via() == v1::KN_VIA_WORLD_SIZE;
  if (standalone) {  // the base's k becomes virtual workers: the same kn in one process
    base.set_virtual_workers_per_worker(base.virtual_workers_per_worker() * base.world_size());
    base.set_world_size(1);
  }
  if (x.base().min_workers() != 0 || x.base().max_workers() != 0) {
    errors.push_back("base.min_workers/max_workers: an experiment's arms have a fixed k (no elastic jobs)");
  }

  std::vector<uint64_t> seeds(x.seeds().begin(), x.seeds().end());
  if (seeds.empty()) seeds.push_back(base.seed());
  for (size_t i = 0; i < seeds.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (seeds[i] == seeds[j]) errors.push_back(absl::StrCat("seeds[", i, "]: ", seeds[i], " is listed twice"));
    }
  }

  std::vector<PlannedRun> runs;
  std::vector<std::string> names;
  bool reference_found = false;
  for (const Arm& a : arms) {
    const auto& arm = a.arm;
    const std::string where = a.field == "sweep" ? absl::StrCat("sweep arm ", arm.name()) : a.field;
    if (!ValidName(arm.name())) {
      errors.push_back(absl::StrCat(where, ".name: '", arm.name(), "' must be 1-64 letters, digits, '_', '-' or '.'"));
      continue;
    }
    if (std::find(names.begin(), names.end(), arm.name()) != names.end()) {
      errors.push_back(absl::StrCat(where, ".name: '", arm.name(), "' names two arms"));
      continue;
    }
    names.push_back(arm.name());
    v1::JobSpec spec = base;
    if (arm.warmup() != v1::WARMUP_UNSPECIFIED) spec.set_warmup(arm.warmup());
    if (arm.has_warmup_epochs()) spec.set_warmup_epochs(arm.warmup_epochs());
    if (arm.lr_scaling() != v1::LR_SCALING_UNSPECIFIED) spec.set_lr_scaling(arm.lr_scaling());
    if (arm.epochs() != 0) spec.set_epochs(arm.epochs());
    if (arm.lr_decay_epochs_size() > 0) *spec.mutable_lr_decay_epochs() = arm.lr_decay_epochs();
    if (arm.kn() != 0) {
      const uint64_t n = spec.per_worker_batch();
      const uint64_t other = via_world ? spec.virtual_workers_per_worker() : spec.world_size();
      const uint64_t unit = n * other;
      if (unit == 0 || arm.kn() % unit != 0) {
        errors.push_back(absl::StrCat(where, ".kn: ", arm.kn(), " is not a multiple of ",
                                      via_world ? "m x n = " : "k x n = ", unit,
                                      via_world ? " (kn_via WORLD_SIZE keeps the base's m and n)"
                                                : " (kn through virtual workers keeps the base's k and n)"));
        continue;
      }
      const uint32_t q = static_cast<uint32_t>(arm.kn() / unit);
      if (via_world) {
        spec.set_world_size(q);
      } else {
        spec.set_virtual_workers_per_worker(q);
      }
    }
    spec.set_min_workers(spec.world_size());  // an arm's k is what the arm is
    spec.set_max_workers(spec.world_size());
    if (arm.name() == x.reference()) reference_found = true;
    for (uint64_t seed : seeds) {
      PlannedRun r;
      r.arm = arm.name();
      r.seed = seed;
      r.reference = arm.name() == x.reference();
      r.spec = spec;
      r.spec.set_seed(seed);
      r.spec.set_name(absl::StrCat(x.name(), "/", arm.name(), "/seed", seed));
      if (auto st = ValidateJobSpec(r.spec); !st.ok()) {
        errors.push_back(absl::StrCat(where, a.field == "sweep" ? "" : absl::StrCat(" (arm ", arm.name(), ")"), ": ",
                                      st.message()));
        break;
      }
      runs.push_back(std::move(r));
    }
  }
  if (x.reference().empty()) {
    errors.push_back("reference: name the arm the others are compared with");
  } else if (!reference_found) {
    errors.push_back(absl::StrCat("reference: no arm is named '", x.reference(), "' (arms: ",
                                  absl::StrJoin(names, ", "), ")"));
  }
  if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "; "));
  return runs;
}

}  // namespace lmsgd::ctl
