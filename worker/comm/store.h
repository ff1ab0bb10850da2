// Rendezvous key-value store for bootstrapping communicators (after Gloo's Store): ranks publish
// their transport addresses under keys scoped by (job, generation) and wait for the others'.
//
// Implementations: MemoryStore (threads in one process, tests), FileStore (a directory shared by
// the processes, tests and single-host runs), and the coordinator's PublishBootstrap /
// GetBootstrap RPCs (distributed runs). Get waits until the key exists or the deadline passes
// (DEADLINE_EXCEEDED naming the key).
#pragma once

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lmsgd::comm {

class Store {
 public:
  virtual ~Store() = default;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  virtual absl::StatusOr<std::string> Get(const std::string& key, absl::Time deadline) = 0;
};

class MemoryStore final : public Store {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Time deadline) override;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> values_;
};

// One file per key in `dir` (written atomically); Get polls every few milliseconds.
class FileStore final : public Store {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Time deadline) override;

 private:
  std::string Path(const std::string& key) const;
  std::string dir_;
};

}  // namespace lmsgd::comm
