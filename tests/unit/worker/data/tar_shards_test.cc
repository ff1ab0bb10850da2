// Tar shards: the index against GNU tar (both directions), ImageFolder -> shards -> ImageFolder
// round trips, epoch sharding over the shards, and damaged shards named.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "tests/unit/worker/test_data.h"
#include "worker/data/image_folder.h"
#include "worker/data/loader.h"
#include "worker/data/photo_generator.h"
#include "worker/data/sampler.h"
#include "worker/data/tar.h"
#include "worker/data/tar_shards.h"

namespace lmsgd::data {
namespace {

namespace fs = std::filesystem;

std::map<std::string, std::string> ReadTree(const std::string& root) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    if (!e.is_regular_file()) continue;
    auto b = ReadFileToString(e.path().string());
    EXPECT_TRUE(b.ok());
    files[fs::relative(e.path(), root).string()] = *b;
  }
  return files;
}

class TarShardsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("tar_shards");
    folder_ = dir_ + "/folder";
    PhotoFolderOptions o;
    o.classes = 3;
    o.per_class = 6;
    o.seed = 4;
    auto st = WritePhotoFolder(folder_, o);
    ASSERT_TRUE(st.ok()) << st.status();
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_, folder_;
};

TEST_F(TarShardsTest, PackThenReadGivesTheSameBytesAndLabelsAndUnpackRestoresTheFolder) {
  PackOptions po;
  po.shard_bytes = 400 * 1000;  // several shards
  auto stats = PackImageFolder(folder_, dir_ + "/shards", po);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->examples, 18u);
  EXPECT_GE(stats->shards, 3u);
  auto folder = ImageFolderDataset::Open(folder_, 224);
  ASSERT_TRUE(folder.ok());
  auto shards = TarShardDataset::Open(dir_ + "/shards", 224);
  ASSERT_TRUE(shards.ok()) << shards.status();
  EXPECT_EQ((*shards)->shards().size(), stats->shards);
  EXPECT_EQ((*shards)->classes(), (*folder)->classes()) << "classes.txt keeps the names";
  ASSERT_EQ((*shards)->size(), (*folder)->size());
  // Every folder image is in the shards once, with its label and its exact bytes.
  std::map<std::string, std::pair<std::string, int32_t>> by_key;
  for (uint64_t i = 0; i < (*shards)->size(); ++i) {
    std::string bytes, key;
    int32_t label = -1;
    ASSERT_TRUE((*shards)->ReadExample(i, &bytes, &key, &label).ok());
    EXPECT_TRUE(by_key.emplace(key, std::make_pair(bytes, label)).second) << "duplicate " << key;
  }
  for (uint64_t i = 0; i < (*folder)->size(); ++i) {
    const fs::path p((*folder)->Describe(i));
    const std::string key = p.parent_path().filename().string() + "/" + p.stem().string();
    ASSERT_TRUE(by_key.count(key)) << key;
    EXPECT_EQ(by_key[key].first, *ReadFileToString(p.string())) << key;
    EXPECT_EQ(by_key[key].second, (*folder)->label(i)) << key;
  }
  // Members are shuffled, so a sequential reader sees mixed classes in the first shard.
  std::set<int32_t> first_shard_labels;
  for (uint64_t i = 0; i < 4; ++i) {
    std::string b, k;
    int32_t l;
    ASSERT_TRUE((*shards)->ReadExample(i, &b, &k, &l).ok());
    first_shard_labels.insert(l);
  }
  EXPECT_GT(first_shard_labels.size(), 1u);
  // The same transform output as the folder's for the same example and seed.
  std::vector<float> a(3 * 64 * 64), b(3 * 64 * 64);
  auto small_folder = ImageFolderDataset::Open(folder_, 64);
  auto small_shards = TarShardDataset::Open(dir_ + "/shards", 64);
  ASSERT_TRUE(small_shards.ok());
  std::string bytes0, key0;
  int32_t l0 = 0, la = 0, lb = 0;
  ASSERT_TRUE((*small_shards)->ReadExample(0, &bytes0, &key0, &l0).ok());
  uint64_t fi = 0;
  while (fs::path((*small_folder)->Describe(fi)).stem().string() != fs::path(key0).filename().string()) ++fi;
  ASSERT_TRUE((*small_shards)->Get(0, true, 77, a.data(), &la).ok());
  ASSERT_TRUE((*small_folder)->Get(fi, true, 77, b.data(), &lb).ok());
  EXPECT_EQ(a, b);
  EXPECT_EQ(la, lb);

  // And back.
  auto n = UnpackShards(dir_ + "/shards", dir_ + "/unpacked");
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 18u);
  EXPECT_EQ(ReadTree(dir_ + "/unpacked"), ReadTree(folder_));
}

