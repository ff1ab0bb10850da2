#include "common/job_spec.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"

namespace lmsgd {
namespace {

v1::JobSpec Synthetic() {
  v1::JobSpec s;
  s.mutable_dataset()->set_kind(v1::DATASET_SYNTHETIC);
  return s;
}

TEST(JobSpecTest, DefaultsAreThePapers) {
  v1::JobSpec s = Synthetic();
  ApplyDefaults(&s);
  EXPECT_EQ(s.model(), v1::MODEL_RESNET50);
  EXPECT_EQ(s.per_worker_batch(), 32u);
  EXPECT_EQ(s.bn_group_size(), 32u);
  EXPECT_EQ(s.virtual_workers_per_worker(), 1u);
  EXPECT_EQ(s.epochs(), 90u);
  EXPECT_DOUBLE_EQ(s.base_lr(), 0.1);
  EXPECT_EQ(s.reference_batch(), 256u);
  EXPECT_EQ(s.warmup(), v1::WARMUP_GRADUAL);
  EXPECT_DOUBLE_EQ(s.warmup_epochs(), 5);
  ASSERT_EQ(s.lr_decay_epochs_size(), 3);
  EXPECT_EQ(s.lr_decay_epochs(0), 30u);
  EXPECT_EQ(s.lr_decay_epochs(1), 60u);
  EXPECT_EQ(s.lr_decay_epochs(2), 80u);
  EXPECT_DOUBLE_EQ(s.lr_decay_factor(), 0.1);
  EXPECT_DOUBLE_EQ(s.momentum(), 0.9);
  EXPECT_DOUBLE_EQ(s.weight_decay(), 1e-4);
  EXPECT_FALSE(s.weight_decay_on_bn());
  EXPECT_TRUE(s.zero_init_last_bn_gamma());
  EXPECT_EQ(s.bucket_bytes(), 25u << 20);
  EXPECT_EQ(s.concurrent_allreduces(), 1u);
  EXPECT_EQ(s.dataset().train_examples(), 1281167u);
  EXPECT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);
}

TEST(JobSpecTest, ExplicitZeroesAreKept) {
  v1::JobSpec s = Synthetic();
  s.set_momentum(0);
  s.set_weight_decay(0);
  s.set_zero_init_last_bn_gamma(false);
  s.set_warmup(v1::WARMUP_NONE);
  ApplyDefaults(&s);
  EXPECT_EQ(s.momentum(), 0);
  EXPECT_EQ(s.weight_decay(), 0);
  EXPECT_FALSE(s.zero_init_last_bn_gamma());
  EXPECT_EQ(s.warmup_epochs(), 0);
}

TEST(JobSpecTest, ValidationNamesEveryBadField) {
  v1::JobSpec s;
  s.mutable_dataset()->set_kind(v1::DATASET_IMAGE_FOLDER);  // no path, no count
  s.set_per_worker_batch(48);
  s.set_bn_group_size(32);  // does not divide 48
  s.set_momentum(1.5);
  s.set_base_lr(-1);
  s.add_lr_decay_epochs(60);
  s.add_lr_decay_epochs(30);  // not increasing
  s.set_concurrent_allreduces(9);
  ApplyDefaults(&s);
  auto errors = JobSpecErrors(s);
  auto has = [&](const std::string& field) {
    for (const auto& e : errors) {
      if (absl::StartsWith(e, field + ":")) return true;
    }
    return false;
  };
  EXPECT_TRUE(has("dataset.train_path"));
  EXPECT_TRUE(has("dataset.train_examples"));
  EXPECT_TRUE(has("bn_group_size"));
  EXPECT_TRUE(has("momentum"));
  EXPECT_TRUE(has("base_lr"));
  EXPECT_TRUE(has("lr_decay_epochs[1]"));
  EXPECT_TRUE(has("concurrent_allreduces"));
  EXPECT_EQ(errors.size(), 7u) << ::testing::PrintToString(errors);
  absl::Status st = ValidateJobSpec(s);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(st.message(), "7 errors")) << st;
}

