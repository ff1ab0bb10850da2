// Experiment files: parsing and validation name the bad field; arms expand to the intended
// k, m, n, lr and names; the report renders Table 2 from the CSVs.
#include "coordinator/ctl/experiment.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "common/file_util.h"
#include "common/job_spec.h"
#include "coordinator/ctl/report.h"

namespace lmsgd::ctl {
namespace {

v1::Experiment Parse(const std::string& text) {
  v1::Experiment x;
  auto st = ParseProtoText("x.textproto", text, &x);
  EXPECT_TRUE(st.ok()) << st;
  return x;
}

constexpr char kTable2[] = R"pb(
  name: "t2"
  base {
    model: MODEL_RESNET20
    dataset { kind: DATASET_SYNTHETIC train_examples: 65536 }
    world_size: 1 per_worker_batch: 32 bn_group_size: 32 epochs: 8
    base_lr: 0.1 reference_batch: 32 warmup_epochs: 1 lr_decay_epochs: [5, 7]
  }
  arms { name: "kn32" kn: 32 }
  arms { name: "kn1024-gradual" kn: 1024 warmup: WARMUP_GRADUAL }
  arms { name: "kn1024-constant" kn: 1024 warmup: WARMUP_CONSTANT }
  arms { name: "kn1024-none" kn: 1024 warmup: WARMUP_NONE }
  arms { name: "kn1024-noscaling" kn: 1024 lr_scaling: LR_SCALING_NONE }
  reference: "kn32"
  seeds: [1, 2]
)pb";

TEST(ExperimentTest, Table2ArmsExpandToThePapersRecipes) {
  auto plan = PlanExperiment(Parse(kTable2), /*standalone=*/true);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->size(), 10u);  // 5 arms x 2 seeds, arm by arm
  EXPECT_EQ((*plan)[0].key(), "kn32.seed1");
  EXPECT_EQ((*plan)[1].key(), "kn32.seed2");
  EXPECT_TRUE((*plan)[0].reference);
  EXPECT_FALSE((*plan)[2].reference);
  EXPECT_EQ((*plan)[1].spec.seed(), 2u);
  EXPECT_EQ((*plan)[1].spec.name(), "t2/kn32/seed2");
  for (const auto& r : *plan) {
    EXPECT_EQ(r.spec.world_size(), 1u);
    EXPECT_EQ(r.spec.per_worker_batch(), 32u);  // n, the BN group, never changes
    EXPECT_EQ(r.spec.bn_group_size(), 32u);
  }
  const auto lr = [](const PlannedRun& r) { return MakeSchedule(r.spec, 1).peak_lr(); };
  EXPECT_EQ((*plan)[0].spec.virtual_workers_per_worker(), 1u);
  EXPECT_DOUBLE_EQ(lr((*plan)[0]), 0.1);
  EXPECT_EQ((*plan)[2].spec.virtual_workers_per_worker(), 32u);
  EXPECT_DOUBLE_EQ(lr((*plan)[2]), 3.2);  // the linear rule at 32x
  EXPECT_EQ((*plan)[4].spec.warmup(), v1::WARMUP_CONSTANT);
  EXPECT_EQ((*plan)[6].spec.warmup(), v1::WARMUP_NONE);
  EXPECT_DOUBLE_EQ(MakeSchedule((*plan)[6].spec, 1).warmup_epochs(), 0);
  EXPECT_DOUBLE_EQ(lr((*plan)[8]), 0.1);  // no scaling
  EXPECT_EQ((*plan)[8].spec.warmup(), v1::WARMUP_GRADUAL);
}

