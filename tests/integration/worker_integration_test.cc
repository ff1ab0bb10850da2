// Distributed training end to end with real processes on loopback: a coordinator, lmsgd-worker
// processes, lmsgdctl. A tiny ResNet-8 on a small real IDX data set.
//   - a full job to success (evaluation and checkpoint recorded), and its final weights equal
//     one process with 2 virtual workers (the distributed path computes the paper's update);
//   - a worker killed with SIGKILL mid-run: detected, the survivor re-joins, a replacement
//     worker joins, training resumes from the last checkpoint, and the final weights equal the
//     uninterrupted run's.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <set>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/csv.h"
#include "common/file_util.h"
#include "common/history.h"
#include "common/job_spec.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "lmsgd/v1/experiment.pb.h"
#include "tests/integration/test_util.h"
#include "tests/unit/worker/test_data.h"
#include "worker/backend/onednn/resnet.h"
#include "worker/checkpoint/checkpoint.h"
#include "worker/data/photo_generator.h"
#include "worker/data/tar.h"
#include "worker/session/standalone.h"

namespace lmsgd {
namespace {

v1::JobSpec BarsJob(const std::string& data_dir, const std::string& ckpt_dir, int train_examples, int epochs) {
  v1::JobSpec s;
  s.set_name("bars");
  s.set_model(v1::MODEL_RESNET8);
  s.mutable_dataset()->set_kind(v1::DATASET_IDX);
  s.mutable_dataset()->set_train_path(data_dir);
  s.mutable_dataset()->set_num_classes(4);
  s.mutable_dataset()->set_image_size(12);
  s.mutable_dataset()->set_train_examples(train_examples);
  s.set_world_size(2);
  s.set_per_worker_batch(8);
  s.set_bn_group_size(4);
  s.set_epochs(epochs);
  s.set_base_lr(0.1);
  s.set_reference_batch(16);
  s.set_warmup_epochs(1);
  s.add_lr_decay_epochs(epochs - 1);
  s.set_seed(21);
  s.set_checkpoint_dir(ckpt_dir);
  s.set_checkpoint_interval_epochs(1);
  s.set_collective_timeout_s(5);
  return s;
}

std::string WriteJob(const std::string& dir, const v1::JobSpec& spec) {
  std::string text;
  google::protobuf::TextFormat::PrintToString(spec, &text);
  const std::string path = dir + "/job.textproto";
  EXPECT_TRUE(WriteFileAtomically(path, text).ok());
  return path;
}

std::string Ctl(const std::string& addr, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {LMSGD_CTL_BIN, "--coordinator=" + addr};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = testing::RunCommand(argv, absl::Seconds(30));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return std::string(absl::StripTrailingAsciiWhitespace(r.out));
}

std::unique_ptr<testing::Subprocess> StartWorker(const std::string& addr, const std::string& job, int device,
                                                 const std::string& log, std::vector<std::string> extra = {}) {
  auto p = std::make_unique<testing::Subprocess>();
  std::vector<std::string> argv = {LMSGD_WORKER_BIN, "--coordinator=" + addr, "--job=" + job, "--threads=1",
                                   absl::StrCat("--local_device=", device), "--host=localhost"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  EXPECT_TRUE(p->Start(argv, log).ok());
  return p;
}

// Value of `name{...}` lines containing every `must` substring; NaN if absent.
double Metric(const std::string& text, const std::string& name, const std::vector<std::string>& must) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, name + "{")) continue;
    bool all = true;
    for (const auto& m : must) all = all && absl::StrContains(line, m);
    double v;
    if (all && absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) return v;
  }
  return std::nan("");
}

std::string JobState(const std::string& addr, const std::string& job) {
  const std::string json = Ctl(addr, {"--output=json", "status", job});
  auto p = json.find("\"state\": \"");
  return p == std::string::npos ? "" : json.substr(p + 10, json.find('"', p + 10) - p - 10);
}

v1::JobStatus Status(const std::string& addr, const std::string& job) {
  v1::JobStatus st;
  const std::string json = Ctl(addr, {"--output=json", "status", job});
  EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(json, &st).ok()) << json;
  return st;
}

std::vector<float> Params(const std::string& ckpt_path, bool buffers = false) {
  auto spec = *model::MakeResNet(model::Arch::kResNet8, 1, 4);
  model::ParamStore store(spec);
  auto st = checkpoint::LoadCheckpoint(ckpt_path, "resnet8", &store, nullptr);
  EXPECT_TRUE(st.ok()) << st.status();
  return buffers ? store.buffers() : store.params();
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return 1e9;
  double m = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, static_cast<double>(std::abs(a[i])));
    d = std::max(d, static_cast<double>(std::abs(a[i] - b[i])));
  }
  return d / m;
}

// A free loopback port (bound, read, released).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

class WorkerIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("workers");
    data_ = dir_ + "/data";
    std::filesystem::create_directories(data_);
    lmsgd::testing::WriteBarsIdx(data_, 768, 64, 12, 4);
    coord_ = std::make_unique<testing::CoordinatorProcess>(
        dir_ + "/coord", std::vector<std::string>{"--heartbeat_interval=0.5s", "--heartbeat_timeout=3s"});
    std::filesystem::create_directories(dir_ + "/coord");
    ASSERT_TRUE(coord_->Start().ok());
  }
  // Waits for the job to reach a final state.
  std::string WaitForEnd(const std::string& job, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    std::string state;
    while (absl::Now() < deadline) {
      state = JobState(coord_->grpc_address(), job);
      if (state == "JOB_STATE_SUCCEEDED" || state == "JOB_STATE_FAILED" || state == "JOB_STATE_CANCELLED") break;
      absl::SleepFor(absl::Milliseconds(200));
    }
    return state;
  }
  // A coordinator of its own on a fixed port (restarts keep the address), a 12-epoch job of two
  // workers, returned once its epoch-4 checkpoint exists (training is under way).
  struct RestartableJob {
    std::unique_ptr<testing::CoordinatorProcess> coord;
    std::string addr, job;
    std::unique_ptr<testing::Subprocess> w0, w1;
  };
  RestartableJob StartRestartableJob(const std::string& name, const std::string& heartbeat_timeout) {
    RestartableJob r;
    r.coord = std::make_unique<testing::CoordinatorProcess>(
        dir_ + "/" + name, std::vector<std::string>{absl::StrCat("--listen=127.0.0.1:", FreePort()),
                                                    "--heartbeat_interval=0.5s",
                                                    "--heartbeat_timeout=" + heartbeat_timeout});
    std::filesystem::create_directories(dir_ + "/" + name);
    EXPECT_TRUE(r.coord->Start().ok());
    r.addr = r.coord->grpc_address();
    r.job = Ctl(r.addr, {"submit", WriteJob(dir_, BarsJob(data_, dir_ + "/ckpt", 768, 12))});
    r.w0 = StartWorker(r.addr, r.job, 0, dir_ + "/w0.log");
    r.w1 = StartWorker(r.addr, r.job, 1, dir_ + "/w1.log");
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (!std::filesystem::exists(dir_ + "/ckpt/ckpt-0000000048.safetensors") && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    return r;
  }
  std::string dir_, data_;
  std::unique_ptr<testing::CoordinatorProcess> coord_;
};