TEST(JobSpecTest, TooFewExamplesForOneBatch) {
  v1::JobSpec s = Synthetic();
  s.mutable_dataset()->set_train_examples(100);
  s.set_world_size(8);
  ApplyDefaults(&s);
  auto st = ValidateJobSpec(s);
  EXPECT_TRUE(absl::StrContains(st.message(), "dataset.train_examples")) << st;
}

TEST(JobSpecTest, CpuTrainsInFp32OrBf16) {
  v1::JobSpec s = Synthetic();
  s.set_precision(v1::PRECISION_TF32);
  ApplyDefaults(&s);
  EXPECT_TRUE(absl::StrContains(ValidateJobSpec(s).message(), "precision")) << ValidateJobSpec(s);
  s.set_device(v1::DEVICE_CUDA);
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s.set_device(v1::DEVICE_CPU);
  s.set_precision(v1::PRECISION_BF16);
  EXPECT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);
  s.set_precision(v1::PRECISION_FP16);
  EXPECT_TRUE(absl::StrContains(ValidateJobSpec(s).message(), "precision")) << ValidateJobSpec(s);
}

TEST(JobSpecTest, InitCheckpointAndEvaluationJobsAreChecked) {
  v1::JobSpec s = Synthetic();
  s.set_init_mode(v1::INIT_CONTINUE);
  ApplyDefaults(&s);
  auto errors = JobSpecErrors(s);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0], "init_mode: INIT_CONTINUE needs init_checkpoint");
  s.set_init_checkpoint("/ckpt/ckpt-0000000096.safetensors");
  EXPECT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);

  // An evaluation job of an ImageFolder needs the checkpoint and the validation set, not the
  // training set; it may only read weights.
  v1::JobSpec e;
  e.set_mode(v1::JOB_MODE_EVALUATE);
  e.mutable_dataset()->set_kind(v1::DATASET_IMAGE_FOLDER);
  e.set_init_mode(v1::INIT_WEIGHTS_AND_MOMENTUM);
  ApplyDefaults(&e);
  errors = JobSpecErrors(e);
  std::string all;
  for (const auto& x : errors) all += x + "\n";
  EXPECT_EQ(errors.size(), 4u) << all;
  EXPECT_TRUE(absl::StrContains(all, "init_checkpoint: required for JOB_MODE_EVALUATE")) << all;
  EXPECT_TRUE(absl::StrContains(all, "init_mode: JOB_MODE_EVALUATE reads the weights only")) << all;
  EXPECT_TRUE(absl::StrContains(all, "init_mode: INIT_WEIGHTS_AND_MOMENTUM needs init_checkpoint")) << all;
  EXPECT_TRUE(absl::StrContains(all, "dataset.val_path: required for JOB_MODE_EVALUATE")) << all;
  EXPECT_FALSE(absl::StrContains(all, "train_")) << all;
  e.set_init_mode(v1::INIT_WEIGHTS);
  e.set_init_checkpoint("/ckpt/resnet50.safetensors");
  e.mutable_dataset()->set_val_path("/data/val");
  EXPECT_TRUE(ValidateJobSpec(e).ok()) << ValidateJobSpec(e);
  e.set_mode(static_cast<v1::JobMode>(9));
  EXPECT_TRUE(absl::StrContains(ValidateJobSpec(e).message(), "mode: unknown job mode"));
}

TEST(JobSpecTest, ParsesTextAndJson) {
  auto text = ParseJobSpec("a.textproto", "world_size: 4\nmodel: MODEL_RESNET18\n");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->world_size(), 4u);
  EXPECT_EQ(text->model(), v1::MODEL_RESNET18);
  auto json = ParseJobSpec("a.json", R"({"world_size": 4, "base_lr": 0.2, "dataset": {"kind": "DATASET_IDX"}})");
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(json->world_size(), 4u);
  EXPECT_DOUBLE_EQ(json->base_lr(), 0.2);
  auto sniffed = ParseJobSpec("job.cfg", "  {\"epochs\": 3}");
  ASSERT_TRUE(sniffed.ok()) << sniffed.status();
  EXPECT_EQ(sniffed->epochs(), 3u);
}

