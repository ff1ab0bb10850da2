#include "worker/checkpoint/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"
#include "worker/checkpoint/safetensors.h"
#include "common/status_macros.h"

namespace lmsgd::checkpoint {
namespace {

std::string OptimPath(const std::string& model_path) {
  std::string base(absl::StripSuffix(model_path, ".safetensors"));
  return base + ".optim.safetensors";
}

Tensor F32(const std::vector<int64_t>& shape, const float* p, int64_t n) {
  Tensor t;
  t.dtype = DType::kF32;
  t.shape = shape;
  t.f32.assign(p, p + n);
  return t;
}

}  // namespace

absl::StatusOr<std::string> SaveCheckpoint(const std::string& dir, const model::ParamStore& store,
                                           const optim::Sgd& sgd, const TrainingState& state, int keep,
                                           const std::set<std::string>& retain) {
  RETURN_IF_ERROR(MakeDirs(dir));
  const std::string name = absl::StrFormat("ckpt-%010d", state.iteration);
  const std::string model_path = dir + "/" + name + ".safetensors";
  SafetensorsFile m, o;
  auto& ps = const_cast<model::ParamStore&>(store);
  for (size_t i = 0; i < store.num_params(); ++i) {
    const auto& s = store.param_specs()[i];
    m.tensors[s.name] = F32(s.shape, ps.param(i), s.numel());
    o.tensors[s.name] = F32(s.shape, sgd.velocity()[i].data(), s.numel());
  }
  for (size_t i = 0; i < store.buffer_specs().size(); ++i) {
    const auto& s = store.buffer_specs()[i];
    m.tensors[s.name] = F32(s.shape, ps.buffer(i), s.numel());
    // torchvision keeps num_batches_tracked next to every BN's running stats.
    if (absl::EndsWith(s.name, ".running_var")) {
      Tensor nbt;
      nbt.dtype = DType::kI64;
      nbt.i64 = {store.num_batches_tracked()};
      m.tensors[std::string(absl::StripSuffix(s.name, ".running_var")) + ".num_batches_tracked"] = nbt;
    }
  }
  m.metadata = {{"format", "pt"}, {"lmsgd_model", state.model}, {"lmsgd_iteration", absl::StrCat(state.iteration)}};
  o.metadata = {{"lmsgd_model", state.model},
                {"lmsgd_iteration", absl::StrCat(state.iteration)},
                {"lmsgd_epoch", absl::StrCat(state.epoch)},
                {"lmsgd_seed", absl::StrCat(state.seed)},
                {"lmsgd_global_batch", absl::StrCat(state.global_batch)},
                {"lmsgd_world_size", absl::StrCat(state.world_size)},
                {"lmsgd_lr", absl::StrFormat("%.17g", state.lr)}};
  RETURN_IF_ERROR(WriteSafetensors(model_path, m));
  RETURN_IF_ERROR(WriteSafetensors(OptimPath(model_path), o));
  if (auto st = WriteFileAtomically(dir + "/LATEST", name + "\n"); !st.ok()) return st;  // commit
  // Retention: the newest `keep` by write time, the just written one and those in `retain`.
  auto files = ListFiles(dir);
  if (files.ok() && keep > 0) {
    std::set<std::string> kept = {name + ".safetensors"};
    for (const auto& r : retain) kept.insert(std::filesystem::path(r).filename().string());
    std::vector<std::pair<std::filesystem::file_time_type, std::string>> models;
    for (const auto& f : *files) {
      if (absl::StartsWith(f, "ckpt-") && absl::EndsWith(f, ".safetensors") && !absl::EndsWith(f, ".optim.safetensors")) {
        std::error_code ec;
        auto t = std::filesystem::last_write_time(dir + "/" + f, ec);
        if (!ec) models.emplace_back(t, f);
      }
    }
    std::sort(models.begin(), models.end());
    for (size_t i = 0; i + keep < models.size(); ++i) {
      if (kept.count(models[i].second)) continue;
      std::error_code ec;
      std::filesystem::remove(dir + "/" + models[i].second, ec);
      std::filesystem::remove(OptimPath(dir + "/" + models[i].second), ec);
    }
  }
  return model_path;
}

absl::StatusOr<std::string> LatestCheckpoint(const std::string& dir) {
  auto latest = ReadFileToString(dir + "/LATEST");
  if (!latest.ok()) {
    if (latest.status().code() == absl::StatusCode::kNotFound) {
      return absl::NotFoundError(absl::StrCat("no checkpoint in '", dir, "' (no LATEST file)"));
    }
    return latest.status();
  }
  std::string name(absl::StripTrailingAsciiWhitespace(*latest));
  if (!absl::StartsWith(name, "ckpt-") || name.find('/') != std::string::npos) {
    return absl::DataLossError(absl::StrCat("'", dir, "/LATEST' does not name a checkpoint: '", name, "'"));
  }
  return dir + "/" + name + ".safetensors";
}

absl::StatusOr<TrainingState> LoadCheckpoint(const std::string& model_path, const std::string& expected_model,
                                             model::ParamStore* store, optim::Sgd* sgd) {
  auto m = ReadSafetensors(model_path);
  if (!m.ok()) return m.status();
  const std::string optim_path = OptimPath(model_path);
  auto o = ReadSafetensors(optim_path);
  if (!o.ok()) return o.status();
  auto meta = [&](const std::string& k) -> std::string {
    auto it = o->metadata.find(k);
    return it == o->metadata.end() ? "" : it->second;
  };
  TrainingState state;
  state.model = meta("lmsgd_model");
  if (state.model != expected_model) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint '", model_path, "' holds a ", state.model,
                                                      ", the job trains a ", expected_model));
  }
  uint64_t epoch = 0, ws = 0;
  if (!absl::SimpleAtoi(meta("lmsgd_iteration"), &state.iteration) || !absl::SimpleAtoi(meta("lmsgd_epoch"), &epoch) ||
      !absl::SimpleAtoi(meta("lmsgd_seed"), &state.seed) ||
      !absl::SimpleAtoi(meta("lmsgd_global_batch"), &state.global_batch) ||
      !absl::SimpleAtoi(meta("lmsgd_world_size"), &ws) || !absl::SimpleAtod(meta("lmsgd_lr"), &state.lr)) {
    return absl::DataLossError(absl::StrCat("checkpoint '", optim_path, "' lacks its training state metadata"));
  }
  state.epoch = static_cast<uint32_t>(epoch);
  state.world_size = static_cast<uint32_t>(ws);
  // Verify everything before touching the store.
  auto check = [&](const SafetensorsFile& f, const std::string& path, const model::TensorSpec& s) -> absl::Status {
    auto it = f.tensors.find(s.name);
    if (it == f.tensors.end()) return absl::DataLossError(absl::StrCat("checkpoint '", path, "' lacks '", s.name, "'"));
    if (it->second.dtype != DType::kF32 || it->second.shape != s.shape) {
      return absl::DataLossError(absl::StrCat("checkpoint '", path, "': tensor '", s.name, "' has the wrong dtype or shape"));
    }
    return absl::OkStatus();
  };
  for (const auto& s : store->param_specs()) {
    RETURN_IF_ERROR(check(*m, model_path, s));
    RETURN_IF_ERROR(check(*o, optim_path, s));
  }
  for (const auto& s : store->buffer_specs()) {
    RETURN_IF_ERROR(check(*m, model_path, s));
  }
  // Strict, like torch's load_state_dict: no tensors the model does not have.
  const size_t bn_count = store->buffer_specs().size() / 2;  // running_mean + running_var per BN
  const size_t expected = store->num_params() + store->buffer_specs().size() + bn_count;
  if (m->tensors.size() != expected) {
    return absl::DataLossError(absl::StrCat("checkpoint '", model_path, "' holds ", m->tensors.size(),
                                            " tensors; a ", expected_model, " has ", expected));
  }
  int64_t nbt = 0;
  for (const auto& [name, t] : m->tensors) {
    if (absl::EndsWith(name, ".num_batches_tracked") && t.dtype == DType::kI64 && t.i64.size() == 1) nbt = t.i64[0];
  }
  for (size_t i = 0; i < store->num_params(); ++i) {
    const auto& v = m->tensors.at(store->param_specs()[i].name).f32;
    std::copy(v.begin(), v.end(), store->param(i));
  }
  for (size_t i = 0; i < store->buffer_specs().size(); ++i) {
    const auto& v = m->tensors.at(store->buffer_specs()[i].name).f32;
    std::copy(v.begin(), v.end(), store->buffer(i));
  }
  store->set_num_batches_tracked(nbt);
  if (sgd != nullptr) {
    std::vector<std::vector<float>> velocity;
    for (const auto& s : store->param_specs()) velocity.push_back(o->tensors.at(s.name).f32);
    RETURN_IF_ERROR(sgd->SetVelocity(velocity));
  }
  return state;
}

