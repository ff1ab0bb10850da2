// safetensors files and checkpoints: round trips, torchvision names, corruption detected.
#include "worker/checkpoint/checkpoint.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <cstdlib>
#include <random>

#include "common/file_util.h"
#include "tests/unit/worker/test_data.h"
#include "worker/checkpoint/safetensors.h"

namespace lmsgd::checkpoint {
namespace {

SafetensorsFile Sample() {
  SafetensorsFile f;
  Tensor a;
  a.shape = {2, 3};
  a.f32 = {1, 2, 3, 4, 5, -6.5f};
  f.tensors["layer1.0.conv1.weight"] = a;
  Tensor n;
  n.dtype = DType::kI64;
  n.i64 = {12345678901};
  f.tensors["bn1.num_batches_tracked"] = n;  // shape [] (a scalar), like torch
  f.metadata["format"] = "pt";
  f.metadata["note"] = "quote \" and backslash \\";
  return f;
}

TEST(SafetensorsTest, RoundTripAlignedHeaderWithCrc) {
  const std::string bytes = SerializeSafetensors(Sample());
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 6 * 4 + 8);
  auto back = ParseSafetensors(bytes, "x.safetensors");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tensors.at("layer1.0.conv1.weight").f32, Sample().tensors.at("layer1.0.conv1.weight").f32);
  EXPECT_EQ(back->tensors.at("layer1.0.conv1.weight").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(back->tensors.at("bn1.num_batches_tracked").i64[0], 12345678901);
  EXPECT_TRUE(back->tensors.at("bn1.num_batches_tracked").shape.empty());
  EXPECT_EQ(back->metadata.at("note"), "quote \" and backslash \\");
  EXPECT_TRUE(back->metadata.count("lmsgd_crc32"));
}

TEST(SafetensorsTest, CorruptionIsAnErrorNamingTheFileNeverACrash) {
  const std::string good = SerializeSafetensors(Sample());
  std::string flipped = good;
  flipped[flipped.size() - 3] ^= 0x10;
  auto st = ParseSafetensors(flipped, "ckpt.safetensors");
  ASSERT_EQ(st.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.status().message().find("ckpt.safetensors"), std::string::npos);
  EXPECT_NE(st.status().message().find("CRC"), std::string::npos);
  EXPECT_FALSE(ParseSafetensors(good.substr(0, good.size() - 1), "t").ok());
  EXPECT_FALSE(ParseSafetensors("", "t").ok());
  EXPECT_FALSE(ParseSafetensors(std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10), "t").ok());
  // Random damage: always a Status, never a crash or an accepted file with changed data.
  std::mt19937 rng(3);
  for (int t = 0; t < 2000; ++t) {
    std::string b = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) b[rng() % b.size()] = static_cast<char>(rng());
    if (rng() % 3 == 0) b.resize(rng() % b.size());
    auto r = ParseSafetensors(b, "fuzz");
    if (r.ok() && r->tensors.count("layer1.0.conv1.weight")) {
      // Only header whitespace/metadata edits may still parse; the data must be intact.
      EXPECT_EQ(r->tensors.at("layer1.0.conv1.weight").f32, Sample().tensors.at("layer1.0.conv1.weight").f32);
    }
  }
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spec_ = *model::MakeResNet(model::Arch::kResNet8, 1, 10);
    dir_ = testing::MakeTempDir("ckpt") + "/run";
  }
  model::ResNetSpec spec_;
  std::string dir_;
};

TEST_F(CheckpointTest, SaveLoadRoundTripTorchvisionNamesRetentionAndCommitPoint) {
  model::ParamStore store(spec_);
  ASSERT_TRUE(store.Load(model::InitializeParameters(spec_, {4, true})).ok());
  store.buffers()[3] = 0.75f;
  store.set_num_batches_tracked(17);
  optim::Sgd sgd({}, store.OptimizerParams());
  std::vector<std::vector<float>> vel = sgd.velocity();
  for (size_t i = 0; i < vel.size(); ++i) std::fill(vel[i].begin(), vel[i].end(), 0.01f * static_cast<float>(i));
  ASSERT_TRUE(sgd.SetVelocity(vel).ok());
  EXPECT_EQ(LatestCheckpoint(dir_).status().code(), absl::StatusCode::kNotFound);
  TrainingState state{120, 3, "resnet8", 9, 64, 2, 0.025};
  std::string last;
  for (uint64_t it : {40, 80, 120}) {
    state.iteration = it;
    auto path = SaveCheckpoint(dir_, store, sgd, state, /*keep=*/2);
    ASSERT_TRUE(path.ok()) << path.status();
    last = *path;
  }
  auto latest = LatestCheckpoint(dir_);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, last);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/ckpt-0000000040.safetensors"));  // retention
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/ckpt-0000000080.optim.safetensors"));

  // Names: exactly torchvision's state_dict keys.
  auto file = ReadSafetensors(last);
  ASSERT_TRUE(file.ok());
  size_t expected = model::Parameters(spec_).size() + model::Buffers(spec_).size();
  EXPECT_EQ(file->tensors.size(), expected);
  for (const auto& b : model::Buffers(spec_)) EXPECT_TRUE(file->tensors.count(b.name)) << b.name;
  EXPECT_EQ(file->tensors.at("layer2.0.bn1.num_batches_tracked").i64[0], 17);

  model::ParamStore fresh(spec_);
  optim::Sgd fresh_sgd({}, fresh.OptimizerParams());
  auto loaded = LoadCheckpoint(last, "resnet8", &fresh, &fresh_sgd);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->iteration, 120u);
  EXPECT_EQ(loaded->epoch, 3u);
  EXPECT_EQ(loaded->global_batch, 64u);
  EXPECT_DOUBLE_EQ(loaded->lr, 0.025);
  EXPECT_EQ(fresh.params(), store.params());
  EXPECT_EQ(fresh.buffers(), store.buffers());
  EXPECT_EQ(fresh.num_batches_tracked(), 17);
  EXPECT_EQ(fresh_sgd.velocity(), sgd.velocity());
}

