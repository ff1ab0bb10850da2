#include "common/file_util.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "absl/strings/match.h"

namespace lmsgd {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/lmsgd_file_util_XXXXXX";
  return mkdtemp(tmpl);
}

TEST(FileUtilTest, AtomicWriteReplacesAndLeavesNoTemp) {
  const std::string dir = TempDir();
  const std::string path = dir + "/f";
  ASSERT_TRUE(WriteFileAtomically(path, "one").ok());
  ASSERT_TRUE(WriteFileAtomically(path, "two").ok());
  EXPECT_EQ(*ReadFileToString(path), "two");
  auto files = ListFiles(dir);
  ASSERT_TRUE(files.ok());
  EXPECT_EQ(*files, std::vector<std::string>{"f"});
}

TEST(FileUtilTest, WriteIntoMissingDirectoryNamesPath) {
  auto st = WriteFileAtomically("/nonexistent_dir_xyz/f", "x");
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(absl::StrContains(st.message(), "/nonexistent_dir_xyz/f")) << st;
}

TEST(FileUtilTest, RecordRoundTripAndCorruptionDetected) {
  const std::string dir = TempDir();
  const std::string path = dir + "/r";
  std::string payload(1000, 'x');
  payload[500] = '\0';
  ASSERT_TRUE(WriteRecordFile(path, payload).ok());
  EXPECT_EQ(*ReadRecordFile(path), payload);

  std::string raw = *ReadFileToString(path);
  // One flipped byte in the payload.
  std::string flipped = raw;
  flipped[raw.size() - 10] ^= 0x40;
  ASSERT_TRUE(WriteFileAtomically(path, flipped).ok());
  auto r = ReadRecordFile(path);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "checksum")) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), path)) << r.status();
  // Truncated.
  ASSERT_TRUE(WriteFileAtomically(path, raw.substr(0, raw.size() - 1)).ok());
  EXPECT_TRUE(absl::StrContains(ReadRecordFile(path).status().message(), "truncated"));
  // Not a record at all.
  ASSERT_TRUE(WriteFileAtomically(path, "hello").ok());
  EXPECT_EQ(ReadRecordFile(path).status().code(), absl::StatusCode::kDataLoss);
}

TEST(FileUtilTest, MakeDirsNested) {
  const std::string dir = TempDir() + "/a/b/c";
  ASSERT_TRUE(MakeDirs(dir).ok());
  ASSERT_TRUE(MakeDirs(dir).ok());
  EXPECT_TRUE(WriteFileAtomically(dir + "/x", "1").ok());
}

}  // namespace
}  // namespace lmsgd
