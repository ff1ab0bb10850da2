// The history's merge rule and bound, the paper's median-of-final-5 error, and the CSV / JSON
// lines renderings read back.
#include "common/history.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "common/csv.h"
#include "common/file_util.h"

namespace lmsgd {
namespace {

v1::EpochRecord Trained(uint32_t epoch, double loss, uint64_t iteration = 0) {
  v1::EpochRecord r;
  r.set_epoch(epoch);
  r.set_iteration(iteration ? iteration : 100 * epoch);
  r.set_mean_loss(loss);
  r.set_lr(0.1 * epoch);
  return r;
}

v1::EpochRecord Evaluated(uint32_t epoch, double top1, double top5 = 0.01) {
  v1::EpochRecord r = Trained(epoch, 1.0 / epoch);
  r.mutable_evaluation()->set_epoch(epoch);
  r.mutable_evaluation()->set_examples(1000);
  r.mutable_evaluation()->set_top1_error(top1);
  r.mutable_evaluation()->set_top5_error(top5);
  return r;
}

EpochRecords Of(const std::vector<double>& top1_per_epoch) {
  EpochRecords h;
  for (size_t i = 0; i < top1_per_epoch.size(); ++i) {
    MergeEpochRecord(Evaluated(static_cast<uint32_t>(i + 1), top1_per_epoch[i]), &h, nullptr);
  }
  return h;
}

TEST(HistoryTest, MedianOfTheFinalFiveEpochs) {
  // Epochs 1-7: the final five are 0.30 0.25 0.20 0.26 0.24 -> median 0.25 (not the last, 0.24,
  // nor the best, 0.20, nor the median of all seven).
  auto e = FinalErrorOf(Of({0.9, 0.5, 0.30, 0.25, 0.20, 0.26, 0.24}));
  ASSERT_TRUE(e.has_value());
  EXPECT_DOUBLE_EQ(e->top1_error(), 0.25);
  EXPECT_EQ(e->epochs(), 5u);
  EXPECT_EQ(e->last_epoch(), 7u);
}

TEST(HistoryTest, FewerThanFiveEpochsUseAllOfThemAndSaySo) {
  auto three = FinalErrorOf(Of({0.9, 0.3, 0.5}));
  ASSERT_TRUE(three.has_value());
  EXPECT_DOUBLE_EQ(three->top1_error(), 0.5);
  EXPECT_EQ(three->epochs(), 3u);
  auto four = FinalErrorOf(Of({0.9, 0.3, 0.5, 0.4}));  // even count: the mean of the middle two
  ASSERT_TRUE(four.has_value());
  EXPECT_DOUBLE_EQ(four->top1_error(), 0.45);
  EXPECT_EQ(four->epochs(), 4u);
  auto one = FinalErrorOf(Of({0.7}));
  ASSERT_TRUE(one.has_value());
  EXPECT_DOUBLE_EQ(one->top1_error(), 0.7);
  EXPECT_EQ(one->epochs(), 1u);
  EXPECT_TRUE(absl::StrContains(DescribeFinalError(*one), "median of the final 1 evaluated epoch,"))
      << DescribeFinalError(*one);
}

TEST(HistoryTest, EpochsWithoutEvaluationAreNotCounted) {
  EpochRecords h = Of({0.9, 0.8, 0.7, 0.6, 0.5, 0.4});
  MergeEpochRecord(Trained(7, 0.1), &h, nullptr);  // trained, not evaluated
  auto e = FinalErrorOf(h);
  ASSERT_TRUE(e.has_value());
  EXPECT_DOUBLE_EQ(e->top1_error(), 0.6);  // epochs 2-6
  EXPECT_EQ(e->last_epoch(), 6u);
  EpochRecords none;
  MergeEpochRecord(Trained(1, 2.0), &none, nullptr);
  EXPECT_FALSE(FinalErrorOf(none).has_value());
}

TEST(HistoryTest, ARerunEpochReplacesItAndDropsLaterOnes) {
  EpochRecords h = Of({0.9, 0.8, 0.7, 0.6});
  // A recovery resumed from the epoch-2 checkpoint: epoch 3 is trained again.
  MergeEpochRecord(Evaluated(3, 0.65), &h, nullptr);
  ASSERT_EQ(h.size(), 3);
  EXPECT_EQ(h[2].epoch(), 3u);
  EXPECT_DOUBLE_EQ(h[2].evaluation().top1_error(), 0.65);
}

TEST(HistoryTest, TrainingAndEvaluationReportsOfOneEpochMerge) {
  EpochRecords h;
  v1::EpochRecord eval_only;
  eval_only.set_epoch(1);
  eval_only.mutable_evaluation()->set_top1_error(0.4);
  eval_only.mutable_evaluation()->set_examples(10);
  MergeEpochRecord(eval_only, &h, nullptr);
  MergeEpochRecord(Trained(1, 2.5), &h, nullptr);  // keeps the evaluation
  ASSERT_EQ(h.size(), 1);
  EXPECT_DOUBLE_EQ(h[0].mean_loss(), 2.5);
  EXPECT_DOUBLE_EQ(h[0].evaluation().top1_error(), 0.4);
  eval_only.mutable_evaluation()->set_top1_error(0.3);
  MergeEpochRecord(eval_only, &h, nullptr);  // keeps the training fields
  EXPECT_DOUBLE_EQ(h[0].mean_loss(), 2.5);
  EXPECT_DOUBLE_EQ(h[0].evaluation().top1_error(), 0.3);
}

TEST(HistoryTest, BoundedWithTheOldestDroppedAndCounted) {
  EpochRecords h;
  uint32_t dropped = 0;
  for (uint32_t e = 1; e <= kMaxHistoryRecords + 7; ++e) MergeEpochRecord(Trained(e, 1.0), &h, &dropped);
  EXPECT_EQ(h.size(), kMaxHistoryRecords);
  EXPECT_EQ(dropped, 7u);
  EXPECT_EQ(h[0].epoch(), 8u);
}

TEST(HistoryTest, CsvAndJsonLinesReadBackAndNameBadLines) {
  EpochRecords h = Of({0.5, 0.25});
  MergeEpochRecord(Trained(3, 0.125), &h, nullptr);
  h[0].mutable_step_time()->set_backward_s(0.375);
  for (const std::string& text : {HistoryCsv(h), HistoryJsonLines(h)}) {
    const bool csv = absl::StartsWith(text, "epoch,");
    auto back = csv ? ParseHistoryCsv(text, "h.csv") : ParseHistoryJsonLines(text, "h.jsonl");
    ASSERT_TRUE(back.ok()) << back.status();
    ASSERT_EQ(back->size(), 3u);
    EXPECT_DOUBLE_EQ((*back)[0].step_time().backward_s(), 0.375);
    EXPECT_DOUBLE_EQ((*back)[1].evaluation().top1_error(), 0.25);
    EXPECT_FALSE((*back)[2].has_evaluation());
    EXPECT_DOUBLE_EQ((*back)[2].mean_loss(), 0.125);
  }
  auto bad = ParseHistoryJsonLines("{\"epoch\": 1}\n{\"epoch\": \"x\"}\n", "h.jsonl");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "h.jsonl: line 2")) << bad.status();
  auto short_row = ParseHistoryCsv("epoch,iteration,mean_loss,lr,top1_error,top5_error\n1,2,3\n", "h.csv");
  ASSERT_FALSE(short_row.ok());
  EXPECT_TRUE(absl::StrContains(short_row.status().message(), "h.csv: line 2")) << short_row.status();
  auto not_a_number = ParseHistoryCsv("epoch,iteration,mean_loss,lr,top1_error,top5_error\n1,2,x,4,,\n", "h.csv");
  ASSERT_FALSE(not_a_number.ok());
  EXPECT_TRUE(absl::StrContains(not_a_number.status().message(), "mean_loss")) << not_a_number.status();
}

TEST(HistoryTest, HistoryFileFormatFollowsTheExtension) {
  const std::string dir = ::testing::TempDir();
  EpochRecords h = Of({0.5, 0.4});
  ASSERT_TRUE(WriteHistoryFile(dir + "/h.csv", h).ok());
  ASSERT_TRUE(WriteHistoryFile(dir + "/h.jsonl", h).ok());
  EXPECT_TRUE(absl::StartsWith(*ReadFileToString(dir + "/h.csv"), "epoch,iteration,"));
  EXPECT_TRUE(absl::StartsWith(*ReadFileToString(dir + "/h.jsonl"), "{"));
  for (const char* f : {"/h.csv", "/h.jsonl"}) {
    auto back = ReadHistoryFile(dir + f);
    ASSERT_TRUE(back.ok()) << back.status();
    ASSERT_EQ(back->size(), 2u);
    EXPECT_DOUBLE_EQ((*back)[1].evaluation().top1_error(), 0.4);
  }
}

}  // namespace
}  // namespace lmsgd
