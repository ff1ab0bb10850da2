// JobManager's implementation is split by concern: job_manager.cc (jobs: submit, cancel,
// persistence, recovery, the tick), job_manager_formation.cc (ranks and generations: forming,
// breaking, Join), job_manager_workers.cc (what running workers send: bootstrap blobs,
// heartbeats, reports). This header holds the helpers they share.
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "coordinator/metrics.h"
#include "lmsgd/v1/job.pb.h"

namespace lmsgd::coordinator::internal {

inline int64_t UnixMillis(absl::Time t) { return absl::ToUnixMillis(t); }

inline std::string StateName(v1::JobState s) { return ::lmsgd::coordinator::JobStateLabel(s); }

inline std::string DescribeMember(const v1::WorkerInfo& w) {
  if (w.rank() >= 0) return absl::StrCat("worker ", w.worker_id(), " (rank ", w.rank(), ")");
  return absl::StrCat("worker ", w.worker_id());
}

}  // namespace lmsgd::coordinator::internal
