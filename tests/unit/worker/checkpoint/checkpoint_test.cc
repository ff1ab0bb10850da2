// safetensors files and checkpoints: round trips, torchvision names, corruption detected.
#include "worker/checkpoint/checkpoint.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <cstdlib>
#include <random>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
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

// Retention keeps the checkpoint the job's record points at whatever the saves after it, and
// orders by write time: after a re-formation at a larger kn the iterations restart lower, and
// the dead generation's higher-numbered files are the ones to go.
TEST_F(CheckpointTest, RetentionKeepsTheRecordedCheckpointAndOrdersByWriteTime) {
  model::ParamStore store(spec_);
  ASSERT_TRUE(store.Load(model::InitializeParameters(spec_, {4, true})).ok());
  optim::Sgd sgd({}, store.OptimizerParams());
  auto exists = [&](int it) {
    return std::filesystem::exists(absl::StrFormat("%s/ckpt-%010d.safetensors", dir_, it)) &&
           std::filesystem::exists(absl::StrFormat("%s/ckpt-%010d.optim.safetensors", dir_, it));
  };
  auto save = [&](uint64_t it, const std::set<std::string>& retain) {
    auto path = SaveCheckpoint(dir_, store, sgd, {it, 1, "resnet8", 1, 16, 2, 0.1}, /*keep=*/2, retain);
    ASSERT_TRUE(path.ok()) << path.status();
  };
  // The coordinator recorded 96; rank 0 of the old generation went on to 144, 192 and 240.
  save(96, {});
  const std::string recorded = absl::StrFormat("%s/ckpt-%010d.safetensors", dir_, 96);
  for (uint64_t it : {144, 192, 240}) save(it, {recorded});
  EXPECT_TRUE(exists(96)) << "the recorded checkpoint was removed";
  EXPECT_FALSE(exists(144));
  EXPECT_TRUE(exists(192));
  EXPECT_TRUE(exists(240));
  // Without the record, the same save removes it.
  save(288, {});
  EXPECT_FALSE(exists(96));
  EXPECT_FALSE(exists(192));
  // A new generation at kn 24 resumed from epoch 2 writes epoch 3 as iteration 96 and epoch 4
  // as 128: it keeps its own two, not the higher-numbered stale 240 and 288.
  absl::SleepFor(absl::Milliseconds(20));  // past the file system's timestamp granularity
  save(96, {});
  save(128, {});
  EXPECT_TRUE(exists(96));
  EXPECT_TRUE(exists(128));
  EXPECT_FALSE(exists(240));
  EXPECT_FALSE(exists(288));
  auto latest = LatestCheckpoint(dir_);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, absl::StrFormat("%s/ckpt-%010d.safetensors", dir_, 128));
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

// A safetensors file as other tools write it: no lmsgd metadata, no CRC, tensors in the order given.
std::string ForeignSafetensors(const std::vector<std::pair<std::string, Tensor>>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}", data;
  for (const auto& [name, t] : tensors) {
    const size_t begin = data.size();
    if (t.dtype == DType::kF32) {
      data.append(reinterpret_cast<const char*>(t.f32.data()), t.f32.size() * 4);
    } else {
      data.append(reinterpret_cast<const char*>(t.i64.data()), t.i64.size() * 8);
    }
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? "," : "") + std::to_string(t.shape[i]);
    header += ",\"" + name + "\":{\"dtype\":\"" + (t.dtype == DType::kF32 ? "F32" : "I64") + "\",\"shape\":[" +
              shape + "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(data.size()) + "]}";
  }
  header += "}";
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// The model's tensors under their torchvision names, as torch's state_dict orders them loosely.
std::vector<std::pair<std::string, Tensor>> StateDict(const model::ParamStore& store) {
  std::vector<std::pair<std::string, Tensor>> out;
  auto& ps = const_cast<model::ParamStore&>(store);
  for (size_t i = 0; i < store.num_params(); ++i) {
    Tensor t;
    t.shape = store.param_specs()[i].shape;
    t.f32.assign(ps.param(i), ps.param(i) + store.param_specs()[i].numel());
    out.emplace_back(store.param_specs()[i].name, t);
  }
  for (size_t i = 0; i < store.buffer_specs().size(); ++i) {
    Tensor t;
    t.shape = store.buffer_specs()[i].shape;
    t.f32.assign(ps.buffer(i), ps.buffer(i) + store.buffer_specs()[i].numel());
    out.emplace_back(store.buffer_specs()[i].name, t);
  }
  return out;
}

