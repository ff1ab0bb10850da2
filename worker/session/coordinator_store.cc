#include "worker/session/coordinator_store.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lmsgd::session {
namespace {

// "<anything>/<name>/<rank>" -> (name, rank).
absl::Status SplitKey(const std::string& key, std::string* name, int* rank) {
  const size_t last = key.rfind('/');
  const size_t prev = last == std::string::npos || last == 0 ? std::string::npos : key.rfind('/', last - 1);
  if (last == std::string::npos || !absl::SimpleAtoi(key.substr(last + 1), rank)) {
    return absl::InvalidArgumentError(absl::StrCat("store key '", key, "' is not <prefix>/<name>/<rank>"));
  }
  *name = key.substr(prev == std::string::npos ? 0 : prev + 1, last - (prev == std::string::npos ? 0 : prev + 1));
  return absl::OkStatus();
}

}  // namespace

absl::Status CoordinatorStore::Set(const std::string& key, const std::string& value) {
  std::string name;
  int rank = -1;
  RETURN_IF_ERROR(SplitKey(key, &name, &rank));
  if (rank != rank_) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank_, " cannot publish rank ", rank, "'s '", name, "'"));
  }
  return client_->PublishBootstrap(job_id_, generation_, rank_, name, value);
}

absl::StatusOr<std::string> CoordinatorStore::Get(const std::string& key, absl::Time deadline) {
  std::string name;
  int rank = -1;
  RETURN_IF_ERROR(SplitKey(key, &name, &rank));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = fetched_.find(name);
  if (it == fetched_.end()) {
    auto all = client_->GetBootstrap(job_id_, generation_, name, std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!all.ok()) return all.status();
    it = fetched_.emplace(name, std::move(*all)).first;
  }
  if (rank < 0 || rank >= static_cast<int>(it->second.size())) {
    return absl::NotFoundError(absl::StrCat("generation ", generation_, " of job ", job_id_, " has no rank ", rank));
  }
  return it->second[rank];
}

}  // namespace lmsgd::session
