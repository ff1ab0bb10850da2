// Status helpers: early-return macros and context annotation.
//
//   RETURN_IF_ERROR(expr) << nothing; returns the status of expr if it is not OK.
//   ASSIGN_OR_RETURN(lhs, expr): evaluates a StatusOr, returns its error or assigns its value.
//   Annotate(status, "while doing X"): prefixes context, keeping the code.
#pragma once

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace lmsgd {

// Returns `status` with "context: " prepended to its message; OK stays OK.
inline absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace lmsgd

#define LMSGD_CONCAT_INNER_(a, b) a##b
#define LMSGD_CONCAT_(a, b) LMSGD_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                                    \
  do {                                                           \
    ::absl::Status lmsgd_status_ = (expr);                       \
    if (!lmsgd_status_.ok()) return lmsgd_status_;               \
  } while (false)

#define LMSGD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr)             \
  auto tmp = (expr);                                             \
  if (!tmp.ok()) return std::move(tmp).status();                 \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  LMSGD_ASSIGN_OR_RETURN_IMPL_(LMSGD_CONCAT_(lmsgd_statusor_, __LINE__), lhs, expr)