TEST(JobSpecTest, ParseErrorsNameFileAndPosition) {
  auto bad = ParseJobSpec("jobs/bad.textproto", "world_size: 4\nno_such_field: 1\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "jobs/bad.textproto")) << bad.status();
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "2:")) << bad.status();
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "no_such_field")) << bad.status();
  auto badjson = ParseJobSpec("x.json", "{\"world_size\": \"many\"}");
  ASSERT_FALSE(badjson.ok());
  EXPECT_TRUE(absl::StrContains(badjson.status().message(), "x.json")) << badjson.status();
  auto missing = ReadJobFile("/nonexistent/job.textproto");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "/nonexistent/job.textproto"));
}

TEST(JobSpecTest, ScheduleForPaperRecipe) {
  v1::JobSpec s = Synthetic();
  s.set_world_size(256);
  ApplyDefaults(&s);
  v1::Schedule sc = MakeSchedule(s, 256);
  EXPECT_EQ(sc.global_batch(), 8192u);
  EXPECT_NEAR(sc.peak_lr(), 3.2, 1e-12);
  EXPECT_EQ(sc.iterations_per_epoch(), 156u);
  EXPECT_EQ(sc.total_iterations(), 156u * 90);
  LrScheduleParams p = ScheduleParams(sc);
  EXPECT_NEAR(LearningRate(p, 0), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(p, 5 * 156), 3.2, 1e-12);
  EXPECT_NEAR(LearningRate(p, 80 * 156), 0.0032, 1e-12);
  // Virtual workers count towards kn.
  s.set_virtual_workers_per_worker(2);
  EXPECT_EQ(MakeSchedule(s, 256).global_batch(), 16384u);
}

TEST(JobSpecTest, LrScalingRuleReachesTheSchedule) {
  v1::JobSpec s = Synthetic();
  s.set_world_size(256);
  ApplyDefaults(&s);
  EXPECT_EQ(s.lr_scaling(), v1::LR_SCALING_LINEAR);
  s.set_lr_scaling(v1::LR_SCALING_NONE);
  ASSERT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);
  v1::Schedule none = MakeSchedule(s, 256);
  EXPECT_NEAR(none.peak_lr(), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(ScheduleParams(none), 5 * 156), 0.1, 1e-12);
  s.set_lr_scaling(v1::LR_SCALING_SQRT);
  v1::Schedule sqrt_rule = MakeSchedule(s, 256);
  EXPECT_NEAR(sqrt_rule.peak_lr(), 0.565685424949238, 1e-12);
  EXPECT_NEAR(LearningRate(ScheduleParams(sqrt_rule), 0), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(ScheduleParams(sqrt_rule), 5 * 156), 0.565685424949238, 1e-12);
  s.set_lr_scaling(static_cast<v1::LrScaling>(99));
  EXPECT_TRUE(absl::StrContains(ValidateJobSpec(s).message(), "lr_scaling")) << ValidateJobSpec(s);
}

TEST(JobSpecTest, ShippedJobFilesAreValid) {
  for (const char* name : {"fashion_mnist_resnet20.textproto", "fashion_mnist_resnet20_standalone.textproto",
                           "imagenet_resnet50_8k.textproto", "synthetic_resnet20_gpu.textproto"}) {
    auto spec = ReadJobFile(std::string(LMSGD_SOURCE_DIR) + "/deploy/jobs/" + name);
    ASSERT_TRUE(spec.ok()) << spec.status();
    ApplyDefaults(&*spec);
    EXPECT_TRUE(ValidateJobSpec(*spec).ok()) << name << ": " << ValidateJobSpec(*spec);
  }
  auto paper = ReadJobFile(std::string(LMSGD_SOURCE_DIR) + "/deploy/jobs/imagenet_resnet50_8k.textproto");
  ASSERT_TRUE(paper.ok());
  ApplyDefaults(&*paper);
  EXPECT_NEAR(MakeSchedule(*paper, paper->world_size()).peak_lr(), 3.2, 1e-12);
}

}  // namespace
}  // namespace lmsgd
