#include "common/file_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"

namespace lmsgd {
namespace {

absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  auto code = (err == ENOENT) ? absl::StatusCode::kNotFound : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, " '", path, "': ", std::strerror(err)));
}

std::string DirName(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

absl::Status WriteAll(int fd, absl::string_view data, const std::string& path) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("write", path, errno);
    }
    off += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

void PutLE(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetLE(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

constexpr char kRecordMagic[] = "LMSGDREC";
constexpr size_t kRecordHeader = 8 + 8 + 4;

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents) {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string tmp = absl::StrCat(path, ".tmp.", ::getpid(), ".", counter++, ".", rng() % 100000);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  absl::Status st = WriteAll(fd, contents, tmp);
  if (st.ok() && ::fsync(fd) != 0) st = ErrnoError("fsync", tmp, errno);
  if (::close(fd) != 0 && st.ok()) st = ErrnoError("close", tmp, errno);
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) st = ErrnoError("rename to", path, errno);
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  std::string dir = DirName(path);
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoError("cannot open directory", dir, errno);
  int rc = ::fsync(dfd);
  int err = errno;
  ::close(dfd);
  if (rc != 0) return ErrnoError("fsync directory", dir, err);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return ErrnoError("read", path, err);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

absl::Status MakeDirs(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("MakeDirs: empty path");
  std::string cur;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    cur = path.substr(0, pos);
    if (cur.empty()) continue;
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) {
      return ErrnoError("cannot create directory", cur, errno);
    }
  }
  struct stat sb;
  if (::stat(path.c_str(), &sb) != 0 || !S_ISDIR(sb.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat("'", path, "' is not a directory"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ListFiles(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoError("cannot open directory", dir, errno);
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat sb;
    std::string full = dir + "/" + name;
    if (::stat(full.c_str(), &sb) == 0 && S_ISREG(sb.st_mode)) names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

uint32_t Crc32(absl::string_view data) {
  uLong crc = crc32(0L, Z_NULL, 0);
  // zlib takes uInt lengths: feed in chunks.
  size_t off = 0;
  while (off < data.size()) {
    uInt n = static_cast<uInt>(std::min<size_t>(data.size() - off, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data.data() + off), n);
    off += n;
  }
  return static_cast<uint32_t>(crc);
}

absl::Status WriteRecordFile(const std::string& path, absl::string_view payload) {
  std::string out;
  out.reserve(kRecordHeader + payload.size());
  out.append(kRecordMagic, 8);
  PutLE(out, payload.size(), 8);
  PutLE(out, Crc32(payload), 4);
  out.append(payload.data(), payload.size());
  return WriteFileAtomically(path, out);
}

absl::StatusOr<std::string> ReadRecordFile(const std::string& path) {
  auto data = ReadFileToString(path);
  if (!data.ok()) return data.status();
  const std::string& d = *data;
  if (d.size() < kRecordHeader || std::memcmp(d.data(), kRecordMagic, 8) != 0) {
    return absl::DataLossError(
        absl::StrCat("'", path, "' is not an lmsgd record file (bad header, ", d.size(), " bytes)"));
  }
  uint64_t len = GetLE(d.data() + 8, 8);
  uint32_t crc = static_cast<uint32_t>(GetLE(d.data() + 16, 4));
  if (len != d.size() - kRecordHeader) {
    return absl::DataLossError(absl::StrCat("'", path, "' is truncated or padded: header says ",
                                            len, " payload bytes, file has ",
                                            d.size() - kRecordHeader));
  }
  std::string payload = d.substr(kRecordHeader);
  if (Crc32(payload) != crc) {
    return absl::DataLossError(absl::StrCat("'", path, "' is corrupt: checksum mismatch"));
  }
  return payload;
}

}  // namespace lmsgd
