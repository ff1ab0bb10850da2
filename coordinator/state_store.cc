#include "coordinator/state_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/status_macros.h"

namespace lmsgd::coordinator {

uint64_t JobSeqFromId(const std::string& job_id) {
  if (!absl::StartsWith(job_id, "job-")) return 0;
  uint64_t seq = 0;
  if (!absl::SimpleAtoi(job_id.substr(4), &seq)) return 0;
  return seq;
}

std::string JobIdFromSeq(uint64_t seq) { return absl::StrFormat("job-%06d", seq); }

absl::StatusOr<std::unique_ptr<FileStateStore>> FileStateStore::Open(const std::string& dir) {
  RETURN_IF_ERROR(Annotate(MakeDirs(dir + "/jobs"), "opening state dir"));
  const std::string lock = dir + "/LOCK";
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot open ", lock, ": ", std::strerror(errno)));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {0};
    const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
    ::close(fd);
    std::string holder(buf, n > 0 ? static_cast<size_t>(n) : 0);
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(absl::StrCat(
          "state directory ", dir, " is in use by another lmsgd-coordinator (pid ", holder.empty() ? "?" : holder,
          ", holding ", lock, "); one coordinator per state directory"));
    }
    return absl::InternalError(absl::StrCat("cannot lock ", lock, ": ", std::strerror(err)));
  }
  const std::string pid = absl::StrCat(::getpid(), "\n");
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot write ", lock, ": ", std::strerror(err)));
  }
  return std::unique_ptr<FileStateStore>(new FileStateStore(dir, fd));
}

FileStateStore::~FileStateStore() {
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

std::string FileStateStore::JobPath(const std::string& job_id) const {
  return absl::StrCat(dir_, "/jobs/", job_id, ".job");
}

absl::Status FileStateStore::SaveJob(const v1::JobStatus& job) {
  std::string payload;
  if (!job.SerializeToString(&payload)) {
    return absl::InternalError(absl::StrCat("cannot serialize job ", job.job_id()));
  }
  return Annotate(WriteRecordFile(JobPath(job.job_id()), payload),
                  absl::StrCat("persisting job ", job.job_id()));
}

absl::StatusOr<LoadedState> FileStateStore::Load() {
  LoadedState out;
  const std::string jobs_dir = dir_ + "/jobs";
  ASSIGN_OR_RETURN(auto names, ListFiles(jobs_dir));
  for (const auto& name : names) {
    const std::string path = jobs_dir + "/" + name;
    if (absl::StrContains(name, ".tmp.")) {
      // Left by a crash between create and rename: never acknowledged, safe to drop.
      std::remove(path.c_str());
      continue;
    }
    if (absl::EndsWith(name, ".job")) {
      out.max_job_seq = std::max(out.max_job_seq, JobSeqFromId(name.substr(0, name.size() - 4)));
    } else {
      if (absl::EndsWith(name, ".corrupt")) {
        out.max_job_seq = std::max(out.max_job_seq, JobSeqFromId(name.substr(0, name.find('.'))));
      }
      continue;
    }
    auto payload = ReadRecordFile(path);
    v1::JobStatus job;
    absl::Status err;
    if (!payload.ok()) {
      err = payload.status();
    } else if (!job.ParseFromString(*payload) || job.job_id().empty()) {
      err = absl::DataLossError(absl::StrCat("'", path, "' does not hold a job record"));
    }
    if (!err.ok()) {
      std::string aside = path + ".corrupt";
      std::rename(path.c_str(), aside.c_str());
      out.errors.push_back(absl::StrCat(err.message(), " (moved to ", aside, ")"));
      continue;
    }
    out.jobs.push_back(std::move(job));
  }
  return out;
}

absl::Status MemoryStateStore::SaveJob(const v1::JobStatus& job) {
  std::lock_guard<std::mutex> lock(mu_);
  if (fail_writes_) return absl::InternalError("MemoryStateStore: write failure injected");
  records_[job.job_id()] = job.SerializeAsString();
  ++writes_;
  return absl::OkStatus();
}

absl::StatusOr<LoadedState> MemoryStateStore::Load() {
  std::lock_guard<std::mutex> lock(mu_);
  LoadedState out;
  for (const auto& [id, bytes] : records_) {
    v1::JobStatus job;
    job.ParseFromString(bytes);
    out.max_job_seq = std::max(out.max_job_seq, JobSeqFromId(id));
    out.jobs.push_back(std::move(job));
  }
  return out;
}

}  // namespace lmsgd::coordinator