TEST(ExperimentTest, SweepIsTheProductOfItsAxesNamedByValue) {
  auto plan = PlanExperiment(Parse(R"pb(
    name: "s"
    base { dataset { kind: DATASET_SYNTHETIC train_examples: 65536 } world_size: 2 }
    sweep { kn: [64, 128] warmup: [WARMUP_GRADUAL, WARMUP_NONE] }
    reference: "kn64-gradual"
  )pb"),
                             /*standalone=*/false);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->size(), 4u);
  EXPECT_EQ((*plan)[0].arm, "kn64-gradual");
  EXPECT_EQ((*plan)[1].arm, "kn64-none");
  EXPECT_EQ((*plan)[3].arm, "kn128-none");
  // Through a coordinator the base's k = 2 stays, kn comes from virtual workers by default.
  EXPECT_EQ((*plan)[3].spec.world_size(), 2u);
  EXPECT_EQ((*plan)[3].spec.virtual_workers_per_worker(), 2u);
}

TEST(ExperimentTest, KnThroughTheWorldSize) {
  v1::Experiment x = Parse(R"pb(
    name: "w"
    base { dataset { kind: DATASET_SYNTHETIC train_examples: 65536 } virtual_workers_per_worker: 2 }
    sweep { kn: [64, 256] }
    reference: "kn64"
    kn_via: KN_VIA_WORLD_SIZE
  )pb");
  auto plan = PlanExperiment(x, /*standalone=*/false);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ((*plan)[0].spec.world_size(), 1u);
  EXPECT_EQ((*plan)[1].spec.world_size(), 4u);
  EXPECT_EQ((*plan)[1].spec.virtual_workers_per_worker(), 2u);
  // Standalone runs the same kn in one process, through virtual workers.
  auto one = PlanExperiment(x, /*standalone=*/true);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ((*one)[1].spec.world_size(), 1u);
  EXPECT_EQ((*one)[1].spec.virtual_workers_per_worker(), 8u);
}

void ExpectError(const std::string& text, const std::vector<std::string>& needles) {
  auto plan = PlanExperiment(Parse(text), true);
  ASSERT_FALSE(plan.ok()) << text;
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  for (const auto& n : needles) EXPECT_TRUE(absl::StrContains(plan.status().message(), n)) << plan.status();
}

TEST(ExperimentTest, ValidationNamesTheBadField) {
  const std::string base = R"pb(base { dataset { kind: DATASET_SYNTHETIC train_examples: 65536 } } )pb";
  ExpectError("name: \"x\" " + base + "arms { name: \"a\" kn: 48 } arms { name: \"b\" kn: 100 } reference: \"a\"",
              {"arms[1].kn: 100 is not a multiple of k x n = 32"});
  ExpectError("name: \"x\" " + base + "arms { name: \"a\" } reference: \"b\"", {"reference: no arm is named 'b'"});
  ExpectError("name: \"x\" " + base + "arms { name: \"a\" }", {"reference: name the arm"});
  ExpectError("name: \"x\" " + base + "arms { name: \"a\" } arms { name: \"a\" kn: 64 } reference: \"a\"",
              {"arms[1].name: 'a' names two arms"});
  ExpectError("name: \"x\" " + base + "arms { name: \"a b\" } reference: \"a\"", {"arms[0].name: 'a b'"});
  ExpectError("name: \"x/y\" " + base + "arms { name: \"a\" } reference: \"a\"", {"name: must be"});
  ExpectError("name: \"x\" " + base + "reference: \"a\"", {"arms: the experiment has no arms"});
  ExpectError("name: \"x\" " + base + "arms { name: \"a\" } reference: \"a\" seeds: [3, 3]",
              {"seeds[1]: 3 is listed twice"});
  // A field of the resulting JobSpec: validation of the arm's job, named.
  ExpectError("name: \"x\" " + base + "arms { name: \"a\" warmup_epochs: -1 } reference: \"a\"",
              {"arms[0] (arm a):", "warmup_epochs"});
  // An unknown field is a parse error naming it and the line.
  v1::Experiment x;
  auto st = ParseProtoText("x.textproto", "name: \"x\"\narms { name: \"a\" batch: 3 }\n", &x);
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(absl::StrContains(st.message(), "x.textproto")) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "2:")) << st;
  EXPECT_TRUE(absl::StrContains(st.message(), "batch")) << st;
}