absl::StatusOr<InitState> LoadInitCheckpoint(const std::string& path, const std::string& expected_model,
                                             model::ParamStore* store, optim::Sgd* sgd) {
  InitState init;
  const std::string optim_path = OptimPath(path);
  std::error_code ec;
  const bool has_optim = absl::EndsWith(path, ".safetensors") && std::filesystem::exists(optim_path, ec);
  if (has_optim) {
    // An lmsgd checkpoint: its own loader checks the pair (CRCs, model, training state) whole.
    if (sgd != nullptr) {
      ASSIGN_OR_RETURN(init.state, LoadCheckpoint(path, expected_model, store, sgd));
      init.has_training_state = true;
      return init;
    }
  } else if (sgd != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("init checkpoint '", path, "' has no optimizer file ('", optim_path,
                     "'), so it holds no momentum or iteration; use init_mode INIT_WEIGHTS"));
  }
  ASSIGN_OR_RETURN(SafetensorsFile m, ReadSafetensors(path, /*require_crc=*/false));
  if (auto it = m.metadata.find("lmsgd_model"); it != m.metadata.end() && it->second != expected_model) {
    return absl::FailedPreconditionError(
        absl::StrCat("init checkpoint '", path, "' holds a ", it->second, ", the job trains a ", expected_model));
  }
  std::vector<std::string> problems;
  std::set<std::string> expected;
  auto check = [&](const model::TensorSpec& s) {
    expected.insert(s.name);
    auto it = m.tensors.find(s.name);
    if (it == m.tensors.end()) {
      problems.push_back(absl::StrCat("missing ", s.name));
    } else if (it->second.dtype != DType::kF32 || it->second.shape != s.shape) {
      problems.push_back(absl::StrCat(s.name, " is ", it->second.dtype == DType::kF32 ? "F32" : "I64", " [",
                                      absl::StrJoin(it->second.shape, ","), "], the model's is F32 [",
                                      absl::StrJoin(s.shape, ","), "]"));
    }
  };
  for (const auto& s : store->param_specs()) check(s);
  for (const auto& s : store->buffer_specs()) check(s);
  int64_t nbt = 0;
  for (const auto& [name, t] : m.tensors) {
    if (expected.count(name) > 0) continue;
    if (absl::EndsWith(name, ".num_batches_tracked") &&
        expected.count(std::string(absl::StripSuffix(name, ".num_batches_tracked")) + ".running_var") > 0) {
      if (t.dtype == DType::kI64 && t.i64.size() == 1) nbt = std::max(nbt, t.i64[0]);
      continue;
    }
    problems.push_back(absl::StrCat("unexpected ", name));
  }
  if (!problems.empty()) {
    const size_t shown = std::min<size_t>(problems.size(), 20);
    return absl::InvalidArgumentError(absl::StrCat(
        "init checkpoint '", path, "' does not fit a ", expected_model, " of this job's shape (", problems.size(),
        " mismatch", problems.size() > 1 ? "es" : "", "): ",
        absl::StrJoin(problems.begin(), problems.begin() + shown, "; "),
        problems.size() > shown ? absl::StrCat("; and ", problems.size() - shown, " more") : ""));
  }
  for (size_t i = 0; i < store->num_params(); ++i) {
    const auto& v = m.tensors.at(store->param_specs()[i].name).f32;
    std::copy(v.begin(), v.end(), store->param(i));
  }
  for (size_t i = 0; i < store->buffer_specs().size(); ++i) {
    const auto& v = m.tensors.at(store->buffer_specs()[i].name).f32;
    std::copy(v.begin(), v.end(), store->buffer(i));
  }
  store->set_num_batches_tracked(nbt);
  if (has_optim) {
    // The weights only, but the training state is still worth reporting (the evaluated epoch).
    auto o = ReadSafetensors(optim_path);
    if (o.ok()) {
      auto meta = [&](const char* k) {
        auto it = o->metadata.find(k);
        return it == o->metadata.end() ? std::string() : it->second;
      };
      uint64_t epoch = 0;
      if (absl::SimpleAtoi(meta("lmsgd_iteration"), &init.state.iteration) &&
          absl::SimpleAtoi(meta("lmsgd_epoch"), &epoch)) {
        init.state.epoch = static_cast<uint32_t>(epoch);
        init.state.model = meta("lmsgd_model");
        init.has_training_state = true;
      }
    }
  }
  return init;
}

}  // namespace lmsgd::checkpoint