// The workers exchange gradients in 8 KiB buckets on 3 lanes (up to 3 bucket allreduces in
// flight, JobSpec concurrent_allreduces); the other tests here run the defaults (one lane).
TEST_F(WorkerIntegrationTest, TwoWorkersTrainToSuccessAndMatchOneProcessWithTwoVirtualWorkers) {
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 3);
  spec.set_concurrent_allreduces(3);
  spec.set_bucket_bytes(8 << 10);
  spec.set_first_bucket_bytes(2 << 10);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  EXPECT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED")
      << ReadFileToString(dir_ + "/w0.log").value_or("") << ReadFileToString(dir_ + "/w1.log").value_or("");
  EXPECT_EQ(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*w1->Wait(absl::Seconds(30)), 0);
  const std::string log0 = ReadFileToString(dir_ + "/w0.log").value_or("");
  // Enough buckets for every lane to carry some.
  const size_t at = log0.find("gradients in ");
  ASSERT_NE(at, std::string::npos) << log0;
  const std::string rest = log0.substr(at + 13, log0.find('\n', at) - at - 13);
  int buckets = 0;
  EXPECT_TRUE(absl::SimpleAtoi(rest.substr(0, rest.find(' ')), &buckets)) << rest;
  EXPECT_GE(buckets, 4) << rest;
  EXPECT_TRUE(absl::EndsWith(rest, "buckets on 3 allreduce lane(s)")) << rest;
  const std::string status = Ctl(coord_->grpc_address(), {"--output=json", "status", job});
  EXPECT_NE(status.find("\"last_evaluation\""), std::string::npos) << status;
  EXPECT_NE(status.find("ckpt-0000000144"), std::string::npos) << status;  // 3 epochs x 48 iterations
  // The job's history: one record per epoch from rank 0, each evaluated, with its step split.
  auto history = ParseHistoryCsv(Ctl(coord_->grpc_address(), {"--output=csv", "history", job}), "history");
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 3u);
  for (uint32_t e = 0; e < 3; ++e) {
    const auto& r = (*history)[e];
    EXPECT_EQ(r.epoch(), e + 1);
    EXPECT_EQ(r.iteration(), 48u * (e + 1));
    EXPECT_EQ(r.world_size(), 2u);
    EXPECT_EQ(r.global_batch(), 16u);
    EXPECT_GT(r.mean_loss(), 0);
    EXPECT_GT(r.step_time().forward_s(), 0);
    EXPECT_GT(r.step_time().backward_s(), 0);
    ASSERT_TRUE(r.has_evaluation());
    EXPECT_EQ(r.evaluation().examples(), 64u);
  }
  EXPECT_NE(status.find("\"final_error\""), std::string::npos) << status;
  // The same recipe in one process with 2 virtual workers of 8 (1 thread, like the workers).
  backend::onednn::SetNumThreads(1);
  v1::JobSpec one = spec;
  one.set_world_size(1);
  one.set_virtual_workers_per_worker(2);
  one.set_checkpoint_dir(dir_ + "/ckpt_one");
  session::StandaloneOptions so;
  so.threads = 1;  // the workers' thread count: oneDNN's summation order depends on it
  so.history_file = dir_ + "/one_history.csv";
  auto r = session::RunStandalone(one, so);
  ASSERT_TRUE(r.ok()) << r.status();
  const double diff = MaxRelDiff(Params(dir_ + "/ckpt/ckpt-0000000144.safetensors"), Params(r->last_checkpoint));
  EXPECT_LT(diff, 1e-5) << "2 workers vs 1 worker x 2 virtual workers";
  // The BN running statistics too: the ranks' are averaged at each epoch's end.
  const double buffer_diff = MaxRelDiff(Params(dir_ + "/ckpt/ckpt-0000000144.safetensors", true),
                                        Params(r->last_checkpoint, true));
  EXPECT_LT(buffer_diff, 1e-5) << "BN running statistics: 2 workers vs 1 worker x 2 virtual workers";
  // The standalone history file holds the same epochs; the same weights give the same
  // validation errors (up to one of the 64 images flipping on a 1e-5 difference).
  auto one_history = ReadHistoryFile(so.history_file);
  ASSERT_TRUE(one_history.ok()) << one_history.status();
  ASSERT_EQ(one_history->size(), 3u);
  for (size_t e = 0; e < 3; ++e) {
    EXPECT_EQ((*one_history)[e].global_batch(), 16u);
    EXPECT_NEAR((*one_history)[e].evaluation().top1_error(), (*history)[e].evaluation().top1_error(), 1.0 / 64 + 1e-9)
        << "epoch " << e + 1;
  }
}

// gradient_exchange_dtype BF16: the job trains to success with its buckets on the wire as bf16
// (the worker says so; its weights are not the float32 run's), and its error stays near the
// float32 run's.
TEST_F(WorkerIntegrationTest, TwoWorkersTrainWithBf16GradientExchange) {
  const std::string addr = coord_->grpc_address();
  auto run = [&](const std::string& name, v1::GradientExchangeDtype dtype) {
    v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt_" + name, 768, 3);
    spec.set_gradient_exchange_dtype(dtype);
    const std::string job = Ctl(addr, {"submit", WriteJob(dir_, spec)});
    auto a = StartWorker(addr, job, 0, dir_ + "/" + name + "0.log");
    auto b = StartWorker(addr, job, 1, dir_ + "/" + name + "1.log");
    EXPECT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED")
        << ReadFileToString(dir_ + "/" + name + "0.log").value_or("");
    return Status(addr, job);
  };
  const v1::JobStatus fp32 = run("fp32", v1::GRADIENT_EXCHANGE_FP32);
  const v1::JobStatus bf16 = run("bf16", v1::GRADIENT_EXCHANGE_BF16);
  const std::string log = ReadFileToString(dir_ + "/bf160.log").value_or("");
  EXPECT_TRUE(absl::StrContains(log, ", bf16 on the wire")) << log;
  ASSERT_TRUE(fp32.has_last_evaluation() && bf16.has_last_evaluation());
  EXPECT_LE(std::abs(bf16.last_evaluation().top1_error() - fp32.last_evaluation().top1_error()), 4.0 / 64)
      << "bf16 " << bf16.last_evaluation().top1_error() << " fp32 " << fp32.last_evaluation().top1_error();
  const std::string last = "/ckpt-0000000144.safetensors";
  EXPECT_GT(MaxRelDiff(Params(dir_ + "/ckpt_bf16" + last), Params(dir_ + "/ckpt_fp32" + last)), 0.0)
      << "the bf16 sums changed nothing";
}

