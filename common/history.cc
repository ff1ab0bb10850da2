#include "common/history.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "common/csv.h"
#include "common/file_util.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"

namespace lmsgd {

void MergeEpochRecord(const v1::EpochRecord& record, EpochRecords* records, uint32_t* dropped) {
  while (!records->empty() && records->rbegin()->epoch() > record.epoch()) records->RemoveLast();
  v1::EpochRecord* slot = nullptr;
  if (!records->empty() && records->rbegin()->epoch() == record.epoch()) slot = &*records->rbegin();
  if (slot == nullptr) {
    *records->Add() = record;
  } else if (record.iteration() == 0) {  // an evaluation on its own
    if (record.has_evaluation()) *slot->mutable_evaluation() = record.evaluation();
  } else {
    v1::Evaluation kept = slot->evaluation();
    const bool had = slot->has_evaluation();
    *slot = record;
    if (!record.has_evaluation() && had) *slot->mutable_evaluation() = kept;
  }
  const int excess = records->size() - kMaxHistoryRecords;
  if (excess > 0) {
    records->DeleteSubrange(0, excess);
    if (dropped != nullptr) *dropped += static_cast<uint32_t>(excess);
  }
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::optional<v1::FinalError> FinalErrorOf(const EpochRecords& records, int final_epochs) {
  std::vector<double> top1, top5;
  uint32_t last = 0;
  for (auto it = records.rbegin(); it != records.rend() && static_cast<int>(top1.size()) < final_epochs; ++it) {
    if (!it->has_evaluation() || it->evaluation().examples() == 0) continue;
    if (top1.empty()) last = it->epoch();
    top1.push_back(it->evaluation().top1_error());
    top5.push_back(it->evaluation().top5_error());
  }
  if (top1.empty()) return std::nullopt;
  v1::FinalError e;
  e.set_top1_error(Median(top1));
  e.set_top5_error(Median(top5));
  e.set_epochs(static_cast<uint32_t>(top1.size()));
  e.set_last_epoch(last);
  return e;
}

std::string DescribeFinalError(const v1::FinalError& e) {
  return absl::StrFormat("%.2f%% top-1, %.2f%% top-5 (median of the final %d evaluated epoch%s, up to epoch %d)",
                         100 * e.top1_error(), 100 * e.top5_error(), e.epochs(), e.epochs() == 1 ? "" : "s",
                         e.last_epoch());
}

namespace {

constexpr const char* kCsvColumns[] = {
    "epoch",     "iteration", "world_size",  "global_batch", "generation",    "mean_loss",
    "lr",        "images_per_second",        "train_seconds", "data_wait_s",  "forward_s",
    "backward_s", "exposed_comm_s",          "optimizer_s",  "top1_error",    "top5_error",
    "eval_examples", "time_unix_ms"};

std::string G(double v) { return absl::StrFormat("%.9g", v); }

}  // namespace

std::string HistoryCsv(const EpochRecords& records) {
  std::string out = absl::StrJoin(kCsvColumns, ",");
  out += "\n";
  for (const auto& r : records) {
    const auto& t = r.step_time();
    const bool ev = r.has_evaluation();
    absl::StrAppend(&out, r.epoch(), ",", r.iteration(), ",", r.world_size(), ",", r.global_batch(), ",",
                    r.generation(), ",", G(r.mean_loss()), ",", G(r.lr()), ",", G(r.images_per_second()), ",",
                    G(r.train_seconds()), ",", G(t.data_wait_s()), ",", G(t.forward_s()), ",", G(t.backward_s()), ",",
                    G(t.exposed_comm_s()), ",", G(t.optimizer_s()), ",", ev ? G(r.evaluation().top1_error()) : "",
                    ",", ev ? G(r.evaluation().top5_error()) : "", ",",
                    ev ? absl::StrCat(r.evaluation().examples()) : "", ",", r.time_unix_ms(), "\n");
  }
  return out;
}

std::string HistoryJsonLines(const EpochRecords& records) {
  std::string out;
  for (const auto& r : records) absl::StrAppend(&out, ProtoToJson(r, /*pretty=*/false), "\n");
  return out;
}

std::string HistoryTable(const EpochRecords& records) {
  std::string s = absl::StrFormat("%5s %9s %4s %6s %8s %9s %9s %8s %8s %8s %8s %8s %8s\n", "EPOCH", "ITERATION", "K",
                                  "KN", "LOSS", "LR", "IMG/S", "DATA ms", "FWD ms", "BWD ms", "COMM ms", "TOP-1",
                                  "TOP-5");
  for (const auto& r : records) {
    const auto& t = r.step_time();
    std::string top1 = "-", top5 = "-";
    if (r.has_evaluation()) {
      top1 = absl::StrFormat("%.2f%%", 100 * r.evaluation().top1_error());
      top5 = absl::StrFormat("%.2f%%", 100 * r.evaluation().top5_error());
    }
    absl::StrAppend(&s, absl::StrFormat("%5d %9d %4d %6d %8.4f %9.4g %9.1f %8.1f %8.1f %8.1f %8.1f %8s %8s\n",
                                        r.epoch(), r.iteration(), r.world_size(), r.global_batch(), r.mean_loss(),
                                        r.lr(), r.images_per_second(), 1e3 * t.data_wait_s(), 1e3 * t.forward_s(),
                                        1e3 * t.backward_s(), 1e3 * t.exposed_comm_s(), top1, top5));
  }
  if (records.empty()) absl::StrAppend(&s, "(no epochs yet)\n");
  if (auto e = FinalErrorOf(records); e.has_value()) absl::StrAppend(&s, "error: ", DescribeFinalError(*e), "\n");
  return s;
}

absl::StatusOr<std::vector<v1::EpochRecord>> ParseHistoryJsonLines(const std::string& text, const std::string& name) {
  std::vector<v1::EpochRecord> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    v1::EpochRecord r;
    auto st = google::protobuf::util::JsonStringToMessage(std::string(line), &r);
    if (!st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": line ", line_no, ": not an EpochRecord: ", st.message().ToString()));
    }
    out.push_back(std::move(r));
  }
  return out;
}

