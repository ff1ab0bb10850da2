// The trainers: virtual workers equal one batch with the same BN groups, the first update is the
// paper's on the reference gradient, and the GPU trainer follows the CPU trainer (skips without a GPU).
#include "worker/train/trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/job_spec.h"
#include "tests/unit/worker/test_data.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/backend/reference/ops.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/backend/reference/reference_resnet.h"
#include "worker/train/trainer_factory.h"

namespace lmsgd::train {
namespace {

TrainerConfig SmallConfig(int n, int m, int bn_group) {
  TrainerConfig c;
  c.arch = model::Arch::kResNet8;
  c.in_channels = 1;
  c.num_classes = 10;
  c.height = c.width = 8;
  c.per_worker_batch = n;
  c.virtual_workers = m;
  c.bn_group = bn_group;
  c.world_size = 1;
  c.schedule.base_lr = 0.1;
  c.schedule.reference_batch = 8;
  c.schedule.global_batch = static_cast<uint64_t>(n) * m;
  c.schedule.warmup = Warmup::kGradual;
  c.schedule.warmup_epochs = 1;
  c.schedule.iterations_per_epoch = 4;
  c.zero_init_last_bn_gamma = false;  // every branch carries gradient
  c.seed = 3;
  return c;
}

void RandomBatch(int count, std::vector<float>* images, std::vector<int32_t>* labels, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  images->resize(static_cast<size_t>(count) * 64);
  labels->resize(count);
  for (auto& v : *images) v = nd(rng);
  for (auto& l : *labels) l = static_cast<int32_t>(rng() % 10);
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double max_abs = 0, diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_abs = std::max(max_abs, static_cast<double>(std::abs(a[i])));
    diff = std::max(diff, static_cast<double>(std::abs(a[i] - b[i])));
  }
  return diff / std::max(max_abs, 1e-12);
}

TEST(TrainerTest, VirtualWorkersEqualOneBigBatchWithTheSameBnGroups) {
  backend::onednn::SetNumThreads(2);
  auto virt = CreateTrainer(SmallConfig(4, 2, 4));  // 2 virtual workers of 4
  auto big = CreateTrainer(SmallConfig(8, 1, 4));   // one batch of 8, BN groups of 4
  ASSERT_TRUE(virt.ok() && big.ok());
  for (uint64_t t = 0; t < 3; ++t) {
    std::vector<float> x;
    std::vector<int32_t> y;
    RandomBatch(8, &x, &y, 100 + static_cast<uint32_t>(t));
    auto a = (*virt)->Step(t, x.data(), y.data());
    auto b = (*big)->Step(t, x.data(), y.data());
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_NEAR(a->loss, b->loss, 1e-5 * std::abs(b->loss));
    EXPECT_DOUBLE_EQ(a->lr, b->lr);
  }
  EXPECT_LT(MaxRelDiff((*virt)->store().params(), (*big)->store().params()), 1e-5);
  EXPECT_LT(MaxRelDiff((*virt)->store().buffers(), (*big)->store().buffers()), 1e-5);
}

// bf16: the same comparison. Virtual workers and the big batch round the same per-group
// activations to bf16, so they may only differ where fp32 summation order differs before a
// rounding: the bound is the fp32 comparison's difference x 4 x 2^16 (bf16's roundoff over
// fp32's), at least 1e-2.
TEST(TrainerTest, VirtualWorkersEqualOneBigBatchInBf16WithinBf16Bounds) {
  if (auto st = backend::onednn::CheckPrecision(backend::Precision::kBf16); !st.ok()) GTEST_SKIP() << st.message();
  backend::onednn::SetNumThreads(2);
  double diff[2] = {0, 0};
  for (int p = 0; p < 2; ++p) {
    TrainerConfig cv = SmallConfig(4, 2, 4), cb = SmallConfig(8, 1, 4);
    cv.precision = cb.precision = p == 0 ? backend::Precision::kFp32 : backend::Precision::kBf16;
    auto virt = CreateTrainer(cv);
    auto big = CreateTrainer(cb);
    ASSERT_TRUE(virt.ok() && big.ok()) << virt.status() << big.status();
    for (uint64_t t = 0; t < 3; ++t) {
      std::vector<float> x;
      std::vector<int32_t> y;
      RandomBatch(8, &x, &y, 100 + static_cast<uint32_t>(t));
      ASSERT_TRUE((*virt)->Step(t, x.data(), y.data()).ok());
      ASSERT_TRUE((*big)->Step(t, x.data(), y.data()).ok());
    }
    diff[p] = std::max(MaxRelDiff((*virt)->store().params(), (*big)->store().params()),
                       MaxRelDiff((*virt)->store().buffers(), (*big)->store().buffers()));
  }
  EXPECT_LE(diff[1], std::max(1e-2, 4 * 65536.0 * diff[0])) << "fp32 difference " << diff[0];
}

bool HaveGpu() { return CheckDeviceAvailable(0).ok(); }

// --device cuda:0 on a machine without a GPU: a clear FAILED_PRECONDITION, never a crash.
TEST(TrainerTest, GpuTrainerWithoutGpuIsAClearError) {
  if (HaveGpu()) GTEST_SKIP() << "a GPU is present: the no-GPU error path is not reachable here";
  if (CheckDeviceAvailable(0).message().find("no CUDA backend") != std::string::npos) {
    GTEST_SKIP() << "this build has no CUDA backend: the no-GPU error of a CUDA build is not reachable here";
  }
  TrainerConfig c = SmallConfig(4, 1, 4);
  c.cuda_device = 0;
  auto t = CreateTrainer(c);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition) << t.status();
  EXPECT_NE(t.status().message().find("cuda:0"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("no CUDA device"), std::string::npos) << t.status();
}

// Three steps on the GPU (fp32) follow the CPU trainer's weights; the GPU state survives a
// trip through the host (SyncHostState -> a fresh GPU trainer's HostStateChanged), so a
// checkpointed GPU run resumes where it stopped.
TEST(TrainerTest, GpuStepsMatchTheCpuAndHostStateRoundTrips) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device on this machine (cudaGetDeviceCount found none)";
  TrainerConfig c = SmallConfig(8, 1, 4);
  auto cpu = CreateTrainer(c);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  c.cuda_device = 0;
  auto gpu = CreateTrainer(c);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::vector<float> images;
  std::vector<int32_t> labels;
  for (uint64_t it = 0; it < 3; ++it) {
    RandomBatch(8, &images, &labels, static_cast<uint32_t>(10 + it));
    auto a = (*cpu)->Step(it, images.data(), labels.data());
    auto b = (*gpu)->Step(it, images.data(), labels.data());
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_NEAR(a->loss, b->loss, 1e-4 * std::abs(a->loss)) << "step " << it;
  }
  ASSERT_TRUE((*gpu)->ExportState().ok());
  EXPECT_LE(MaxRelDiff((*cpu)->store().params(), (*gpu)->store().params()), 1e-4);
  EXPECT_LE(MaxRelDiff((*cpu)->store().buffers(), (*gpu)->store().buffers()), 1e-4);
  EXPECT_EQ((*gpu)->store().num_batches_tracked(), 3);