TEST_F(WorkerIntegrationTest, WorkerMetricsAreScrapedWhileTraining) {
  const v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 20);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log", {"--metrics_listen=127.0.0.1:0"});
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  std::string text;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    const std::string log = ReadFileToString(dir_ + "/w0.log").value_or("");
    const auto p = log.find("metrics on http://");
    if (p != std::string::npos) {
      const std::string hostport = log.substr(p + 18, log.find("/metrics", p) - p - 18);
      auto body = testing::HttpGet(hostport, "/metrics");
      if (body.ok() && Metric(*body, "lmsgd_worker_steps_total", {}) >= 20 &&
          Metric(*body, "lmsgd_worker_epoch", {}) >= 1 && Metric(*body, "lmsgd_worker_eval_top1_error", {}) >= 0) {
        text = *body;
        break;
      }
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_FALSE(text.empty()) << ReadFileToString(dir_ + "/w0.log").value_or("");
  const std::vector<std::string> me = {"job=\"" + job + "\"", "rank=\"0\""};
  for (const char* phase : {"data_wait", "forward", "backward", "exposed_communication", "optimizer"}) {
    std::vector<std::string> l = me;
    l.push_back(absl::StrCat("phase=\"", phase, "\""));
    EXPECT_GE(Metric(text, "lmsgd_worker_step_phase_seconds_total", l), 0.0) << phase << "\n" << text;
  }
  EXPECT_GT(Metric(text, "lmsgd_worker_step_phase_seconds_total", {"phase=\"forward\""}), 0.0);
  EXPECT_GT(Metric(text, "lmsgd_worker_allreduce_bytes_total", me), 0.0);
  EXPECT_GT(Metric(text, "lmsgd_worker_images_per_second", me), 0.0);
  EXPECT_GT(Metric(text, "lmsgd_worker_learning_rate", me), 0.0);
  EXPECT_GE(Metric(text, "lmsgd_worker_eval_top1_error", me), 0.0);
  EXPECT_EQ(Metric(text, "lmsgd_worker_generation", me), 1.0);
  Ctl(coord_->grpc_address(), {"cancel", job});
  (void)w0->Wait(absl::Seconds(30));
  (void)w1->Wait(absl::Seconds(30));
}

// A damaged data file is a clear, final job failure naming the file (not endless re-forming).
TEST_F(WorkerIntegrationTest, CorruptDatasetFailsTheJobNamingTheFile) {
  const std::string bad = dir_ + "/bad";
  std::filesystem::create_directories(bad);
  lmsgd::testing::WriteBarsIdx(bad, 768, 64, 12, 4);
  const std::string images = bad + "/train-images-idx3-ubyte";
  auto bytes = ReadFileToString(images);
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE(WriteFileAtomically(images, bytes->substr(0, bytes->size() / 2)).ok());
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, BarsJob(bad, dir_ + "/ckpt", 768, 2))});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  EXPECT_EQ(WaitForEnd(job, absl::Seconds(60)), "JOB_STATE_FAILED");
  const std::string status = Ctl(coord_->grpc_address(), {"--output=json", "status", job});
  EXPECT_NE(status.find("train-images-idx3-ubyte"), std::string::npos) << status;
  EXPECT_NE(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_NE(*w1->Wait(absl::Seconds(30)), 0);
}

// JPEGs end to end: a photo-like ImageFolder packed into tar shards by `lmsgdctl dataset pack`,
// trained on by two workers (crop-aware decoding, the antialiased resize) with evaluation on
// the validation shards; a member damaged later fails the next job naming the shard and member.
TEST_F(WorkerIntegrationTest, TwoWorkersTrainOnPackedJpegShards) {
  data::PhotoFolderOptions po;
  po.classes = 4;
  po.per_class = 16;
  po.seed = 2;
  ASSERT_TRUE(data::WritePhotoFolder(dir_ + "/photos", po).ok());
  const std::string shards = dir_ + "/shards";
  auto pack = testing::RunCommand({LMSGD_CTL_BIN, "dataset", "pack", dir_ + "/photos", shards, "--shard_size=1M"},
                                  absl::Seconds(60));
  ASSERT_EQ(pack.exit_code, 0) << pack.err;
  EXPECT_NE(pack.out.find("packed 64 images into"), std::string::npos) << pack.out;
  v1::JobSpec spec = BarsJob("", dir_ + "/ckpt_jpeg", 64, 2);
  spec.set_model(v1::MODEL_RESNET8);
  spec.mutable_dataset()->set_kind(v1::DATASET_TAR_SHARDS);
  spec.mutable_dataset()->set_train_path(shards);
  spec.mutable_dataset()->set_val_path(shards);
  spec.mutable_dataset()->set_image_size(32);
  spec.mutable_dataset()->set_val_examples(64);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  ASSERT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED")
      << Ctl(coord_->grpc_address(), {"status", job});
  EXPECT_EQ(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*w1->Wait(absl::Seconds(30)), 0);
  auto history = ParseHistoryCsv(Ctl(coord_->grpc_address(), {"--output=csv", "history", job}), "history");
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 2u);
  for (const auto& r : *history) {
    EXPECT_TRUE(r.has_evaluation()) << "epoch " << r.epoch();
    EXPECT_EQ(r.evaluation().examples(), 64u);
  }

  // A member damaged in place: the next job fails naming shard and key.
  const std::string shard = shards + "/shard-000000.tar";
  auto members = data::IndexTarFile(shard);
  ASSERT_TRUE(members.ok());
  std::string bytes = *ReadFileToString(shard);
  std::string damaged_key;
  for (const auto& m : *members) {
    if (absl::EndsWith(m.name, ".jpg")) {
      for (uint64_t i = 0; i < 32; ++i) bytes[m.offset + i] = 'x';
      damaged_key = m.name;
      break;
    }
  }
  ASSERT_TRUE(WriteFileAtomically(shard, bytes).ok());
  spec.set_checkpoint_dir(dir_ + "/ckpt_jpeg2");
  const std::string job2 = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto v0 = StartWorker(coord_->grpc_address(), job2, 0, dir_ + "/v0.log");
  auto v1w = StartWorker(coord_->grpc_address(), job2, 1, dir_ + "/v1.log");
  EXPECT_EQ(WaitForEnd(job2, absl::Seconds(120)), "JOB_STATE_FAILED");
  const std::string status = Ctl(coord_->grpc_address(), {"--output=json", "status", job2});
  EXPECT_NE(status.find("shard-000000.tar:" + damaged_key), std::string::npos) << status;
  // The rank whose shard of the epoch holds the member fails; its peer sees the job end.
  const int rc0 = *v0->Wait(absl::Seconds(30)), rc1 = *v1w->Wait(absl::Seconds(30));
  EXPECT_TRUE(rc0 != 0 || rc1 != 0) << rc0 << " " << rc1;
}

