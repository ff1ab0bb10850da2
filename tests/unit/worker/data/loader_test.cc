// Datasets, augmentation and the batch loader on real files (IDX, JPEG written here).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <thread>

#include "common/file_util.h"
#include "tests/unit/worker/test_data.h"
#include "worker/data/dataset.h"
#include "worker/data/image_folder.h"
#include "worker/data/loader.h"
#include "worker/data/sampler.h"

namespace lmsgd::data {
namespace {

TEST(IdxImageDatasetTest, NormalizedLabelledAndAugmentedDeterministically) {
  const std::string dir = testing::MakeTempDir("idxds");
  testing::WriteBarsIdx(dir, 64, 16, 12, 4);
  auto train = IdxImageDataset::Load(dir, true, 4);
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ((*train)->size(), 64u);
  EXPECT_EQ((*train)->height(), 12);
  // Evaluation transform over the training set: mean 0, std 1 (train statistics).
  double sum = 0, sq = 0;
  std::vector<float> x(144);
  int32_t label = -1;
  for (uint64_t i = 0; i < 64; ++i) {
    ASSERT_TRUE((*train)->Get(i, false, 0, x.data(), &label).ok());
    EXPECT_EQ(label, static_cast<int32_t>((i * 7 + 1) % 4));
    for (float v : x) {
      sum += v;
      sq += v * v;
    }
  }
  const double n = 64.0 * 144;
  EXPECT_NEAR(sum / n, 0.0, 1e-4);
  EXPECT_NEAR(sq / n, 1.0, 1e-3);
  // Training augmentation: a function of the seed only.
  std::vector<float> a(144), b(144), c(144);
  ASSERT_TRUE((*train)->Get(5, true, 42, a.data(), &label).ok());
  ASSERT_TRUE((*train)->Get(5, true, 42, b.data(), &label).ok());
  EXPECT_EQ(a, b);
  bool differs = false;
  for (uint64_t seed = 0; seed < 8 && !differs; ++seed) {
    ASSERT_TRUE((*train)->Get(5, true, seed, c.data(), &label).ok());
    differs = c != a;
  }
  EXPECT_TRUE(differs);
  EXPECT_FALSE((*train)->Get(64, false, 0, x.data(), &label).ok());
  auto test = IdxImageDataset::Load(dir, false, 4);
  ASSERT_TRUE(test.ok());
  EXPECT_EQ((*test)->size(), 16u);
  EXPECT_FLOAT_EQ((*test)->mean(), (*train)->mean());  // test normalized with train statistics
}

TEST(BatchLoaderTest, SameBatchesWhateverTheThreadCountInOrderThenOutOfRange) {
  SyntheticDataset ds(50, 1, 4, 4, 3);
  std::vector<uint64_t> idx = ShardForRank(50, 9, 2, 0, 1);
  auto collect = [&](int threads, int prefetch) {
    LoaderOptions o;
    o.batch = 8;
    o.threads = threads;
    o.prefetch = prefetch;
    o.seed = 9;
    o.epoch = 2;
    BatchLoader loader(&ds, idx, o);
    EXPECT_EQ(loader.num_batches(), 6u);  // 50 / 8, the rest dropped
    std::vector<std::unique_ptr<Batch>> out;
    for (uint64_t b = 0; b < loader.num_batches(); ++b) {
      auto next = loader.Next(absl::Seconds(30));
      EXPECT_TRUE(next.ok()) << next.status();
      EXPECT_EQ((*next)->number, b);
      out.push_back(std::move(*next));
    }
    EXPECT_EQ(loader.Next(absl::Seconds(1)).status().code(), absl::StatusCode::kOutOfRange);
    return out;
  };
  auto one = collect(1, 1), many = collect(4, 3);
  ASSERT_EQ(one.size(), many.size());
  for (size_t b = 0; b < one.size(); ++b) {
    EXPECT_EQ(one[b]->images, many[b]->images);
    EXPECT_EQ(one[b]->labels, many[b]->labels);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(one[b]->labels[i], static_cast<int32_t>(idx[b * 8 + i] % 3));
  }
}

TEST(BatchLoaderTest, ResumesMidEpochAndPadsTheLastEvaluationBatch) {
  SyntheticDataset ds(20, 1, 2, 2, 5);
  std::vector<uint64_t> idx(20);
  for (uint64_t i = 0; i < 20; ++i) idx[i] = i;
  LoaderOptions o;
  o.batch = 6;
  o.first_batch = 2;
  BatchLoader resumed(&ds, idx, o);
  auto b = resumed.Next(absl::Seconds(10));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->number, 2u);
  EXPECT_EQ((*b)->labels[0], 12 % 5);
  o.first_batch = 0;
  o.pad_last = true;
  BatchLoader eval(&ds, idx, o);
  EXPECT_EQ(eval.num_batches(), 4u);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(eval.Next(absl::Seconds(10)).ok());
  auto last = eval.Next(absl::Seconds(10));
  ASSERT_TRUE(last.ok());
  EXPECT_EQ((*last)->valid, 2);
  EXPECT_EQ((*last)->labels[0], 18 % 5);
  EXPECT_EQ((*last)->labels[1], 19 % 5);
}

// A dataset whose examples take a while: the loader's deadline and shutdown.
class SlowDataset final : public Dataset {
 public:
  uint64_t size() const override { return 100; }
  int channels() const override { return 1; }
  int height() const override { return 1; }
  int width() const override { return 1; }
  int num_classes() const override { return 2; }
  absl::Status Get(uint64_t i, bool, uint64_t, float* out, int32_t* label) const override {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    *out = 0;
    *label = static_cast<int32_t>(i % 2);
    return absl::OkStatus();
  }
  std::string Describe(uint64_t i) const override { return "slow#" + std::to_string(i); }
};

TEST(BatchLoaderTest, NextHasADeadlineAndShutdownIsPrompt) {
  SlowDataset ds;
  std::vector<uint64_t> idx(100);
  for (uint64_t i = 0; i < 100; ++i) idx[i] = i;
  LoaderOptions o;
  o.batch = 10;  // 1.5 s per batch
  o.threads = 2;
  const auto start = std::chrono::steady_clock::now();
  {
    BatchLoader loader(&ds, idx, o);
    auto next = loader.Next(absl::Milliseconds(100));
    ASSERT_EQ(next.status().code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_NE(next.status().message().find("batch 0"), std::string::npos) << next.status();
  }
  // The destructor waited at most for the batches in flight (1.5 s), not the whole epoch.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

class ImageFolderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = testing::MakeTempDir("imgfolder");
    namespace fs = std::filesystem;
    for (const char* c : {"zebra", "ant", "cat"}) fs::create_directories(root_ + "/" + c);
    ASSERT_TRUE(WriteFileAtomically(root_ + "/ant/b.jpg", testing::MakeJpeg(300, 200, 255, 0, 0)).ok());
    ASSERT_TRUE(WriteFileAtomically(root_ + "/ant/a.JPEG", testing::MakeJpeg(64, 96, 0, 255, 0, true)).ok());
    ASSERT_TRUE(WriteFileAtomically(root_ + "/cat/c.jpg", testing::MakeJpeg(40, 40, 0, 0, 255)).ok());
    ASSERT_TRUE(WriteFileAtomically(root_ + "/cat/notes.txt", "not an image").ok());
    const std::string good = testing::MakeJpeg(120, 80, 10, 20, 30, true);
    ASSERT_TRUE(WriteFileAtomically(root_ + "/zebra/truncated.jpg", good.substr(0, good.size() / 2)).ok());
    ASSERT_TRUE(WriteFileAtomically(root_ + "/zebra/garbage.jpg", std::string(500, 'x')).ok());
    ASSERT_TRUE(WriteFileAtomically(root_ + "/zebra/ok.jpg", good).ok());
  }
  std::string root_;
};

TEST_F(ImageFolderTest, ClassesSortedFilesListedTransformsNormalize) {
  auto ds = ImageFolderDataset::Open(root_, 32);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ((*ds)->classes(), (std::vector<std::string>{"ant", "cat", "zebra"}));
  ASSERT_EQ((*ds)->size(), 6u);  // .txt ignored
  EXPECT_NE((*ds)->Describe(0).find("ant/a.JPEG"), std::string::npos);
  std::vector<float> x(3 * 32 * 32);
  int32_t label = -1;
  // Solid red, evaluation transform: every pixel is exactly red, normalized.
  ASSERT_TRUE((*ds)->Get(1, false, 0, x.data(), &label).ok());
  EXPECT_EQ(label, 0);
  const float red[3] = {(1 - 0.485f) / 0.229f, (0 - 0.456f) / 0.224f, (0 - 0.406f) / 0.225f};
  for (int c = 0; c < 3; ++c) {
    for (int i = 0; i < 32 * 32; ++i) ASSERT_NEAR(x[c * 1024 + i], red[c], 0.03f) << c << "," << i;
  }
  // Training transform: deterministic in the seed, different seeds give different crops.
  std::vector<float> a(x.size()), b(x.size());
  ASSERT_TRUE((*ds)->Get(0, true, 7, a.data(), &label).ok());
  ASSERT_TRUE((*ds)->Get(0, true, 7, b.data(), &label).ok());
  EXPECT_EQ(a, b);
  bool differs = false;
  for (uint64_t s = 0; s < 6 && !differs; ++s) {
    ASSERT_TRUE((*ds)->Get(0, true, s, b.data(), &label).ok());
    differs = a != b;
  }
  EXPECT_TRUE(differs);
  for (float v : a) ASSERT_TRUE(std::isfinite(v));
  // A validation folder uses the training class list.
  auto val = ImageFolderDataset::Open(root_, 32, {"ant", "cat", "dog", "zebra"});
  ASSERT_TRUE(val.ok());
  ASSERT_TRUE((*val)->Get(4, false, 0, x.data(), &label).ok());  // zebra/ok.jpg
  EXPECT_EQ(label, 3);
}

TEST_F(ImageFolderTest, CorruptFilesAreErrorsNamingTheFileOrSkippedAndCounted) {
  auto ds = ImageFolderDataset::Open(root_, 16);
  ASSERT_TRUE(ds.ok());
  std::vector<float> x(3 * 16 * 16);
  int32_t label;
  // Sorted: zebra/garbage.jpg (3), zebra/ok.jpg (4), zebra/truncated.jpg (5).
  auto garbage = (*ds)->Get(3, false, 0, x.data(), &label);
  EXPECT_EQ(garbage.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(garbage.message().find("zebra/garbage.jpg"), std::string::npos) << garbage;
  auto truncated = (*ds)->Get(5, true, 1, x.data(), &label);
  EXPECT_EQ(truncated.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(truncated.message().find("zebra/truncated.jpg"), std::string::npos) << truncated;

  std::vector<uint64_t> idx = {0, 1, 2, 3, 4, 5};
  LoaderOptions o;
  o.batch = 3;
  BatchLoader strict(ds->get(), idx, o);
  ASSERT_TRUE(strict.Next(absl::Seconds(30)).ok());
  auto bad = strict.Next(absl::Seconds(30));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("zebra/garbage.jpg"), std::string::npos) << bad.status();

  o.skip_corrupt = true;
  BatchLoader lenient(ds->get(), idx, o);
  ASSERT_TRUE(lenient.Next(absl::Seconds(30)).ok());
  auto filled = lenient.Next(absl::Seconds(30));
  ASSERT_TRUE(filled.ok()) << filled.status();
  EXPECT_EQ(lenient.skipped(), 2);  // garbage -> replaced by ok.jpg; truncated -> replaced by the next good one
  for (int32_t l : (*filled)->labels) EXPECT_GE(l, 0);
}

TEST(ImageTransformTest, IdentityCropReproducesPixelsAndFlipMirrors) {
  const int s = 4;
  std::vector<uint8_t> rgb(s * s * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 5);
  std::vector<float> out(3 * s * s), flipped(3 * s * s);
  const CropBox box{0, 0, s, s, true};
  ResizeCrop(rgb.data(), s, s, s * 3, box, s, s, false, PixelFormat::kFloatChw, out.data());
  ResizeCrop(rgb.data(), s, s, s * 3, box, s, s, true, PixelFormat::kFloatChw, flipped.data());
  const float mean[3] = {0.485f, 0.456f, 0.406f}, stdv[3] = {0.229f, 0.224f, 0.225f};
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < s; ++y) {
      for (int x = 0; x < s; ++x) {
        const float want = (rgb[(y * s + x) * 3 + c] / 255.0f - mean[c]) / stdv[c];
        EXPECT_NEAR(out[c * s * s + y * s + x], want, 1e-5);
        EXPECT_NEAR(flipped[c * s * s + y * s + (s - 1 - x)], want, 1e-5);
      }
    }
  }
}

}  // namespace
}  // namespace lmsgd::data