TEST_F(CheckpointTest, InitFromAForeignSafetensorsFileLoadsWeightsAndBuffers) {
  model::ParamStore src(spec_);
  ASSERT_TRUE(src.Load(model::InitializeParameters(spec_, {7, true})).ok());
  for (size_t i = 0; i < src.buffers().size(); ++i) src.buffers()[i] = 0.001f * static_cast<float>(i);
  auto tensors = StateDict(src);
  Tensor nbt;
  nbt.dtype = DType::kI64;
  nbt.i64 = {42};
  tensors.emplace_back("bn1.num_batches_tracked", nbt);
  const std::string path = testing::MakeTempDir("init") + "/tv.safetensors";
  ASSERT_TRUE(WriteFileAtomically(path, ForeignSafetensors(tensors)).ok());

  model::ParamStore dst(spec_);
  auto init = LoadInitCheckpoint(path, "resnet8", &dst, nullptr);
  ASSERT_TRUE(init.ok()) << init.status();
  EXPECT_FALSE(init->has_training_state);
  EXPECT_EQ(dst.params(), src.params());
  EXPECT_EQ(dst.buffers(), src.buffers());
  EXPECT_EQ(dst.num_batches_tracked(), 42);
  // Momentum asked of a file that has none: refused, naming the missing optimizer file.
  optim::Sgd sgd({}, dst.OptimizerParams());
  auto no_optim = LoadInitCheckpoint(path, "resnet8", &dst, &sgd);
  EXPECT_EQ(no_optim.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(no_optim.status().message().find("tv.optim.safetensors"), std::string::npos) << no_optim.status();
}

TEST_F(CheckpointTest, InitMismatchListsEveryNameAndLoadsNothing) {
  model::ParamStore src(spec_);
  ASSERT_TRUE(src.Load(model::InitializeParameters(spec_, {7, true})).ok());
  auto tensors = StateDict(src);
  std::string missing, reshaped;
  for (auto it = tensors.begin(); it != tensors.end(); ++it) {
    if (it->first == "layer2.0.conv1.weight") {
      missing = it->first;
      tensors.erase(it);
      break;
    }
  }
  for (auto& [name, t] : tensors) {
    if (name == "fc.weight") {  // a 12-class head where the model has 10
      reshaped = name;
      t.shape[0] = 12;
      t.f32.resize(12 * t.shape[1]);
    }
  }
  ASSERT_FALSE(missing.empty());
  ASSERT_FALSE(reshaped.empty());
  Tensor extra;
  extra.shape = {3};
  extra.f32 = {1, 2, 3};
  tensors.emplace_back("head.extra.weight", extra);
  const std::string path = testing::MakeTempDir("init") + "/bad.safetensors";
  ASSERT_TRUE(WriteFileAtomically(path, ForeignSafetensors(tensors)).ok());
  model::ParamStore dst(spec_);
  const auto before = dst.params();
  auto init = LoadInitCheckpoint(path, "resnet8", &dst, nullptr);
  ASSERT_EQ(init.status().code(), absl::StatusCode::kInvalidArgument) << init.status();
  const std::string msg(init.status().message());
  EXPECT_NE(msg.find("3 mismatches"), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing layer2.0.conv1.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fc.weight is F32 [12,"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected head.extra.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_EQ(dst.params(), before);
}

TEST_F(CheckpointTest, InitFromAnLmsgdCheckpointGivesWeightsOrWeightsMomentumAndState) {
  model::ParamStore store(spec_);
  ASSERT_TRUE(store.Load(model::InitializeParameters(spec_, {4, true})).ok());
  optim::Sgd sgd({}, store.OptimizerParams());
  std::vector<std::vector<float>> vel = sgd.velocity();
  for (size_t i = 0; i < vel.size(); ++i) std::fill(vel[i].begin(), vel[i].end(), 0.5f + static_cast<float>(i));
  ASSERT_TRUE(sgd.SetVelocity(vel).ok());
  auto path = SaveCheckpoint(dir_, store, sgd, {96, 2, "resnet8", 21, 16, 2, 0.05});
  ASSERT_TRUE(path.ok());

  model::ParamStore w(spec_);
  auto weights = LoadInitCheckpoint(*path, "resnet8", &w, nullptr);
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_EQ(w.params(), store.params());
  EXPECT_TRUE(weights->has_training_state);
  EXPECT_EQ(weights->state.epoch, 2u);

  model::ParamStore m(spec_);
  optim::Sgd m_sgd({}, m.OptimizerParams());
  auto full = LoadInitCheckpoint(*path, "resnet8", &m, &m_sgd);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(m_sgd.velocity(), sgd.velocity());
  EXPECT_EQ(full->state.iteration, 96u);
  EXPECT_EQ(full->state.seed, 21u);
  EXPECT_EQ(full->state.global_batch, 16u);
  // Another model's checkpoint is refused by name.
  model::ParamStore other(spec_);
  EXPECT_EQ(LoadInitCheckpoint(*path, "resnet20", &other, nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// A file torchvision wrote (its ResNet-18 state_dict, in safetensors' layout) loads into our
// ResNet-18 with every value where torchvision put it. Needs Debian's python3-torch.
TEST(CheckpointNamesTest, InitFromATorchvisionResNet18StateDict) {
  const std::string script = std::string(LMSGD_SOURCE_DIR) + "/tests/bench/torchvision_save_safetensors.py";
  if (std::system("/usr/bin/python3 -c 'import torch, torchvision' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "Debian python3-torch/python3-torchvision not installed (deploy/setup.sh --with-baselines)";
  }
  const std::string dir = testing::MakeTempDir("tvsave");
  const std::string path = dir + "/resnet18.safetensors", out = dir + "/probes.txt";
  const int rc = std::system(("/usr/bin/python3 " + script + " " + path + " resnet18 > " + out + " 2>&1").c_str());
  auto text = ReadFileToString(out);
  ASSERT_TRUE(text.ok());
  ASSERT_EQ(rc, 0) << *text;
  auto spec = *model::MakeResNet(model::Arch::kResNet18, 3, 1000);
  model::ParamStore store(spec);
  auto init = LoadInitCheckpoint(path, "resnet18", &store, nullptr);
  ASSERT_TRUE(init.ok()) << init.status();
  EXPECT_EQ(store.num_batches_tracked(), 123);
  int probes = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    if (f.size() != 4 || f[0] != "probe") continue;
    size_t index = 0;
    float want = 0;
    ASSERT_TRUE(absl::SimpleAtoi(f[2], &index) && absl::SimpleAtof(f[3], &want)) << line;
    const float* got = nullptr;
    for (size_t i = 0; i < store.num_params(); ++i) {
      if (store.param_specs()[i].name == f[1]) got = store.param(i);
    }
    for (size_t i = 0; i < store.buffer_specs().size(); ++i) {
      if (store.buffer_specs()[i].name == f[1]) got = store.buffer(i);
    }
    ASSERT_NE(got, nullptr) << f[1];
    EXPECT_EQ(got[index], want) << f[1] << "[" << index << "]";
    ++probes;
  }
  EXPECT_EQ(probes, 6) << *text;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lmsgd::checkpoint