absl::StatusOr<std::vector<v1::EpochRecord>> ParseHistoryCsv(const std::string& text, const std::string& name) {
  ASSIGN_OR_RETURN(CsvTable t, CsvTable::Parse(text, name));
  for (const char* c : {"epoch", "iteration", "mean_loss", "lr", "top1_error", "top5_error"}) {
    if (!t.has_column(c)) return absl::InvalidArgumentError(absl::StrCat(name, ": no column '", c, "'"));
  }
  std::vector<v1::EpochRecord> out;
  for (size_t i = 0; i < t.rows(); ++i) {
    v1::EpochRecord r;
    ASSIGN_OR_RETURN(uint64_t epoch, t.GetUint(i, "epoch"));
    r.set_epoch(static_cast<uint32_t>(epoch));
    ASSIGN_OR_RETURN(uint64_t it, t.GetUint(i, "iteration"));
    r.set_iteration(it);
    auto uint_or_zero = [&](const char* c) -> absl::StatusOr<uint64_t> {
      if (t.Get(i, c).empty()) return 0;
      return t.GetUint(i, c);
    };
    auto double_or_zero = [&](const char* c) -> absl::StatusOr<double> {
      if (t.Get(i, c).empty()) return 0.0;
      return t.GetDouble(i, c);
    };
    ASSIGN_OR_RETURN(uint64_t k, uint_or_zero("world_size"));
    r.set_world_size(static_cast<uint32_t>(k));
    ASSIGN_OR_RETURN(uint64_t kn, uint_or_zero("global_batch"));
    r.set_global_batch(kn);
    ASSIGN_OR_RETURN(uint64_t gen, uint_or_zero("generation"));
    r.set_generation(gen);
    ASSIGN_OR_RETURN(double loss, double_or_zero("mean_loss"));
    r.set_mean_loss(loss);
    ASSIGN_OR_RETURN(double lr, double_or_zero("lr"));
    r.set_lr(lr);
    ASSIGN_OR_RETURN(double ips, double_or_zero("images_per_second"));
    r.set_images_per_second(ips);
    ASSIGN_OR_RETURN(double ts, double_or_zero("train_seconds"));
    r.set_train_seconds(ts);
    auto* st = r.mutable_step_time();
    ASSIGN_OR_RETURN(double dw, double_or_zero("data_wait_s"));
    st->set_data_wait_s(dw);
    ASSIGN_OR_RETURN(double fw, double_or_zero("forward_s"));
    st->set_forward_s(fw);
    ASSIGN_OR_RETURN(double bw, double_or_zero("backward_s"));
    st->set_backward_s(bw);
    ASSIGN_OR_RETURN(double cm, double_or_zero("exposed_comm_s"));
    st->set_exposed_comm_s(cm);
    ASSIGN_OR_RETURN(double op, double_or_zero("optimizer_s"));
    st->set_optimizer_s(op);
    if (!t.Get(i, "top1_error").empty()) {
      auto* ev = r.mutable_evaluation();
      ev->set_epoch(r.epoch());
      ASSIGN_OR_RETURN(double t1, t.GetDouble(i, "top1_error"));
      ev->set_top1_error(t1);
      ASSIGN_OR_RETURN(double t5, double_or_zero("top5_error"));
      ev->set_top5_error(t5);
      ASSIGN_OR_RETURN(uint64_t n, uint_or_zero("eval_examples"));
      ev->set_examples(n);
    }
    ASSIGN_OR_RETURN(uint64_t ms, uint_or_zero("time_unix_ms"));
    r.set_time_unix_ms(static_cast<int64_t>(ms));
    out.push_back(std::move(r));
  }
  return out;
}

absl::Status WriteHistoryFile(const std::string& path, const EpochRecords& records) {
  const bool csv = absl::EndsWith(path, ".csv");
  auto st = WriteFileAtomically(path, csv ? HistoryCsv(records) : HistoryJsonLines(records));
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("history file: ", st.message()));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::EpochRecord>> ReadHistoryFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  if (absl::EndsWith(path, ".csv")) return ParseHistoryCsv(text, path);
  return ParseHistoryJsonLines(text, path);
}

}  // namespace lmsgd