TEST(ExperimentTest, ShippedExperimentsPlan) {
  for (const auto& [f, runs] : std::vector<std::pair<std::string, size_t>>{
           {"table2.textproto", 10}, {"kn_sweep.textproto", 8}, {"table2_long.textproto", 2}}) {
    auto x = ReadExperimentFile(std::string(LMSGD_SOURCE_DIR) + "/deploy/experiments/" + f);
    ASSERT_TRUE(x.ok()) << x.status();
    auto plan = PlanExperiment(*x, true);
    ASSERT_TRUE(plan.ok()) << f << ": " << plan.status();
    EXPECT_EQ(plan->size(), runs) << f;
    for (const auto& r : *plan) {
      EXPECT_EQ(r.spec.per_worker_batch(), 32u) << f;  // n = the BN group of the paper
      EXPECT_EQ(r.spec.bn_group_size(), 32u) << f;
    }
  }
}

TEST(ExperimentTest, ReportTableFromTheCsvs) {
  const std::string dir = ::testing::TempDir() + "/report_table";
  std::vector<v1::ExperimentRun> runs;
  auto add = [&](const std::string& arm, uint64_t seed, bool ref, uint64_t kn, double err) {
    v1::ExperimentRun r;
    r.set_arm(arm);
    r.set_seed(seed);
    r.set_reference(ref);
    r.set_kn(kn);
    r.set_peak_lr(0.1 * kn / 32);
    r.set_warmup(v1::WARMUP_GRADUAL);
    r.set_warmup_epochs(1);
    r.set_lr_scaling(v1::LR_SCALING_LINEAR);
    r.set_iterations(1000 / kn);
    r.set_state(v1::JOB_STATE_SUCCEEDED);
    r.mutable_final_error()->set_top1_error(err);
    r.mutable_final_error()->set_epochs(3);
    for (uint32_t e = 1; e <= 3; ++e) {
      auto* h = r.add_history();
      h->set_epoch(e);
      h->set_mean_loss(1.0 / e);
      h->mutable_evaluation()->set_top1_error(err + 0.01 * (3 - e));
    }
    runs.push_back(r);
  };
  add("kn32", 1, true, 32, 0.10);
  add("kn32", 2, true, 32, 0.12);
  add("kn64", 1, false, 64, 0.13);
  add("kn64", 2, false, 64, 0.15);
  v1::ExperimentRun failed = runs.back();
  failed.set_seed(3);
  failed.set_state(v1::JOB_STATE_FAILED);
  failed.set_message("worker lost, twice");
  failed.clear_final_error();
  runs.push_back(failed);
  ASSERT_TRUE(WriteExperimentCsv(dir, runs).ok());
  std::string table;
  auto st = RenderReport(dir, &table);
  // Plots need gnuplot; the table is written either way.
  if (!st.ok()) {
    EXPECT_TRUE(absl::StrContains(st.message(), "table.md written")) << st;
  }
  EXPECT_TRUE(absl::StrContains(table, "| kn32 | 32 | 0.1 | gradual, 1 epoch | linear | 31 | 11.00 ± 1.41 | 2 | reference | 11.00 |"))
      << table;
  EXPECT_TRUE(absl::StrContains(table, "| kn64 | 64 | 0.2 | gradual, 1 epoch | linear | 15 | 14.00 ± 1.41 | 2 (1 did not finish) | +3.00 | 14.00 |"))
      << table;
  EXPECT_TRUE(absl::StrContains(table, "final 3 evaluated epochs")) << table;
  EXPECT_TRUE(absl::StrContains(table, "seed 3 failed: worker lost; twice")) << table;
  EXPECT_EQ(*ReadFileToString(dir + "/table.md"), table);
  // A damaged CSV is named.
  ASSERT_TRUE(WriteFileAtomically(dir + "/runs.csv", "arm,seed\nkn32\n").ok());
  auto bad = RenderReport(dir, nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.message(), "runs.csv")) << bad;
}

}  // namespace
}  // namespace lmsgd::ctl
