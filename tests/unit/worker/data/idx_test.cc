#include "worker/data/idx.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <zlib.h>

#include "absl/strings/match.h"
#include "common/file_util.h"

namespace lmsgd::data {
namespace {

std::string IdxBytes(std::vector<uint32_t> dims, const std::vector<uint8_t>& data) {
  std::string b = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (uint32_t d : dims) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<char>((d >> s) & 0xff));
  }
  b.append(data.begin(), data.end());
  return b;
}

void WriteGz(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  gzclose(f);
}

std::string TempDir() {
  char t[] = "/tmp/lmsgd_idx_XXXXXX";
  return mkdtemp(t);
}

TEST(IdxTest, RawAndGzipDatasets) {
  const std::string dir = TempDir();
  std::vector<uint8_t> pixels(3 * 2 * 2);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 10);
  ASSERT_TRUE(WriteFileAtomically(dir + "/train-images-idx3-ubyte", IdxBytes({3, 2, 2}, pixels)).ok());
  WriteGz(dir + "/train-labels-idx1-ubyte.gz", IdxBytes({3}, {2, 0, 1}));
  auto ds = LoadIdxDataset(dir, "train", 10);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->count, 3u);
  EXPECT_EQ(ds->rows, 2u);
  EXPECT_EQ(ds->images[5], 50);
  EXPECT_EQ(ds->labels, (std::vector<uint8_t>{2, 0, 1}));
  // Label out of range for 2 classes.
  auto bad_labels = LoadIdxDataset(dir, "train", 2);
  EXPECT_TRUE(absl::StrContains(bad_labels.status().message(), "label 2 at index 0")) << bad_labels.status();
  EXPECT_EQ(LoadIdxDataset(dir, "t10k", 10).status().code(), absl::StatusCode::kNotFound);
}

TEST(IdxTest, CorruptFilesNamedAndRejected) {
  const std::string dir = TempDir();
  const std::string good = IdxBytes({4}, {1, 2, 3, 4});
  struct Case {
    std::string name, bytes, expect;
  } cases[] = {
      {"truncated", good.substr(0, good.size() - 1), "truncated or corrupt"},
      {"padded", good + "x", "truncated or corrupt"},
      {"magic", "\x01" + good.substr(1), "bad magic"},
      {"type", std::string("\0\0\x0d\x01", 4) + good.substr(4), "element type"},
      {"short", std::string("\0\0", 2), "too short"},
      {"header", std::string("\0\0\x08\x03\0\0", 6), "inside its header"},
  };
  for (const auto& c : cases) {
    const std::string path = dir + "/" + c.name;
    ASSERT_TRUE(WriteFileAtomically(path, c.bytes).ok());
    auto r = ReadIdxFile(path);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_TRUE(absl::StrContains(r.status().message(), path)) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), c.expect)) << c.name << ": " << r.status();
  }
  // A gzip stream cut short.
  WriteGz(dir + "/whole.gz", IdxBytes({1000}, std::vector<uint8_t>(1000, 7)));
  std::string gz = *ReadFileToString(dir + "/whole.gz");
  ASSERT_TRUE(WriteFileAtomically(dir + "/cut.gz", gz.substr(0, gz.size() / 2)).ok());
  auto cut = ReadIdxFile(dir + "/cut.gz");
  ASSERT_FALSE(cut.ok());
  EXPECT_TRUE(absl::StrContains(cut.status().message(), "cut.gz")) << cut.status();
}

TEST(IdxTest, DebianFashionMnist) {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (::access((dir + "/train-images-idx3-ubyte.gz").c_str(), R_OK) != 0) {
    GTEST_SKIP() << "dataset-fashion-mnist not installed (deploy/setup.sh installs it)";
  }
  auto train = LoadIdxDataset(dir, "train", 10);
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(train->count, 60000u);
  EXPECT_EQ(train->rows, 28u);
  EXPECT_EQ(train->cols, 28u);
  std::vector<int> per_class(10);
  for (uint8_t l : train->labels) per_class[l]++;
  for (int c : per_class) EXPECT_EQ(c, 6000);  // Fashion-MNIST is balanced
  auto test = LoadIdxDataset(dir, "t10k", 10);
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ(test->count, 10000u);
}

}  // namespace
}  // namespace lmsgd::data