  // A fresh GPU trainer given the host state continues exactly like the original.
  auto resumed = CreateTrainer(c);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  ASSERT_TRUE((*resumed)->store().Load((*gpu)->store().ToMap()).ok());
  (*resumed)->store().set_num_batches_tracked((*gpu)->store().num_batches_tracked());
  ASSERT_TRUE((*resumed)->sgd().SetVelocity((*gpu)->sgd().velocity()).ok());
  ASSERT_TRUE((*resumed)->ImportState().ok());
  RandomBatch(8, &images, &labels, 99);
  ASSERT_TRUE((*gpu)->Step(3, images.data(), labels.data()).ok());
  ASSERT_TRUE((*resumed)->Step(3, images.data(), labels.data()).ok());
  ASSERT_TRUE((*gpu)->ExportState().ok());
  ASSERT_TRUE((*resumed)->ExportState().ok());
  EXPECT_LE(MaxRelDiff((*gpu)->store().params(), (*resumed)->store().params()), 1e-6);
}

TEST(TrainerTest, FirstStepWithVirtualWorkersIsThePapersUpdateOnTheReferenceGradient) {
  backend::onednn::SetNumThreads(2);
  TrainerConfig c = SmallConfig(4, 2, 2);
  c.world_size = 2;  // kn = 2 * 2 * 4 = 16: this worker's gradient share is normalized by 16
  auto t = CreateTrainer(c);
  ASSERT_TRUE(t.ok());
  const auto w0 = (*t)->store().ToMap();
  std::vector<float> x;
  std::vector<int32_t> y;
  RandomBatch(8, &x, &y, 5);
  ASSERT_TRUE((*t)->Step(0, x.data(), y.data()).ok());
  // Reference: float64 loss over the 8 samples with BN groups of 2, normalized by kn = 16.
  backend::reference::ReferenceResNet ref((*t)->spec(), w0);
  backend::reference::Tensor xt({8, 1, 8, 8});
  for (size_t i = 0; i < x.size(); ++i) xt.data[i] = x[i];
  ref.Forward(xt, std::vector<int>(y.begin(), y.end()), 2, 16);
  auto g = ref.Backward();
  const double lr = LearningRate(c.schedule, 0);
  EXPECT_DOUBLE_EQ(lr, 0.1);  // warmup starts at base_lr
  for (const auto& ps : (*t)->store().param_specs()) {
    const bool bn = ps.kind == optim::ParamKind::kBnGamma || ps.kind == optim::ParamKind::kBnBeta;
    const double wd = bn ? 0.0 : 1e-4;  // no weight decay on BN gamma/beta
    const float* now = (*t)->store().ParamByName(ps.name);
    double max_step = 0, max_err = 0;
    for (int64_t i = 0; i < ps.numel(); ++i) {
      const double w = w0.at(ps.name)[i];
      const double want = w - lr * (g.at(ps.name)[i] + wd * w);  // v0 = 0: w1 = w0 - lr (g + wd w0)
      max_step = std::max(max_step, std::abs(want - w));
      max_err = std::max(max_err, std::abs(want - now[i]));
    }
    EXPECT_LE(max_err, 2e-3 * max_step + 1e-7) << ps.name;
  }
}

}  // namespace
}  // namespace lmsgd::train
