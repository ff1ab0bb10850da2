// A job's per-epoch history (v1::EpochRecord) and the paper's error of a run.
//
// Merge rule, the same in the coordinator's durable record and in a standalone history file:
// a record for epoch e drops every record of a later epoch (they were trained by a generation
// that a recovery rolled back), then replaces the record of epoch e or is appended. A record
// without training fields (iteration 0: an evaluation reported on its own) keeps the training
// fields already there, and a training record without an evaluation keeps the one there.
// At most kMaxHistoryRecords are kept; beyond that the oldest are dropped and counted.
//
// The paper's metric (Goyal et al., section 5.1): the error of a run is the median top-1
// error over its final 5 epochs; with fewer evaluated epochs, over all of them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "google/protobuf/repeated_field.h"
#include "lmsgd/v1/job.pb.h"

namespace lmsgd {

inline constexpr int kMaxHistoryRecords = 1000;
inline constexpr int kFinalErrorEpochs = 5;

using EpochRecords = google::protobuf::RepeatedPtrField<v1::EpochRecord>;

// Applies the merge rule above; `dropped` (may be null) counts records dropped by the bound.
void MergeEpochRecord(const v1::EpochRecord& record, EpochRecords* records, uint32_t* dropped);

// The median over the final min(kFinalErrorEpochs, n) evaluated epochs; nullopt when none was
// evaluated.
std::optional<v1::FinalError> FinalErrorOf(const EpochRecords& records, int final_epochs = kFinalErrorEpochs);

// Median of the values (the mean of the two middle ones for an even count); 0 when empty.
double Median(std::vector<double> values);

// "7.29% (median of final 5 epochs, 4-8)"
std::string DescribeFinalError(const v1::FinalError& e);

// Renderings for `lmsgdctl history` and --history_file. CSV: one header line, one row per
// record, an evaluation's columns empty when there was none. JSON lines: one EpochRecord per
// line in protobuf's JSON mapping (proto field names).
std::string HistoryCsv(const EpochRecords& records);
std::string HistoryJsonLines(const EpochRecords& records);
std::string HistoryTable(const EpochRecords& records);

// Read what HistoryJsonLines / HistoryCsv wrote; errors name `name` and the line.
absl::StatusOr<std::vector<v1::EpochRecord>> ParseHistoryJsonLines(const std::string& text, const std::string& name);
absl::StatusOr<std::vector<v1::EpochRecord>> ParseHistoryCsv(const std::string& text, const std::string& name);

// --history_file: JSON lines, or CSV when the path ends in ".csv"; written atomically.
absl::Status WriteHistoryFile(const std::string& path, const EpochRecords& records);
absl::StatusOr<std::vector<v1::EpochRecord>> ReadHistoryFile(const std::string& path);

}  // namespace lmsgd
