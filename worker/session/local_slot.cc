#include "worker/session/local_slot.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/file_util.h"

namespace lmsgd::session {
namespace {

// File-name-safe form of an address or host name.
std::string Safe(const std::string& s) {
  std::string out = s;
  for (char& c : out) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_')) c = '_';
  }
  return out.empty() ? "_" : out;
}

std::string ReadAll(int fd) {
  std::string text;
  char buf[512];
  ssize_t n;
  off_t off = 0;
  while ((n = ::pread(fd, buf, sizeof buf, off)) > 0) {
    text.append(buf, static_cast<size_t>(n));
    off += n;
    if (text.size() > 4096) break;
  }
  return text;
}

std::string Field(const std::string& text, const std::string& key) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, key + " ")) return std::string(absl::StripAsciiWhitespace(line));
  }
  return "";
}

}  // namespace

std::optional<int> LauncherLocalIndex(std::string* variable) {
  for (const char* name : {"LOCAL_RANK", "SLURM_LOCALID", "JOB_COMPLETION_INDEX"}) {
    const char* v = std::getenv(name);
    int i = 0;
    if (v != nullptr && *v && absl::SimpleAtoi(v, &i) && i >= 0) {
      if (variable != nullptr) *variable = name;
      return i;
    }
  }
  return std::nullopt;
}

std::string DefaultSlotDir() {
  const char* run = std::getenv("XDG_RUNTIME_DIR");
  return absl::StrCat(run != nullptr && *run ? run : "/tmp", "/lmsgd-slots");
}

LocalSlot::~LocalSlot() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

absl::StatusOr<std::unique_ptr<LocalSlot>> LocalSlot::Claim(const std::string& dir, const std::string& coordinator,
                                                            const std::string& host, int requested,
                                                            const std::string& incarnation, int max_slots) {
  const std::string scope = absl::StrCat(dir, "/", Safe(coordinator));
  if (absl::Status st = MakeDirs(scope); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat("local device slots: ", st.message()));
  }
  std::string source = "--local_device";
  if (requested < 0) {
    std::string var;
    if (auto i = LauncherLocalIndex(&var)) {
      requested = *i;
      source = var;
    }
  }
  const bool fixed = requested >= 0;
  const int first = fixed ? requested : 0, last = fixed ? requested : max_slots - 1;
  for (int i = first; i <= last; ++i) {
    const std::string path = absl::StrCat(scope, "/", Safe(host), "-", i, ".lock");
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::PermissionDeniedError(absl::StrCat("local device slot '", path, "': ", std::strerror(errno)));
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      const std::string holder = ReadAll(fd);
      ::close(fd);
      if (err != EWOULDBLOCK) {
        return absl::InternalError(absl::StrCat("locking '", path, "': ", std::strerror(err)));
      }
      if (!fixed) continue;
      const std::string pid = Field(holder, "pid");
      return absl::AlreadyExistsError(absl::StrCat(
          "local device ", i, " of host ", host, " (from ", source, ") is held by another lmsgd-worker of coordinator ",
          coordinator, pid.empty() ? "" : absl::StrCat(" (pid ", pid, ")"), ", lock ", path,
          ": give this worker another --local_device, or leave --local_device (and LOCAL_RANK) unset to claim a free "
          "one"));
    }
    auto slot = std::unique_ptr<LocalSlot>(new LocalSlot());
    slot->fd_ = fd;
    slot->index_ = i;
    slot->source_ = fixed ? source : "the lowest free slot";
    slot->previous_ = Field(ReadAll(fd), "incarnation");
    slot->path_ = path;
    const std::string mine = absl::StrCat("pid ", ::getpid(), "\nincarnation ", incarnation, "\n");
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, mine.data(), mine.size(), 0) != static_cast<ssize_t>(mine.size())) {
      return absl::InternalError(absl::StrCat("writing '", path, "': ", std::strerror(errno)));
    }
    return slot;
  }
  return absl::ResourceExhaustedError(absl::StrCat("all ", max_slots, " local device slots of host ", host,
                                                   " under ", scope, " are held by live workers"));
}

}  // namespace lmsgd::session