// Elastic: 3 workers with min_workers 2; one is killed and not replaced. After a heartbeat timeout
// the survivors re-form as 2 workers: kn 24 -> 16, the peak rate rescaled by the linear scaling
// rule (0.15 -> 0.1) with a short ramp from the old rate, resuming at the checkpoint's epoch.
TEST_F(WorkerIntegrationTest, ElasticJobShrinksAndRescalesTheLearningRate) {
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 4);
  spec.set_world_size(3);
  spec.set_min_workers(2);
  spec.set_max_workers(3);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  auto w2 = StartWorker(coord_->grpc_address(), job, 2, dir_ + "/w2.log");
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!std::filesystem::exists(dir_ + "/ckpt/ckpt-0000000032.safetensors") && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  w2->Signal(SIGKILL);
  (void)w2->Wait(absl::Seconds(10));
  EXPECT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED")
      << ReadFileToString(dir_ + "/w0.log").value_or("") << coord_->Log();
  const std::string status = Ctl(coord_->grpc_address(), {"--output=json", "status", job});
  EXPECT_NE(status.find("\"world_size\": 2,"), std::string::npos) << status;
  EXPECT_NE(status.find("\"global_batch\": \"16\""), std::string::npos) << status;
  EXPECT_NE(status.find("\"peak_lr\": 0.1,"), std::string::npos) << status;
  EXPECT_NE(status.find("\"rewarm_from_lr\": 0.15"), std::string::npos) << status;
  const std::string log0 = ReadFileToString(dir_ + "/w0.log").value_or("");
  EXPECT_NE(log0.find("kn 24 -> 16"), std::string::npos) << log0;
  EXPECT_EQ(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*w1->Wait(absl::Seconds(30)), 0);
}

