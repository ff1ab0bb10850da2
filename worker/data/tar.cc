#include "worker/data/tar.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lmsgd::data {
namespace {

constexpr size_t kBlock = 512;
constexpr uint64_t kMaxMetaBytes = 1 << 20;  // pax records and GNU long names

uint64_t Padded(uint64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// A numeric header field: octal digits (leading spaces, ended by NUL or space), or GNU's
// base-256 (high bit of the first byte set).
bool ParseNumber(const char* field, size_t len, uint64_t* out) {
  const auto* u = reinterpret_cast<const unsigned char*>(field);
  if (u[0] & 0x80) {
    uint64_t v = u[0] & 0x7f;
    for (size_t i = 1; i < len; ++i) {
      if (v >> 56) return false;
      v = (v << 8) | u[i];
    }
    *out = v;
    return true;
  }
  size_t i = 0;
  while (i < len && field[i] == ' ') ++i;
  uint64_t v = 0;
  for (; i < len && field[i] != '\0' && field[i] != ' '; ++i) {
    if (field[i] < '0' || field[i] > '7' || (v >> 61)) return false;
    v = v * 8 + static_cast<uint64_t>(field[i] - '0');
  }
  *out = v;
  return true;
}

std::string Field(const char* p, size_t len) { return std::string(p, strnlen(p, len)); }

bool ChecksumOk(const char* h) {
  uint64_t stored = 0;
  if (!ParseNumber(h + 148, 8, &stored)) return false;
  int64_t unsigned_sum = 0, signed_sum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    const bool in_field = i >= 148 && i < 156;
    unsigned_sum += in_field ? ' ' : static_cast<unsigned char>(h[i]);
    signed_sum += in_field ? ' ' : static_cast<signed char>(h[i]);
  }
  return static_cast<int64_t>(stored) == unsigned_sum || static_cast<int64_t>(stored) == signed_sum;
}

// pax extended header records: "<len> <key>=<value>\n".
void ParsePax(std::string_view data, std::string* path, uint64_t* size, bool* has_size) {
  while (!data.empty()) {
    const size_t sp = data.find(' ');
    if (sp == std::string_view::npos) return;
    uint64_t len = 0;
    if (!absl::SimpleAtoi(absl::string_view(data.data(), sp), &len) || len <= sp + 1 || len > data.size()) return;
    std::string_view rec = data.substr(sp + 1, len - sp - 1);
    if (!rec.empty() && rec.back() == '\n') rec.remove_suffix(1);
    const size_t eq = rec.find('=');
    if (eq != std::string_view::npos) {
      const std::string_view key = rec.substr(0, eq), value = rec.substr(eq + 1);
      if (key == "path") *path = std::string(value);
      if (key == "size") *has_size = absl::SimpleAtoi(absl::string_view(value.data(), value.size()), size);
    }
    data.remove_prefix(len);
  }
}

}  // namespace

absl::StatusOr<std::vector<TarMember>> IndexTar(const ReadAtFn& read_at, uint64_t size, const std::string& name) {
  std::vector<TarMember> members;
  char h[kBlock];
  std::string next_path;
  uint64_t next_size = 0;
  bool next_has_size = false;
  uint64_t pos = 0;
  auto bad = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat("tar archive '", name, "' at byte ", pos, ": ", what));
  };
  while (pos + kBlock <= size) {
    if (absl::Status st = read_at(pos, kBlock, h); !st.ok()) return bad(std::string(st.message()));
    if (std::all_of(h, h + kBlock, [](char c) { return c == '\0'; })) return members;  // end of archive
    if (!ChecksumOk(h)) return bad("header checksum mismatch (not a tar archive, or damaged)");
    uint64_t member_size = 0;
    if (!ParseNumber(h + 124, 12, &member_size)) return bad("unreadable size field");
    const char type = h[156];
    const uint64_t data_at = pos + kBlock;
    if (next_has_size && type != 'x' && type != 'g' && type != 'L') member_size = next_size;
    if (member_size > size || data_at + member_size > size) {
      return bad(absl::StrCat("member of ", member_size, " bytes runs past the end of the archive (", size,
                              " bytes): truncated"));
    }
    if (type == 'x' || type == 'g' || type == 'L') {
      if (member_size > kMaxMetaBytes) return bad(absl::StrCat("extended header of ", member_size, " bytes"));
      std::string data(member_size, '\0');
      if (absl::Status st = read_at(data_at, member_size, data.data()); !st.ok()) return bad(std::string(st.message()));
      if (type == 'L') {
        next_path = Field(data.data(), data.size());
      } else if (type == 'x') {
        ParsePax(data, &next_path, &next_size, &next_has_size);
      }
    } else {
      if (type == '0' || type == '\0' || type == '7') {
        std::string path = next_path;
        if (path.empty()) {
          const std::string prefix = std::memcmp(h + 257, "ustar", 5) == 0 ? Field(h + 345, 155) : "";
          const std::string base = Field(h, 100);
          path = prefix.empty() ? base : absl::StrCat(prefix, "/", base);
        }
        if (path.empty()) return bad("member without a name");
        members.push_back({std::move(path), data_at, member_size});
      }
      next_path.clear();
      next_has_size = false;
    }
    pos = data_at + Padded(member_size);
  }
  if (pos < size) return bad(absl::StrCat("truncated header (", size - pos, " bytes left)"));
  return members;  // no end-of-archive blocks: accepted, as GNU tar does with a warning
}

