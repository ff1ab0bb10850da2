// Minimal CSV for the files lmsgd writes itself (history, experiment metrics): comma-separated,
// no quoting, so a field may not hold a comma, a quote or a line break (writers check with
// IsCsvSafe). The first line is the header; rows are read by column name.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmsgd {

class CsvTable {
 public:
  // Errors name `name`, the line and what is wrong (a row with the wrong number of fields).
  static absl::StatusOr<CsvTable> Parse(const std::string& text, const std::string& name);

  size_t rows() const { return rows_.size(); }
  bool has_column(const std::string& column) const { return index_.count(column) > 0; }
  // The field, or "" for a column the file lacks.
  const std::string& Get(size_t row, const std::string& column) const;
  // Number parsers: `what` goes into the error, which names the file, line and column.
  absl::StatusOr<double> GetDouble(size_t row, const std::string& column) const;
  absl::StatusOr<uint64_t> GetUint(size_t row, const std::string& column) const;

 private:
  std::string name_;
  std::map<std::string, size_t> index_;
  std::vector<std::vector<std::string>> rows_;
};

bool IsCsvSafe(absl::string_view field);

}  // namespace lmsgd