// A worker that cannot serve the job (a CPU worker for a GPU job) is refused with a clear error,
// and an unavailable device is refused at startup.
// A running elastic job (2 of up to 3 workers) grows when a third worker joins: at its next
// checkpoint it re-forms with k = 3, the rate rescaled by the linear rule, and succeeds;
// `lmsgdctl status` lists both generations with their k and why.
TEST_F(WorkerIntegrationTest, ARunningElasticJobGrowsWhenAWorkerJoins) {
  testing::CoordinatorProcess coord(dir_ + "/grow", {"--heartbeat_interval=0.5s", "--heartbeat_timeout=3s",
                                                     "--grow_interval=0s"});
  std::filesystem::create_directories(dir_ + "/grow");
  ASSERT_TRUE(coord.Start().ok());
  const std::string addr = coord.grpc_address();
  const int epochs = 10;
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, epochs);
  spec.set_min_workers(2);
  spec.set_max_workers(3);
  const std::string job = Ctl(addr, {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(addr, job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(addr, job, 1, dir_ + "/w1.log");
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!std::filesystem::exists(dir_ + "/ckpt/ckpt-0000000048.safetensors") && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(Status(addr, job).world_size(), 2u);
  auto w2 = StartWorker(addr, job, 2, dir_ + "/w2.log");
  const absl::Time end = absl::Now() + absl::Seconds(120);
  std::string state;
  while (absl::Now() < end) {
    state = JobState(addr, job);
    if (state == "JOB_STATE_SUCCEEDED" || state == "JOB_STATE_FAILED" || state == "JOB_STATE_CANCELLED") break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  ASSERT_EQ(state, "JOB_STATE_SUCCEEDED") << ReadFileToString(dir_ + "/w2.log").value_or("") << coord.Log();
  for (auto* w : {w0.get(), w1.get(), w2.get()}) EXPECT_EQ(*w->Wait(absl::Seconds(30)), 0);
  const v1::JobStatus st = Status(addr, job);
  EXPECT_EQ(st.world_size(), 3u);
  EXPECT_EQ(st.schedule().global_batch(), 24u);
  EXPECT_DOUBLE_EQ(st.schedule().peak_lr(), 0.1 * 24 / 16);
  EXPECT_EQ(st.recoveries(), 0u) << "growth is not a recovery";
  ASSERT_EQ(st.generations_size(), 2) << st.DebugString();
  EXPECT_EQ(st.generations(0).world_size(), 2u);
  EXPECT_EQ(st.generations(0).global_batch(), 16u);
  const v1::GenerationRecord& grown = st.generations(1);
  EXPECT_EQ(grown.world_size(), 3u);
  EXPECT_DOUBLE_EQ(grown.peak_lr(), 0.15);
  EXPECT_GE(grown.resume_epoch(), 1u);
  EXPECT_LT(grown.resume_epoch(), static_cast<uint32_t>(epochs));
  EXPECT_TRUE(absl::StrContains(grown.reason(), "growing from 2 to 3 workers at the checkpoint of epoch")) << grown.reason();
  // The epochs after the growth were trained by 3 workers at kn = 24: 32 iterations each.
  ASSERT_EQ(st.history_size(), epochs);
  EXPECT_EQ(st.history(0).world_size(), 2u);
  EXPECT_EQ(st.history(epochs - 1).world_size(), 3u);
  EXPECT_EQ(st.history(epochs - 1).iteration(), 32u * epochs);
  EXPECT_TRUE(std::filesystem::exists(dir_ + absl::StrFormat("/ckpt/ckpt-%010d.safetensors", 32 * epochs)));
  const std::string table = Ctl(addr, {"status", job});
  EXPECT_TRUE(absl::StrContains(table, "generation 2")) << table;
  EXPECT_TRUE(absl::StrContains(table, "k=3 kn=24 peak lr 0.15")) << table;
}

// The flight recorder's verdict: in a 4-rank job (one host: the shared-memory allreduce) one rank
// is killed mid-training; the survivors' collectives fail and report, the killed rank never
// answers, and the job's message names it, not a survivor. A replacement then finishes the job.
TEST_F(WorkerIntegrationTest, AKilledRankIsNamedInTheJobsMessageNotASurvivor) {
  const std::string addr = coord_->grpc_address();
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 4);
  spec.set_world_size(4);
  const std::string job = Ctl(addr, {"submit", WriteJob(dir_, spec)});
  std::vector<std::unique_ptr<testing::Subprocess>> w;
  for (int d = 0; d < 4; ++d) w.push_back(StartWorker(addr, job, d, absl::StrCat(dir_, "/w", d, ".log")));
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!std::filesystem::exists(dir_ + "/ckpt/ckpt-0000000024.safetensors") && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  const v1::JobStatus running = Status(addr, job);
  std::string victim;
  for (const auto& wi : running.workers()) {
    if (wi.rank() == 2) victim = wi.worker_id();
  }
  ASSERT_FALSE(victim.empty()) << running.DebugString();
  absl::SleepFor(absl::Milliseconds(150));  // into the next epoch's collectives
  w[2]->Signal(SIGKILL);
  (void)w[2]->Wait(absl::Seconds(10));
  std::string msg;
  const absl::Time until = absl::Now() + absl::Seconds(20);
  while (absl::Now() < until) {
    msg = Status(addr, job).message();
    if (absl::StartsWith(msg, "rank ")) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  RecordProperty("job_message", msg);
  EXPECT_TRUE(absl::StartsWith(msg, absl::StrCat("rank 2 (", victim))) << msg;
  EXPECT_TRUE(absl::StrContains(msg, "stopped responding")) << msg;
  for (int r : {0, 1, 3}) EXPECT_FALSE(absl::StartsWith(msg, absl::StrCat("rank ", r, " ("))) << msg;
  w[2] = StartWorker(addr, job, 2, dir_ + "/w2b.log");
  ASSERT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED")
      << ReadFileToString(dir_ + "/w2b.log").value_or("");
  const v1::JobStatus done = Status(addr, job);
  ASSERT_EQ(done.generations_size(), 2);
  EXPECT_TRUE(absl::StartsWith(done.generations(1).reason(), absl::StrCat("rank 2 (", victim)))
      << done.generations(1).reason();
  // Each survivor logged its flight recorder when its collective failed or its wait ended.
  int logged = 0;
  for (int d : {0, 1, 3}) {
    logged += absl::StrContains(ReadFileToString(absl::StrCat(dir_, "/w", d, ".log")).value_or(""),
                                "flight recorder of rank");
  }
  EXPECT_GE(logged, 1);
}

TEST_F(WorkerIntegrationTest, IncompatibleWorkersAreRefusedClearly) {
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 2);
  spec.set_device(v1::DEVICE_CUDA);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w.log");
  EXPECT_EQ(*w->Wait(absl::Seconds(30)), 1);
  const std::string log = ReadFileToString(dir_ + "/w.log").value_or("");
  EXPECT_NE(log.find("trains on DEVICE_CUDA but this worker offers DEVICE_CPU"), std::string::npos) << log;
  auto gpu = testing::RunCommand({LMSGD_WORKER_BIN, "--coordinator=" + coord_->grpc_address(), "--device=cuda:0"});
  EXPECT_EQ(gpu.exit_code, 2);
  EXPECT_NE(gpu.err.find("--device cuda:0"), std::string::npos) << gpu.err;
}

// kill -9 of the coordinator while workers train: they keep training (collectives are peer to
// peer) and keep retrying their RPCs; the coordinator restarted on the same address and state
// dir picks the job up and the job succeeds.
TEST_F(WorkerIntegrationTest, CoordinatorKilledAndRestartedWhileWorkersTrain) {
  RestartableJob r = StartRestartableJob("coord2", "10s");
  testing::CoordinatorProcess& coord = *r.coord;
  const std::string addr = r.addr, job = r.job;
  auto& w0 = r.w0;
  auto& w1 = r.w1;
  coord.Kill9();
  absl::SleepFor(absl::Seconds(1));
  ASSERT_TRUE(coord.Start().ok()) << coord.Log();
  ASSERT_EQ(coord.grpc_address(), addr);
  std::string state;
  const absl::Time end = absl::Now() + absl::Seconds(120);
  while (absl::Now() < end) {
    state = JobState(addr, job);
    if (state == "JOB_STATE_SUCCEEDED" || state == "JOB_STATE_FAILED") break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_EQ(state, "JOB_STATE_SUCCEEDED") << ReadFileToString(dir_ + "/w0.log").value_or("") << coord.Log();
  EXPECT_EQ(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*w1->Wait(absl::Seconds(30)), 0);
}

// Two workers started on one host without --local_device, as a new user would: each claims
// a free slot (0 and 1), both train; a third given a held slot explicitly is refused saying
// what to do.
TEST_F(WorkerIntegrationTest, TwoWorkersWithoutLocalDeviceBothTrain) {
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, BarsJob(data_, dir_ + "/ckpt", 768, 2))});
  std::vector<std::unique_ptr<testing::Subprocess>> workers;
  for (int i = 0; i < 2; ++i) {
    workers.push_back(std::make_unique<testing::Subprocess>());
    ASSERT_TRUE(workers.back()
                    ->Start({LMSGD_WORKER_BIN, "--coordinator=" + coord_->grpc_address(), "--job=" + job,
                             "--threads=1", "--host=localhost", "--slot_dir=" + dir_ + "/slots",
                             // 96 steps of at least 20 ms: the job still runs when the third comes.
                             "--test_data_delay_ms=20"},
                            absl::StrCat(dir_, "/auto", i, ".log"))
                    .ok());
  }
  const absl::Time running_by = absl::Now() + absl::Seconds(60);
  while (JobState(coord_->grpc_address(), job) != "JOB_STATE_RUNNING" && absl::Now() < running_by) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  auto third = testing::RunCommand({LMSGD_WORKER_BIN, "--coordinator=" + coord_->grpc_address(), "--job=" + job,
                                    "--threads=1", "--host=localhost", "--slot_dir=" + dir_ + "/slots",
                                    "--local_device=1"},
                                   absl::Seconds(30));
  EXPECT_NE(third.exit_code, 0);
  EXPECT_NE((third.out + third.err).find("local device 1 of host localhost"), std::string::npos) << third.err;
  EXPECT_NE((third.out + third.err).find("another --local_device"), std::string::npos) << third.err;
  EXPECT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED");
  std::set<std::string> slots;
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(*workers[i]->Wait(absl::Seconds(30)), 0);
    const std::string log = ReadFileToString(absl::StrCat(dir_, "/auto", i, ".log")).value_or("");
    for (const char* s : {"local device 0 (the lowest free slot)", "local device 1 (the lowest free slot)"}) {
      if (log.find(s) != std::string::npos) slots.insert(s);
    }
  }
  EXPECT_EQ(slots.size(), 2u) << "each worker claimed its own slot";
}

