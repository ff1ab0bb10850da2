#include "worker/comm/store.h"

#include <chrono>
#include <thread>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/status_macros.h"

namespace lmsgd::comm {

absl::Status MemoryStore::Set(const std::string& key, const std::string& value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    values_[key] = value;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<std::string> MemoryStore::Get(const std::string& key, absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  // Clamped so that an infinite deadline does not overflow the clock arithmetic.
  const absl::Duration left = std::clamp(deadline - absl::Now(), absl::ZeroDuration(), absl::Hours(24 * 365));
  const auto until = std::chrono::system_clock::now() + absl::ToChronoNanoseconds(left);
  if (!cv_.wait_until(lock, until, [&] { return values_.count(key) > 0; })) {
    return absl::DeadlineExceededError(absl::StrCat("store key '", key, "' not set before the deadline"));
  }
  return values_[key];
}

std::string FileStore::Path(const std::string& key) const {
  std::string safe;
  for (char c : key) safe += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.') ? c : '_';
  return dir_ + "/" + safe;
}

absl::Status FileStore::Set(const std::string& key, const std::string& value) {
  RETURN_IF_ERROR(MakeDirs(dir_));
  return WriteRecordFile(Path(key), value);
}

absl::StatusOr<std::string> FileStore::Get(const std::string& key, absl::Time deadline) {
  for (;;) {
    auto v = ReadRecordFile(Path(key));
    if (v.ok()) return v;
    if (v.status().code() != absl::StatusCode::kNotFound) return v.status();
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("store key '", key, "' (", Path(key),
                                                      ") not set before the deadline"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace lmsgd::comm