TEST_F(TarShardsTest, OurArchivesAreReadByGnuTarAndGnuTarsByOurIndex) {
  if (std::system("tar --version > /dev/null 2>&1") != 0) GTEST_SKIP() << "no tar command on this machine";
  // Names beyond ustar's 100 bytes exercise the prefix field and pax records both ways.
  const std::string long_dir(120, 'd'), long_name(130, 'n');
  auto w = TarWriter::Create(dir_ + "/ours.tar");
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Add("a/short.txt", "hello").ok());
  ASSERT_TRUE((*w)->Add(long_dir + "/x.cls", "7").ok());
  ASSERT_TRUE((*w)->Add(long_name + ".jpg", std::string(1000, 'z')).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  ASSERT_EQ(std::system(("tar -tf " + dir_ + "/ours.tar > " + dir_ + "/list.txt").c_str()), 0);
  const std::string listed = *ReadFileToString(dir_ + "/list.txt");
  EXPECT_EQ(listed, "a/short.txt\n" + long_dir + "/x.cls\n" + long_name + ".jpg\n");
  ASSERT_EQ(std::system(("mkdir -p " + dir_ + "/x && tar -xf " + dir_ + "/ours.tar -C " + dir_ + "/x").c_str()), 0);
  EXPECT_EQ(*ReadFileToString(dir_ + "/x/" + long_name + ".jpg"), std::string(1000, 'z'));

  // GNU tar's own archive (GNU long names, a directory entry) through our index.
  ASSERT_EQ(std::system(("cd " + dir_ + "/x && tar --format=gnu -cf ../gnu.tar a " + long_dir + " " + long_name +
                         ".jpg")
                            .c_str()),
            0);
  auto members = IndexTarFile(dir_ + "/gnu.tar");
  ASSERT_TRUE(members.ok()) << members.status();
  std::map<std::string, uint64_t> sizes;
  for (const auto& m : *members) sizes[m.name] = m.size;
  EXPECT_EQ(sizes, (std::map<std::string, uint64_t>{
                       {"a/short.txt", 5}, {long_dir + "/x.cls", 1}, {long_name + ".jpg", 1000}}));
  ASSERT_EQ(std::system(("cd " + dir_ + "/x && tar --format=pax -cf ../pax.tar " + long_name + ".jpg").c_str()), 0);
  auto pax = IndexTarFile(dir_ + "/pax.tar");
  ASSERT_TRUE(pax.ok()) << pax.status();
  ASSERT_EQ(pax->size(), 1u);
  EXPECT_EQ((*pax)[0].name, long_name + ".jpg");
}

TEST_F(TarShardsTest, EpochShardsAcrossRanksCoverEveryExampleOnce) {
  PackOptions po;
  po.shard_bytes = 300 * 1000;
  ASSERT_TRUE(PackImageFolder(folder_, dir_ + "/shards", po).ok());
  auto ds = TarShardDataset::Open(dir_ + "/shards", 32);
  ASSERT_TRUE(ds.ok());
  const uint64_t n = (*ds)->size();  // 18 = 3 ranks x 6
  for (uint64_t epoch = 0; epoch < 3; ++epoch) {
    std::multiset<std::string> seen;
    for (uint32_t rank = 0; rank < 3; ++rank) {
      LoaderOptions lo;
      lo.batch = 2;
      lo.epoch = epoch;
      lo.seed = 9;
      lo.threads = 2;
      BatchLoader loader(ds->get(), ShardForRank(n, 9, epoch, rank, 3), lo);
      EXPECT_EQ(loader.num_batches(), 3u);
      for (uint64_t b = 0; b < loader.num_batches(); ++b) {
        ASSERT_TRUE(loader.Next(absl::Seconds(60)).ok());
      }
      for (uint64_t i : ShardForRank(n, 9, epoch, rank, 3)) seen.insert((*ds)->Describe(i));
    }
    EXPECT_EQ(seen.size(), n);
    EXPECT_EQ(std::set<std::string>(seen.begin(), seen.end()).size(), n) << "epoch " << epoch;
  }
}