TEST_F(CheckpointTest, WrongModelOrDamagedFilesAreClearErrorsAndLeaveTheStoreUntouched) {
  model::ParamStore store(spec_);
  ASSERT_TRUE(store.Load(model::InitializeParameters(spec_, {4, true})).ok());
  optim::Sgd sgd({}, store.OptimizerParams());
  auto path = SaveCheckpoint(dir_, store, sgd, {10, 1, "resnet8", 1, 32, 1, 0.1});
  ASSERT_TRUE(path.ok());
  model::ParamStore other(spec_);
  const auto before = other.params();
  auto wrong = LoadCheckpoint(*path, "resnet20", &other, nullptr);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(wrong.status().message().find("holds a resnet8"), std::string::npos);
  // Damage the model file's data: CRC mismatch, nothing loaded.
  auto bytes = ReadFileToString(*path);
  ASSERT_TRUE(bytes.ok());
  (*bytes)[bytes->size() - 10] ^= 1;
  ASSERT_TRUE(WriteFileAtomically(*path, *bytes).ok());
  auto damaged = LoadCheckpoint(*path, "resnet8", &other, nullptr);
  EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(damaged.status().message().find(*path), std::string::npos) << damaged.status();
  EXPECT_EQ(other.params(), before);
  // A different architecture's file: shape mismatch named.
  auto spec20 = *model::MakeResNet(model::Arch::kResNet20, 1, 10);
  model::ParamStore s20(spec20);
  optim::Sgd sgd20({}, s20.OptimizerParams());
  auto p20 = SaveCheckpoint(dir_ + "20", s20, sgd20, {1, 0, "resnet8", 1, 32, 1, 0.1});
  ASSERT_TRUE(p20.ok());
  auto mismatch = LoadCheckpoint(*p20, "resnet8", &other, nullptr);
  EXPECT_FALSE(mismatch.ok());
  // LATEST pointing somewhere odd.
  ASSERT_TRUE(WriteFileAtomically(dir_ + "/LATEST", "../../etc/passwd\n").ok());
  EXPECT_EQ(LatestCheckpoint(dir_).status().code(), absl::StatusCode::kDataLoss);
}

TEST(CheckpointNamesTest, ResNet50FileHasTorchvisionsThreeHundredTwentyKeys) {
  auto spec = *model::MakeResNet(model::Arch::kResNet50, 3, 1000);
  // torchvision.models.resnet50().state_dict() has 320 entries: 161 parameters, 159 BN buffers.
  EXPECT_EQ(model::Parameters(spec).size() + model::Buffers(spec).size(), 320u);
}

// The interoperability promise: torchvision.models.resnet50().load_state_dict(file, strict=True)
// accepts our checkpoint. Needs Debian's python3-torch (deploy/setup.sh --with-baselines);
// skipped with a message where it is not installed.
TEST(CheckpointNamesTest, TorchvisionLoadsOurResNet50CheckpointStrictly) {
  const std::string script = std::string(LMSGD_SOURCE_DIR) + "/tests/bench/torchvision_load_check.py";
  if (std::system("/usr/bin/python3 -c 'import torch, torchvision' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "Debian python3-torch/python3-torchvision not installed (deploy/setup.sh --with-baselines)";
  }
  auto spec = *model::MakeResNet(model::Arch::kResNet50, 3, 1000);
  model::ParamStore store(spec);
  ASSERT_TRUE(store.Load(model::InitializeParameters(spec, {1, true})).ok());
  optim::Sgd sgd({}, store.OptimizerParams());
  const std::string dir = testing::MakeTempDir("tv");
  auto path = SaveCheckpoint(dir, store, sgd, {0, 0, "resnet50", 1, 256, 1, 0.1});
  ASSERT_TRUE(path.ok());
  const std::string out = dir + "/check.txt";
  const int rc = std::system(("/usr/bin/python3 " + script + " " + *path + " resnet50 > " + out + " 2>&1").c_str());
  auto text = ReadFileToString(out);
  ASSERT_TRUE(text.ok());
  ASSERT_EQ(rc, 0) << *text;
  EXPECT_NE(text->find("torchvision_load=ok keys=320 params=25557032"), std::string::npos) << *text;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lmsgd::checkpoint
