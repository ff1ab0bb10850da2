// Minimal leveled logging to stderr (Debian's Abseil 20220623 has no absl::log).
//   LOG(INFO) << "listening on " << addr;
// Lines are written whole (one mutex-protected write per statement) with a UTC timestamp,
// level letter, thread id and file:line. LOG(FATAL) aborts: only for broken invariants.
#pragma once

#include <sstream>

namespace lmsgd::logging {

enum class Level { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Messages below this level are dropped. From LMSGD_LOG_LEVEL (INFO, WARNING, ERROR),
// read once.
Level MinLevel();
void SetMinLevel(Level level);

class LogMessage {
 public:
  LogMessage(Level level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  Level level_;
  std::ostringstream stream_;
};

// Swallows the stream when the level is disabled.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace lmsgd::logging

#define LMSGD_LOG_LEVEL_INFO ::lmsgd::logging::Level::kInfo
#define LMSGD_LOG_LEVEL_WARNING ::lmsgd::logging::Level::kWarning
#define LMSGD_LOG_LEVEL_ERROR ::lmsgd::logging::Level::kError
#define LMSGD_LOG_LEVEL_FATAL ::lmsgd::logging::Level::kFatal

#define LOG(severity)                                                          \
  (LMSGD_LOG_LEVEL_##severity < ::lmsgd::logging::MinLevel())                  \
      ? (void)0                                                                \
      : ::lmsgd::logging::Voidify() &                                          \
            ::lmsgd::logging::LogMessage(LMSGD_LOG_LEVEL_##severity, __FILE__, \
                                         __LINE__)                             \
                .stream()
