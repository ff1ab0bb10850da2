#include "common/csv.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace lmsgd {

absl::StatusOr<CsvTable> CsvTable::Parse(const std::string& text, const std::string& name) {
  CsvTable t;
  t.name_ = name;
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  size_t line_no = 0;
  bool have_header = false;
  size_t columns = 0;
  for (std::string& line : lines) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    std::vector<std::string> fields = absl::StrSplit(line, ',');
    if (!have_header) {
      for (size_t i = 0; i < fields.size(); ++i) {
        if (fields[i].empty()) return absl::InvalidArgumentError(absl::StrCat(name, ": line 1: empty column name"));
        if (!t.index_.emplace(fields[i], i).second) {
          return absl::InvalidArgumentError(absl::StrCat(name, ": line 1: column '", fields[i], "' twice"));
        }
      }
      columns = fields.size();
      have_header = true;
      continue;
    }
    if (fields.size() != columns) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": line ", line_no, ": ", fields.size(),
                                                     " fields where the header has ", columns));
    }
    t.rows_.push_back(std::move(fields));
  }
  if (!have_header) return absl::InvalidArgumentError(absl::StrCat(name, ": empty (no header line)"));
  return t;
}

const std::string& CsvTable::Get(size_t row, const std::string& column) const {
  static const std::string kEmpty;
  auto it = index_.find(column);
  if (it == index_.end() || row >= rows_.size()) return kEmpty;
  return rows_[row][it->second];
}

absl::StatusOr<double> CsvTable::GetDouble(size_t row, const std::string& column) const {
  double v;
  const std::string& f = Get(row, column);
  if (!absl::SimpleAtod(f, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": line ", row + 2, ": column '", column, "': '", f, "' is not a number"));
  }
  return v;
}

absl::StatusOr<uint64_t> CsvTable::GetUint(size_t row, const std::string& column) const {
  uint64_t v;
  const std::string& f = Get(row, column);
  if (!absl::SimpleAtoi(f, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": line ", row + 2, ": column '", column, "': '", f, "' is not a whole number"));
  }
  return v;
}

bool IsCsvSafe(absl::string_view field) { return field.find_first_of(",\"\n\r") == absl::string_view::npos; }

}  // namespace lmsgd
