// The arithmetic a backend trains in. kFp32: fp32 everywhere (FMA-only convolutions on the
// GPU); kTf32: tensor cores with TF32 inputs (GPU); kBf16: bf16 activations and a bf16 copy of
// the weights, fp32 master weights, gradients, BN statistics, loss and momentum.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace lmsgd::backend {

enum class Precision { kFp32, kTf32, kBf16 };

inline const char* PrecisionName(Precision p) {
  switch (p) {
    case Precision::kFp32: return "fp32";
    case Precision::kTf32: return "tf32";
    case Precision::kBf16: return "bf16";
  }
  return "?";
}

// "fp32", "tf32", "bf16" (any case); anything else is INVALID_ARGUMENT naming the value.
inline absl::StatusOr<Precision> ParsePrecision(absl::string_view name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "fp32") return Precision::kFp32;
  if (n == "tf32") return Precision::kTf32;
  if (n == "bf16") return Precision::kBf16;
  return absl::InvalidArgumentError(absl::StrCat("precision '", name, "': expected fp32, tf32 or bf16"));
}

}  // namespace lmsgd::backend
