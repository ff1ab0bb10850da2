#include "common/logging.h"

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <string>

namespace lmsgd::logging {
namespace {

Level LevelFromEnv() {
  const char* env = std::getenv("LMSGD_LOG_LEVEL");
  if (env == nullptr) return Level::kInfo;
  std::string v(env);
  if (v == "WARNING" || v == "warning") return Level::kWarning;
  if (v == "ERROR" || v == "error") return Level::kError;
  return Level::kInfo;
}

std::atomic<int>& MinLevelStorage() {
  static std::atomic<int> level{static_cast<int>(LevelFromEnv())};
  return level;
}

std::mutex& WriteMutex() {
  static std::mutex mu;
  return mu;
}

const char* Basename(const char* file) {
  const char* slash = std::strrchr(file, '/');
  return slash ? slash + 1 : file;
}

}  // namespace

Level MinLevel() { return static_cast<Level>(MinLevelStorage().load(std::memory_order_relaxed)); }
void SetMinLevel(Level level) { MinLevelStorage().store(static_cast<int>(level)); }

LogMessage::LogMessage(Level level, const char* file, int line) : level_(level) {
  static const char kLetters[] = {'I', 'W', 'E', 'F'};
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() %
      1000000;
  std::tm tm;
  gmtime_r(&t, &tm);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%c%02d%02d %02d:%02d:%02d.%06ld %ld ",
                kLetters[static_cast<int>(level)], tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                tm.tm_min, tm.tm_sec, static_cast<long>(micros),
                static_cast<long>(syscall(SYS_gettid)));
  stream_ << buf << Basename(file) << ":" << line << "] ";
}

LogMessage::~LogMessage() {
  stream_ << '\n';
  std::string s = stream_.str();
  {
    std::lock_guard<std::mutex> lock(WriteMutex());
    std::fwrite(s.data(), 1, s.size(), stderr);
    std::fflush(stderr);
  }
  if (level_ == Level::kFatal) std::abort();
}

}  // namespace lmsgd::logging