TEST_F(TarShardsTest, DamagedShardsAndMembersAreNamed) {
  PackOptions po;
  ASSERT_TRUE(PackImageFolder(folder_, dir_ + "/one", po).ok());
  const std::string shard = dir_ + "/one/shard-000000.tar";
  const std::string good = *ReadFileToString(shard);

  // Truncated in the middle of a member.
  ASSERT_TRUE(WriteFileAtomically(dir_ + "/cut.tar", good.substr(0, good.size() / 2)).ok());
  auto cut = TarShardDataset::Open(dir_ + "/cut.tar", 64);
  ASSERT_FALSE(cut.ok());
  EXPECT_NE(cut.status().message().find("cut.tar"), std::string::npos) << cut.status();
  EXPECT_NE(cut.status().message().find("truncated"), std::string::npos) << cut.status();

  // A damaged header (checksum).
  std::string flipped = good;
  flipped[600 + 512 * 3] ^= 0x5a;  // inside some later member's data or header
  flipped[10] ^= 0x01;             // the first header's name
  ASSERT_TRUE(WriteFileAtomically(dir_ + "/sum.tar", flipped).ok());
  auto sum = TarShardDataset::Open(dir_ + "/sum.tar", 64);
  ASSERT_FALSE(sum.ok());
  EXPECT_NE(sum.status().message().find("checksum"), std::string::npos) << sum.status();

  // A corrupt JPEG member: the example's error names shard and key; the loader can skip it.
  auto members = IndexTarFile(shard);
  ASSERT_TRUE(members.ok());
  const TarMember* jpg = nullptr;
  for (const auto& m : *members) {
    if (m.name.size() > 4 && m.name.substr(m.name.size() - 4) == ".jpg") {
      jpg = &m;
      break;
    }
  }
  ASSERT_NE(jpg, nullptr);
  std::string bad = good;
  for (uint64_t i = 0; i < 64; ++i) bad[jpg->offset + i] = 'x';  // no SOI any more
  ASSERT_TRUE(WriteFileAtomically(dir_ + "/bad.tar", bad).ok());
  auto ds = TarShardDataset::Open(dir_ + "/bad.tar", 64);
  ASSERT_TRUE(ds.ok()) << ds.status();
  std::vector<float> out(3 * 64 * 64);
  int32_t label = 0;
  auto st = (*ds)->Get(0, true, 1, out.data(), &label);
  ASSERT_FALSE(st.ok());
  const std::string key = jpg->name.substr(0, jpg->name.size() - 4);
  EXPECT_NE(st.message().find("bad.tar:" + key + ".jpg"), std::string::npos) << st;
  LoaderOptions lo;
  lo.batch = 4;
  lo.skip_corrupt = true;
  BatchLoader loader(ds->get(), {0, 1, 2, 3, 4, 5, 6, 7}, lo);
  ASSERT_TRUE(loader.Next(absl::Seconds(60)).ok());
  EXPECT_EQ(loader.skipped(), 1);

  // Members without their pair, and a label that is not a number.
  auto w = TarWriter::Create(dir_ + "/pairs.tar");
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Add("k/lonely.jpg", good.substr(jpg->offset, jpg->size)).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto lonely = TarShardDataset::Open(dir_ + "/pairs.tar", 64);
  ASSERT_FALSE(lonely.ok());
  EXPECT_NE(lonely.status().message().find("'k/lonely' has no .cls"), std::string::npos) << lonely.status();
  auto w2 = TarWriter::Create(dir_ + "/label.tar");
  ASSERT_TRUE(w2.ok());
  ASSERT_TRUE((*w2)->Add("k/a.jpg", good.substr(jpg->offset, jpg->size)).ok());
  ASSERT_TRUE((*w2)->Add("k/a.cls", "cat").ok());
  ASSERT_TRUE((*w2)->Finish().ok());
  auto label_bad = TarShardDataset::Open(dir_ + "/label.tar", 64);
  ASSERT_FALSE(label_bad.ok());
  EXPECT_NE(label_bad.status().message().find("k/a.cls"), std::string::npos) << label_bad.status();
  // Not a tar at all, and a missing shard.
  ASSERT_TRUE(WriteFileAtomically(dir_ + "/junk.tar", std::string(2048, 'j')).ok());
  EXPECT_FALSE(TarShardDataset::Open(dir_ + "/junk.tar", 64).ok());
  auto missing = TarShardDataset::Open(dir_ + "/nope.tar", 64);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope.tar"), std::string::npos);
}

}  // namespace
}  // namespace lmsgd::data
