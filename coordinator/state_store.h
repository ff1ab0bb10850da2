// Durable job records. Every job transition is written here before it is acknowledged.
//
// FileStateStore keeps one checksummed record file per job, `<dir>/jobs/<job_id>.job`,
// replaced atomically (common/file_util.h): a crash leaves the old or the new record. A record
// that fails its checksum on load is reported and moved aside to `.corrupt`; the others load.
//
// One writer per directory: Open takes an exclusive flock on `<dir>/LOCK` (which then holds the
// owner's pid) for the store's lifetime. A second store on the directory, in any process, fails
// at once naming the directory and that pid. The kernel drops the lock when its holder dies, so
// a coordinator killed with SIGKILL does not block its restart.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lmsgd/v1/job.pb.h"

namespace lmsgd::coordinator {

struct LoadedState {
  std::vector<v1::JobStatus> jobs;
  std::vector<std::string> errors;  // one per unreadable record, naming the file
  uint64_t max_job_seq = 0;         // highest sequence number seen, corrupt records included
};

class StateStore {
 public:
  virtual ~StateStore() = default;
  virtual absl::Status SaveJob(const v1::JobStatus& job) = 0;
  virtual absl::StatusOr<LoadedState> Load() = 0;
};

class FileStateStore final : public StateStore {
 public:
  // Creates `dir` and `dir/jobs` if needed; FAILED_PRECONDITION when another store holds `dir`.
  static absl::StatusOr<std::unique_ptr<FileStateStore>> Open(const std::string& dir);
  ~FileStateStore() override;
  absl::Status SaveJob(const v1::JobStatus& job) override;
  absl::StatusOr<LoadedState> Load() override;

 private:
  FileStateStore(std::string dir, int lock_fd) : dir_(std::move(dir)), lock_fd_(lock_fd) {}
  std::string JobPath(const std::string& job_id) const;
  std::string dir_;
  int lock_fd_ = -1;
};

// For unit tests: keeps serialized records in memory; can be told to fail writes.
class MemoryStateStore final : public StateStore {
 public:
  absl::Status SaveJob(const v1::JobStatus& job) override;
  absl::StatusOr<LoadedState> Load() override;
  void set_fail_writes(bool fail) { fail_writes_ = fail; }
  size_t writes() const { return writes_; }

 private:
  std::mutex mu_;
  std::map<std::string, std::string> records_;
  bool fail_writes_ = false;
  size_t writes_ = 0;
};

// "job-000042" -> 42; 0 when the id is not of that form.
uint64_t JobSeqFromId(const std::string& job_id);
std::string JobIdFromSeq(uint64_t seq);

}  // namespace lmsgd::coordinator