absl::Status PreadExactly(int fd, uint64_t offset, size_t n, char* out, const std::string& what) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      return absl::DataLossError(
          absl::StrCat("reading ", what, ": ", r == 0 ? "unexpected end of file" : std::strerror(errno)));
    }
    done += static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<TarMember>> IndexTarFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("opening tar archive '", path, "': ", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("stat '", path, "': ", std::strerror(errno)));
  }
  auto read_at = [&](uint64_t off, size_t n, char* out) { return PreadExactly(fd, off, n, out, path); };
  auto members = IndexTar(read_at, static_cast<uint64_t>(st.st_size), path);
  ::close(fd);
  return members;
}

TarWriter::~TarWriter() {
  if (f_ != nullptr) {
    std::fclose(f_);
    ::unlink(tmp_.c_str());
  }
}

absl::StatusOr<std::unique_ptr<TarWriter>> TarWriter::Create(const std::string& path) {
  auto w = std::unique_ptr<TarWriter>(new TarWriter());
  w->path_ = path;
  w->tmp_ = path + ".tmp";
  w->f_ = std::fopen(w->tmp_.c_str(), "wb");
  if (w->f_ == nullptr) {
    return absl::PermissionDeniedError(absl::StrCat("creating '", w->tmp_, "': ", std::strerror(errno)));
  }
  return w;
}

absl::Status TarWriter::Write(const char* p, size_t n) {
  if (std::fwrite(p, 1, n, f_) != n) return absl::InternalError(absl::StrCat("writing '", tmp_, "': ", std::strerror(errno)));
  bytes_ += n;
  return absl::OkStatus();
}

namespace {

void PutOctal(char* field, size_t len, uint64_t v) {
  // len - 1 digits and a NUL.
  std::snprintf(field, len, "%0*llo", static_cast<int>(len - 1), static_cast<unsigned long long>(v));
}

void MakeHeader(char* h, const std::string& name, const std::string& prefix, uint64_t size, char type) {
  std::memset(h, 0, kBlock);
  std::memcpy(h, name.data(), std::min<size_t>(name.size(), 100));
  PutOctal(h + 100, 8, 0644);
  PutOctal(h + 108, 8, 0);
  PutOctal(h + 116, 8, 0);
  PutOctal(h + 124, 12, size);
  PutOctal(h + 136, 12, 0);
  h[156] = type;
  std::memcpy(h + 257, "ustar", 6);
  std::memcpy(h + 263, "00", 2);
  std::memcpy(h + 345, prefix.data(), std::min<size_t>(prefix.size(), 155));
  std::memset(h + 148, ' ', 8);
  unsigned sum = 0;
  for (size_t i = 0; i < kBlock; ++i) sum += static_cast<unsigned char>(h[i]);
  std::snprintf(h + 148, 8, "%06o", sum);
  h[155] = ' ';
}

}  // namespace

absl::Status TarWriter::Add(const std::string& name, std::string_view data) {
  if (f_ == nullptr) return absl::FailedPreconditionError(absl::StrCat("'", path_, "' is already finished"));
  if (name.empty()) return absl::InvalidArgumentError("tar member without a name");
  char h[kBlock];
  std::string base = name, prefix;
  if (name.size() > 100) {
    // ustar: prefix (<= 155) + '/' + name (<= 100); otherwise a pax record carries the path.
    const size_t cut = name.rfind('/', 155);
    if (cut != std::string::npos && cut > 0 && name.size() - cut - 1 <= 100 && name.size() - cut - 1 > 0) {
      prefix = name.substr(0, cut);
      base = name.substr(cut + 1);
    } else {
      std::string rec = absl::StrCat(" path=", name, "\n");
      size_t len = rec.size();
      while (std::to_string(len).size() + rec.size() != len) len = std::to_string(len).size() + rec.size();
      rec = absl::StrCat(len, rec);
      MakeHeader(h, "PaxHeader", "", rec.size(), 'x');
      if (absl::Status st = Write(h, kBlock); !st.ok()) return st;
      if (absl::Status st = Write(rec.data(), rec.size()); !st.ok()) return st;
      const char zeros[kBlock] = {};
      if (absl::Status st = Write(zeros, Padded(rec.size()) - rec.size()); !st.ok()) return st;
      base = name.substr(0, 100);
    }
  }
  MakeHeader(h, base, prefix, data.size(), '0');
  if (absl::Status st = Write(h, kBlock); !st.ok()) return st;
  if (absl::Status st = Write(data.data(), data.size()); !st.ok()) return st;
  const char zeros[kBlock] = {};
  return Write(zeros, Padded(data.size()) - data.size());
}

absl::Status TarWriter::Finish() {
  if (f_ == nullptr) return absl::FailedPreconditionError(absl::StrCat("'", path_, "' is already finished"));
  const char zeros[2 * kBlock] = {};
  if (absl::Status st = Write(zeros, sizeof zeros); !st.ok()) return st;
  const bool ok = std::fflush(f_) == 0 && ::fsync(::fileno(f_)) == 0;
  const int err = errno;
  std::fclose(f_);
  f_ = nullptr;
  if (!ok || ::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string msg = std::strerror(ok ? errno : err);
    ::unlink(tmp_.c_str());
    return absl::InternalError(absl::StrCat("finishing '", path_, "': ", msg));
  }
  return absl::OkStatus();
}

}  // namespace lmsgd::data
