// A worker's slot on its host: the (host, local_device) pair the coordinator knows it by.
//
// The slot is claimed with an flock on <dir>/<coordinator>/<host>-<index>.lock, held for the
// process's life; the kernel drops it when the process dies, however it dies. So:
//   - two live workers of one coordinator never hold the same slot on a host: an explicitly
//     requested index that is held is an error naming the holder's pid and the fix;
//   - without an explicit index the worker takes what its launcher says (LOCAL_RANK from
//     torchrun-style launchers, SLURM_LOCALID, Kubernetes' JOB_COMPLETION_INDEX), or else the
//     lowest free index;
//   - a worker that restarts after a crash finds the slot free, and the lock file still names
//     the dead process's incarnation: it tells the coordinator it replaces that one, which
//     the coordinator then drops at once instead of refusing a second live claim.
// The file holds "pid <pid>\nincarnation <incarnation>\n" for messages and for that handover.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace lmsgd::session {

class LocalSlot {
 public:
  ~LocalSlot();
  LocalSlot(const LocalSlot&) = delete;
  LocalSlot& operator=(const LocalSlot&) = delete;

  // `requested` < 0: the launcher's index, else the lowest free one (below `max_slots`).
  static absl::StatusOr<std::unique_ptr<LocalSlot>> Claim(const std::string& dir, const std::string& coordinator,
                                                          const std::string& host, int requested,
                                                          const std::string& incarnation, int max_slots = 256);
  int index() const { return index_; }
  // How the index was chosen, for the log: "--local_device", "LOCAL_RANK", "the lowest free slot".
  const std::string& source() const { return source_; }
  // The incarnation of the previous (dead) holder, if the lock file named one.
  const std::string& previous_incarnation() const { return previous_; }
  const std::string& path() const { return path_; }

 private:
  LocalSlot() = default;
  int fd_ = -1;
  int index_ = 0;
  std::string source_, previous_, path_;
};

// The local index a launcher gave this process (and the variable's name), if any.
std::optional<int> LauncherLocalIndex(std::string* variable);

// The default lock directory: $XDG_RUNTIME_DIR/lmsgd-slots, or /tmp/lmsgd-slots.
std::string DefaultSlotDir();

}  // namespace lmsgd::session
