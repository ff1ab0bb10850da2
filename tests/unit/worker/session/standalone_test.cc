// The standalone session end to end on a real (small) IDX dataset: it learns, is bitwise
// deterministic, its sharded evaluation sums to the whole, and a run interrupted mid-epoch and
// resumed equals the uninterrupted run bitwise; bad datasets are clear errors.
#include "worker/session/standalone.h"

#include <gtest/gtest.h>

#include "common/job_spec.h"
#include "tests/unit/worker/test_data.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/data/idx.h"
#include "worker/train/trainer.h"

namespace lmsgd::session {
namespace {

using train::EvalCounts;
using train::Trainer;

class StandaloneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend::onednn::SetNumThreads(2);
    dir_ = testing::MakeTempDir("standalone");
    testing::WriteBarsIdx(dir_, 192, 40, 12, 4);
    spec_.set_model(v1::MODEL_RESNET8);
    spec_.mutable_dataset()->set_kind(v1::DATASET_IDX);
    spec_.mutable_dataset()->set_train_path(dir_);
    spec_.mutable_dataset()->set_num_classes(4);
    spec_.mutable_dataset()->set_image_size(12);
    spec_.mutable_dataset()->set_train_examples(192);
    spec_.mutable_dataset()->set_decode_threads(2);
    spec_.set_world_size(1);
    spec_.set_per_worker_batch(8);
    spec_.set_bn_group_size(4);
    spec_.set_virtual_workers_per_worker(2);  // kn = 16, 12 iterations per epoch
    spec_.set_epochs(3);
    spec_.set_base_lr(0.1);
    spec_.set_reference_batch(16);
    spec_.set_warmup_epochs(1);
    spec_.add_lr_decay_epochs(2);
    spec_.set_seed(11);
  }
  std::string dir_;
  v1::JobSpec spec_;
};

TEST_F(StandaloneTest, LearnsIsDeterministicAndReportsShardedEvaluation) {
  StandaloneOptions o;
  std::unique_ptr<Trainer> a, b;
  auto ra = RunStandalone(spec_, o, &a);
  ASSERT_TRUE(ra.ok()) << ra.status();
  auto rb = RunStandalone(spec_, o, &b);
  ASSERT_TRUE(rb.ok());
  EXPECT_EQ(ra->iterations, 36u);
  ASSERT_EQ(ra->epochs.size(), 3u);
  EXPECT_EQ(a->store().params(), b->store().params());  // bitwise: same seed, same run
  EXPECT_EQ(a->store().buffers(), b->store().buffers());
  EXPECT_LT(ra->epochs.back().mean_loss, ra->epochs.front().mean_loss);
  const auto& e = ra->epochs.back().eval;
  EXPECT_EQ(e.examples, 40u);
  EXPECT_GE(e.top1_correct, 30u) << "bars are easy: expect >= 75% after 3 short epochs";
  EXPECT_EQ(e.top5_correct, 40u);  // 4 classes
  // Evaluation sharded over 3 ranks sums to the whole.
  auto val = data::IdxImageDataset::Load(dir_, false, 4);
  ASSERT_TRUE(val.ok());
  EvalCounts total;
  for (uint32_t r = 0; r < 3; ++r) {
    auto c = a->Evaluate(**val, r, 3, 1);
    ASSERT_TRUE(c.ok());
    total.examples += c->examples;
    total.top1_correct += c->top1_correct;
  }
  EXPECT_EQ(total.examples, e.examples);
  EXPECT_EQ(total.top1_correct, e.top1_correct);
}

TEST_F(StandaloneTest, ResumeFromACheckpointEqualsTheUninterruptedRunBitwise) {
  StandaloneOptions o;
  std::unique_ptr<Trainer> full, resumed;
  spec_.set_checkpoint_dir(testing::MakeTempDir("resume_full"));
  ASSERT_TRUE(RunStandalone(spec_, o, &full).ok());
  // Interrupted mid-epoch 2 (iteration 17 of 36), then resumed by a fresh process-equivalent.
  spec_.set_checkpoint_dir(testing::MakeTempDir("resume_part"));
  o.stop_after_iterations = 17;
  auto part = RunStandalone(spec_, o);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(part->iterations, 17u);
  EXPECT_FALSE(part->last_checkpoint.empty());
  o.stop_after_iterations = 0;
  auto rest = RunStandalone(spec_, o, &resumed);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(rest->iterations, 36u);
  EXPECT_EQ(resumed->store().params(), full->store().params());
  EXPECT_EQ(resumed->store().buffers(), full->store().buffers());
  EXPECT_EQ(resumed->store().num_batches_tracked(), full->store().num_batches_tracked());
  EXPECT_EQ(resumed->sgd().velocity(), full->sgd().velocity());
  // A checkpoint from another recipe is refused, not silently mixed in.
  spec_.set_seed(12);
  auto mixed = RunStandalone(spec_, o);
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(StandaloneTest, ResumeInBf16EqualsTheUninterruptedRunBitwise) {
  if (auto st = backend::onednn::CheckPrecision(backend::Precision::kBf16); !st.ok()) GTEST_SKIP() << st.message();
  spec_.set_precision(v1::PRECISION_BF16);
  spec_.set_epochs(2);
  spec_.clear_lr_decay_epochs();
  StandaloneOptions o;
  std::unique_ptr<Trainer> full, resumed, fp32;
  spec_.set_checkpoint_dir(testing::MakeTempDir("bf16_full"));
  auto whole = RunStandalone(spec_, o, &full);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_NE(full->Describe().find("bf16"), std::string::npos) << full->Describe();
  spec_.set_checkpoint_dir(testing::MakeTempDir("bf16_part"));
  o.stop_after_iterations = 17;
  ASSERT_TRUE(RunStandalone(spec_, o).ok());
  o.stop_after_iterations = 0;
  ASSERT_TRUE(RunStandalone(spec_, o, &resumed).ok());
  EXPECT_EQ(resumed->store().params(), full->store().params());
  EXPECT_EQ(resumed->store().buffers(), full->store().buffers());
  EXPECT_EQ(resumed->sgd().velocity(), full->sgd().velocity());
  // And it is not the fp32 run.
  spec_.set_precision(v1::PRECISION_FP32);
  spec_.set_checkpoint_dir("");
  ASSERT_TRUE(RunStandalone(spec_, {}, &fp32).ok());
  EXPECT_NE(fp32->store().params(), full->store().params());
}

TEST_F(StandaloneTest, BadDatasetsAreClearErrors) {
  spec_.mutable_dataset()->set_train_examples(100);
  auto r = RunStandalone(spec_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("holds 192 examples"), std::string::npos) << r.status();
  spec_.mutable_dataset()->set_train_examples(192);
  spec_.mutable_dataset()->set_train_path(dir_ + "/missing");
  r = RunStandalone(spec_, {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("missing"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace lmsgd::session