// Stragglers: of three workers one is slowed (a test-only flag sleeps 150 ms while it waits
// for each batch). The coordinator names it, with its host, in the status and counts it in a
// metric; its fast peers, which only wait for it in the allreduce, are not flagged.
TEST_F(WorkerIntegrationTest, ASlowedWorkerIsNamedAStragglerAndItsPeersAreNot) {
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 3);
  spec.set_world_size(3);
  spec.set_reference_batch(24);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  auto w2 = StartWorker(coord_->grpc_address(), job, 2, dir_ + "/w2.log", {"--test_data_delay_ms=150"});
  std::string status;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline) {
    status = Ctl(coord_->grpc_address(), {"status", job});
    if (status.find("straggler ") != std::string::npos || status.find("succeeded") != std::string::npos) break;
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_NE(status.find("straggler        rank 2 on localhost"), std::string::npos) << status;
  int flagged = 0;
  for (absl::string_view line : absl::StrSplit(status, '\n')) {
    if (absl::StrContains(line, "STRAGGLER")) {
      ++flagged;
      EXPECT_TRUE(absl::StartsWith(line, "  rank 2")) << line;
    }
  }
  EXPECT_EQ(flagged, 1) << status;
  EXPECT_NE(status.find("step ms: data"), std::string::npos) << status;
  auto metrics = testing::HttpGet(coord_->metrics_address(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_GE(Metric(*metrics, "lmsgd_stragglers_flagged_total", {"rank=\"2\"", "host=\"localhost\""}), 1.0);
  EXPECT_TRUE(std::isnan(Metric(*metrics, "lmsgd_stragglers_flagged_total", {"rank=\"0\""})));
  EXPECT_GT(Metric(*metrics, "lmsgd_rank_busy_ratio", {"rank=\"2\""}), 1.5);
  EXPECT_LT(Metric(*metrics, "lmsgd_rank_busy_ratio", {"rank=\"0\""}), 1.5);
  EXPECT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED");
  for (auto* w : {w0.get(), w1.get(), w2.get()}) EXPECT_EQ(*w->Wait(absl::Seconds(30)), 0);
}

// A coordinator restart costs no work: with a 3 s heartbeat timeout, the coordinator is killed
// with kill -9 and restarted on its address three times during training (1.5 s outages). The
// workers' reconnect backoff is bounded below the heartbeat interval's order and the restart
// gives every member the timeout plus that backoff, so no live worker is declared dead: the
// generation never changes and every epoch is trained once.
TEST_F(WorkerIntegrationTest, CoordinatorRestartsCostNoWork) {
  RestartableJob r = StartRestartableJob("coord3", "3s");
  testing::CoordinatorProcess& coord = *r.coord;
  const std::string addr = r.addr, job = r.job;
  auto& w0 = r.w0;
  auto& w1 = r.w1;
  std::string logs;
  for (int restart = 0; restart < 3; ++restart) {
    coord.Kill9();
    absl::SleepFor(absl::Milliseconds(1500));
    ASSERT_TRUE(coord.Start().ok()) << coord.Log();
    absl::SleepFor(absl::Seconds(4));  // longer than the heartbeat timeout
    logs += coord.Log();
  }
  std::string state;
  const absl::Time end = absl::Now() + absl::Seconds(120);
  while (absl::Now() < end) {
    state = JobState(addr, job);
    if (state == "JOB_STATE_SUCCEEDED" || state == "JOB_STATE_FAILED") break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  logs += coord.Log();
  EXPECT_EQ(state, "JOB_STATE_SUCCEEDED") << logs;
  const std::string status = Ctl(addr, {"--output=json", "status", job});
  EXPECT_NE(status.find("\"generation\": \"1\""), std::string::npos) << status;
  EXPECT_EQ(logs.find("silent for"), std::string::npos) << logs;
  EXPECT_EQ(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*w1->Wait(absl::Seconds(30)), 0);
  // Every epoch once, in generation 1.
  auto history = ParseHistoryCsv(Ctl(addr, {"--output=csv", "history", job}), "history");
  ASSERT_TRUE(history.ok()) << history.status();
  ASSERT_EQ(history->size(), 12u);
  for (const auto& r : *history) EXPECT_EQ(r.generation(), 1u) << "epoch " << r.epoch();
}

TEST_F(WorkerIntegrationTest, KilledWorkerIsReplacedAndTrainingResumesFromTheCheckpoint) {
  const int epochs = 6;
  // Uninterrupted reference run.
  v1::JobSpec ref_spec = BarsJob(data_, dir_ + "/ckpt_ref", 768, epochs);
  const std::string ref_job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, ref_spec)});
  {
    auto a = StartWorker(coord_->grpc_address(), ref_job, 0, dir_ + "/ref0.log");
    auto b = StartWorker(coord_->grpc_address(), ref_job, 1, dir_ + "/ref1.log");
    ASSERT_EQ(WaitForEnd(ref_job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED");
  }
  // The same job, with worker 1 killed after the second checkpoint.
  v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, epochs);
  const std::string job = Ctl(coord_->grpc_address(), {"submit", WriteJob(dir_, spec)});
  auto w0 = StartWorker(coord_->grpc_address(), job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1.log");
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!std::filesystem::exists(dir_ + "/ckpt/ckpt-0000000096.safetensors") && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  w1->Signal(SIGKILL);
  (void)w1->Wait(absl::Seconds(10));
  auto w1b = StartWorker(coord_->grpc_address(), job, 1, dir_ + "/w1b.log");
  EXPECT_EQ(WaitForEnd(job, absl::Seconds(180)), "JOB_STATE_SUCCEEDED")
      << ReadFileToString(dir_ + "/w0.log").value_or("") << ReadFileToString(dir_ + "/w1b.log").value_or("");
  const std::string status = Ctl(coord_->grpc_address(), {"--output=json", "status", job});
  EXPECT_NE(status.find("\"recoveries\""), std::string::npos) << status;
  const std::string w1b_log = ReadFileToString(dir_ + "/w1b.log").value_or("");
  EXPECT_NE(w1b_log.find("resuming from"), std::string::npos) << w1b_log;
  const std::string last = absl::StrCat("/ckpt-", std::string(10 - std::to_string(48 * epochs).size(), '0'),
                                        48 * epochs, ".safetensors");
  EXPECT_EQ(MaxRelDiff(Params(dir_ + "/ckpt" + last), Params(dir_ + "/ckpt_ref" + last)), 0.0)
      << "resumed run differs from the uninterrupted one";
}


// `lmsgdctl resubmit`: a job cancelled after its second epoch's checkpoint, resubmitted, goes on
// at that iteration (INIT_CONTINUE) and ends with bitwise the uninterrupted run's weights.
TEST_F(WorkerIntegrationTest, ACancelledJobResubmittedEndsWithTheUninterruptedRunsWeights) {
  const int epochs = 5;
  const std::string addr = coord_->grpc_address();
  const std::string ref_job = Ctl(addr, {"submit", WriteJob(dir_, BarsJob(data_, dir_ + "/ckpt_ref", 768, epochs))});
  {
    auto a = StartWorker(addr, ref_job, 0, dir_ + "/ref0.log");
    auto b = StartWorker(addr, ref_job, 1, dir_ + "/ref1.log");
    ASSERT_EQ(WaitForEnd(ref_job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED");
  }
  const std::string job = Ctl(addr, {"submit", WriteJob(dir_, BarsJob(data_, dir_ + "/ckpt", 768, epochs))});
  auto w0 = StartWorker(addr, job, 0, dir_ + "/w0.log");
  auto w1 = StartWorker(addr, job, 1, dir_ + "/w1.log");
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!std::filesystem::exists(dir_ + "/ckpt/ckpt-0000000096.safetensors") && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  Ctl(addr, {"cancel", job, "--reason", "operator"});
  ASSERT_EQ(WaitForEnd(job, absl::Seconds(30)), "JOB_STATE_CANCELLED");
  EXPECT_EQ(*w0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*w1->Wait(absl::Seconds(30)), 0);
  const v1::JobStatus cancelled = Status(addr, job);
  ASSERT_FALSE(cancelled.last_checkpoint().path().empty());
  ASSERT_LT(cancelled.last_checkpoint().epoch(), static_cast<uint32_t>(epochs)) << "cancelled too late to test";

  auto r = testing::RunCommand({LMSGD_CTL_BIN, "--coordinator=" + addr, "resubmit", job});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string again(absl::StripTrailingAsciiWhitespace(r.out));
  EXPECT_NE(again, job);
  EXPECT_TRUE(absl::StrContains(r.err, absl::StrCat("continuing ", job, " from ", cancelled.last_checkpoint().path())))
      << r.err;
  const v1::JobStatus submitted = Status(addr, again);
  EXPECT_EQ(submitted.spec().init_mode(), v1::INIT_CONTINUE);
  EXPECT_EQ(submitted.spec().init_checkpoint(), cancelled.last_checkpoint().path());
  auto w2 = StartWorker(addr, again, 0, dir_ + "/w2.log");
  auto w3 = StartWorker(addr, again, 1, dir_ + "/w3.log");
  ASSERT_EQ(WaitForEnd(again, absl::Seconds(120)), "JOB_STATE_SUCCEEDED")
      << ReadFileToString(dir_ + "/w2.log").value_or("");
  const std::string log2 = ReadFileToString(dir_ + "/w2.log").value_or("");
  EXPECT_TRUE(absl::StrContains(
      log2, absl::StrCat("run at epoch ", cancelled.last_checkpoint().epoch(), ", iteration ",
                         cancelled.last_checkpoint().iteration())))
      << log2;
  // It trained only the epochs that were left.
  const v1::JobStatus done = Status(addr, again);
  ASSERT_GT(done.history_size(), 0);
  EXPECT_EQ(done.history(0).epoch(), cancelled.last_checkpoint().epoch() + 1);
  EXPECT_EQ(done.history(done.history_size() - 1).epoch(), static_cast<uint32_t>(epochs));
  const std::string last = absl::StrFormat("/ckpt-%010d.safetensors", 48 * epochs);
  EXPECT_EQ(MaxRelDiff(Params(dir_ + "/ckpt" + last), Params(dir_ + "/ckpt_ref" + last)), 0.0)
      << "the resubmitted run differs from the uninterrupted one";
  EXPECT_EQ(MaxRelDiff(Params(dir_ + "/ckpt" + last, true), Params(dir_ + "/ckpt_ref" + last, true)), 0.0);
  // A job that succeeded has nothing to continue.
  auto refused = testing::RunCommand({LMSGD_CTL_BIN, "--coordinator=" + addr, "resubmit", ref_job});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(refused.err, "succeeded: there is nothing to continue")) << refused.err;
}

// `lmsgdctl evaluate`: two workers split the validation set of a trained job's final
// checkpoint; the counts are the training run's own last evaluation of those weights.
TEST_F(WorkerIntegrationTest, AnEvaluationJobGivesTheTrainingRunsLastEvaluation) {
  const std::string addr = coord_->grpc_address();
  const v1::JobSpec spec = BarsJob(data_, dir_ + "/ckpt", 768, 3);
  const std::string job_file = WriteJob(dir_, spec);
  const std::string job = Ctl(addr, {"submit", job_file});
  {
    auto a = StartWorker(addr, job, 0, dir_ + "/t0.log");
    auto b = StartWorker(addr, job, 1, dir_ + "/t1.log");
    ASSERT_EQ(WaitForEnd(job, absl::Seconds(120)), "JOB_STATE_SUCCEEDED");
  }
  const v1::JobStatus trained = Status(addr, job);
  const std::string ckpt = trained.last_checkpoint().path();
  ASSERT_FALSE(ckpt.empty());
  ASSERT_EQ(trained.last_evaluation().epoch(), 3u);

  testing::Subprocess ctl;
  ASSERT_TRUE(ctl.Start({LMSGD_CTL_BIN, "--coordinator=" + addr, "evaluate", ckpt, "--job", job_file,
                         "--world_size", "2"},
                        dir_ + "/evaluate.log")
                  .ok());
  auto e0 = StartWorker(addr, "", 0, dir_ + "/e0.log");  // the next job that needs workers
  auto e1 = StartWorker(addr, "", 1, dir_ + "/e1.log");
  auto rc = ctl.Wait(absl::Seconds(120));
  const std::string out = ReadFileToString(dir_ + "/evaluate.log").value_or("");
  ASSERT_TRUE(rc.ok()) << out;
  ASSERT_EQ(*rc, 0) << out << ReadFileToString(dir_ + "/e0.log").value_or("");
  const std::string eval_job = out.substr(0, out.find(':'));
  EXPECT_TRUE(absl::StrContains(out, absl::StrCat(eval_job, " succeeded: evaluated ", ckpt, ": top-1 error "))) << out;
  const v1::JobStatus evaluated = Status(addr, eval_job);
  EXPECT_EQ(evaluated.spec().mode(), v1::JOB_MODE_EVALUATE);
  EXPECT_EQ(evaluated.world_size(), 2u);
  ASSERT_TRUE(evaluated.has_last_evaluation());
  EXPECT_EQ(evaluated.last_evaluation().examples(), trained.last_evaluation().examples());
  EXPECT_EQ(evaluated.last_evaluation().top1_error(), trained.last_evaluation().top1_error());
  EXPECT_EQ(evaluated.last_evaluation().top5_error(), trained.last_evaluation().top5_error());
  EXPECT_EQ(evaluated.last_evaluation().epoch(), 3u);  // the checkpoint's epoch
  EXPECT_TRUE(evaluated.last_checkpoint().path().empty()) << "an evaluation writes no checkpoint";
  EXPECT_EQ(evaluated.progress().iteration(), 0u) << "an evaluation trains no step";
  EXPECT_EQ(*e0->Wait(absl::Seconds(30)), 0);
  EXPECT_EQ(*e1->Wait(absl::Seconds(30)), 0);

  // The same in one process (`lmsgd-worker --standalone` on the same job file).
  v1::JobSpec one = spec;
  one.set_world_size(1);
  one.set_mode(v1::JOB_MODE_EVALUATE);
  one.set_init_checkpoint(ckpt);
  one.clear_checkpoint_dir();
  session::StandaloneOptions so;
  so.threads = 1;
  auto r = session::RunStandalone(one, so);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->epochs.size(), 1u);
  EXPECT_EQ(r->iterations, 0u);
  EXPECT_EQ(r->epochs[0].eval.examples, trained.last_evaluation().examples());
  EXPECT_DOUBLE_EQ(1 - static_cast<double>(r->epochs[0].eval.top1_correct) / r->epochs[0].eval.examples,
                   trained.last_evaluation().top1_error());
}

// `lmsgdctl experiment run`: a two-arm sweep (kn 8 and 16 through virtual workers) in the
// ctl's own process, resumed without redoing an arm, re-rendered from its CSVs; then the same
// sweep through the coordinator with one `lmsgd-worker --serve` taking the jobs in turn.
TEST_F(WorkerIntegrationTest, ExperimentRunsStandaloneAndThroughTheCoordinator) {
  v1::Experiment x;
  x.set_name("it");
  *x.mutable_base() = BarsJob(data_, "", 768, 2);
  x.mutable_base()->set_world_size(1);
  x.mutable_sweep()->add_kn(8);
  x.mutable_sweep()->add_kn(16);
  x.set_reference("kn8");
  std::string text;
  google::protobuf::TextFormat::PrintToString(x, &text);
  const std::string file = dir_ + "/experiment.textproto";
  ASSERT_TRUE(WriteFileAtomically(file, text).ok());

  auto check_report = [](const std::string& out) -> std::vector<double> {
    auto runs = CsvTable::Parse(ReadFileToString(out + "/runs.csv").value_or(""), "runs.csv");
    EXPECT_TRUE(runs.ok()) << runs.status();
    if (!runs.ok()) return {};
    EXPECT_EQ(runs->rows(), 2u);
    std::vector<double> errors;
    for (size_t i = 0; i < runs->rows(); ++i) {
      EXPECT_EQ(runs->Get(i, "state"), "succeeded");
      EXPECT_EQ(runs->Get(i, "kn"), i == 0 ? "8" : "16");
      EXPECT_EQ(runs->Get(i, "peak_lr"), i == 0 ? "0.05" : "0.1");  // 0.1 per 16, linear
      auto e = runs->GetDouble(i, "top1_error");
      EXPECT_TRUE(e.ok()) << e.status();
      errors.push_back(e.value_or(-1));
      EXPECT_GE(errors.back(), 0);
      EXPECT_LE(errors.back(), 1);
      EXPECT_EQ(runs->Get(i, "final_epochs"), "2");
    }
    auto history = CsvTable::Parse(ReadFileToString(out + "/history.csv").value_or(""), "history.csv");
    EXPECT_TRUE(history.ok()) << history.status();
    if (history.ok()) {
      EXPECT_EQ(history->rows(), 4u);  // 2 runs x 2 epochs
    }
    const std::string table = ReadFileToString(out + "/table.md").value_or("");
    EXPECT_TRUE(absl::StrContains(table, "| kn8 | 8 | 0.05 |")) << table;
    EXPECT_TRUE(absl::StrContains(table, "| reference |")) << table;
    EXPECT_TRUE(absl::StrContains(table, "| kn16 | 16 | 0.1 |")) << table;
    for (const char* plot : {"/error_vs_kn", "/curves_kn16"}) {
      EXPECT_TRUE(absl::StartsWith(ReadFileToString(out + plot + ".png").value_or(""), "\x89PNG")) << plot;
      EXPECT_TRUE(absl::StrContains(ReadFileToString(out + plot + ".svg").value_or(""), "<svg")) << plot;
    }
    return errors;
  };

  // Standalone, in lmsgdctl's process.
  const std::string solo = dir_ + "/solo";
  auto run = testing::RunCommand({LMSGD_CTL_BIN, "experiment", "run", file, "--standalone", "--threads=1",
                                  "--out=" + solo},
                                 absl::Seconds(180));
  ASSERT_EQ(run.exit_code, 0) << run.out << run.err;
  EXPECT_TRUE(absl::StrContains(run.out, "[1/2] kn8.seed21: kn 8 (k 1 x m 1 x n 8), peak lr 0.05")) << run.out;
  const std::vector<double> solo_errors = check_report(solo);
  // Again: both arms are done, nothing is trained.
  auto again = testing::RunCommand({LMSGD_CTL_BIN, "experiment", "run", file, "--standalone", "--out=" + solo},
                                   absl::Seconds(60));
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  EXPECT_TRUE(absl::StrContains(again.out, "[1/2] kn8.seed21: done before")) << again.out;
  EXPECT_TRUE(absl::StrContains(again.out, "[2/2] kn16.seed21: done before")) << again.out;
  // The report re-renders from the CSVs alone.
  std::filesystem::remove(solo + "/error_vs_kn.png");
  std::filesystem::remove(solo + "/table.md");
  auto report = testing::RunCommand({LMSGD_CTL_BIN, "experiment", "report", solo});
  ASSERT_EQ(report.exit_code, 0) << report.out << report.err;
  EXPECT_EQ(check_report(solo), solo_errors);

  // Through the coordinator: one serving worker takes the two jobs in turn.
  auto worker = std::make_unique<testing::Subprocess>();
  ASSERT_TRUE(worker->Start({LMSGD_WORKER_BIN, "--coordinator=" + coord_->grpc_address(), "--serve", "--threads=1",
                             "--host=localhost"},
                            dir_ + "/serve.log")
                  .ok());
  const std::string coord_dir = dir_ + "/coord_report";
  auto through = testing::RunCommand({LMSGD_CTL_BIN, "--coordinator=" + coord_->grpc_address(), "experiment", "run",
                                      file, "--out=" + coord_dir},
                                     absl::Seconds(240));
  ASSERT_EQ(through.exit_code, 0) << through.out << through.err << ReadFileToString(dir_ + "/serve.log").value_or("");
  const std::vector<double> coord_errors = check_report(coord_dir);
  const std::string job0 = ReadFileToString(coord_dir + "/runs/kn8.seed21.job").value_or("");
  const std::string job1 = ReadFileToString(coord_dir + "/runs/kn16.seed21.job").value_or("");
  EXPECT_FALSE(job0.empty());
  EXPECT_NE(job0, job1);
  EXPECT_EQ(JobState(coord_->grpc_address(), job1), "JOB_STATE_SUCCEEDED");
  EXPECT_TRUE(worker->running()) << "a serving worker waits for the next job";
  // The same recipes (k = 1, the same m and seed) give the same errors either way.
  ASSERT_EQ(coord_errors.size(), solo_errors.size());
  for (size_t i = 0; i < coord_errors.size(); ++i) EXPECT_NEAR(coord_errors[i], solo_errors[i], 1.0 / 64 + 1e-9);
}

}  // namespace
}  // namespace lmsgd
