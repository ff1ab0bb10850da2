#include "coordinator/ctl/ctl.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <sstream>

#include "absl/strings/match.h"

namespace lmsgd::ctl {
namespace {

int RunIt(const std::vector<std::string>& args, std::string* out, std::string* err) {
  std::ostringstream o, e;
  int rc = RunCtl(args, o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(CtlTest, UsageErrors) {
  std::string out, err;
  EXPECT_EQ(RunIt({}, &out, &err), 2);
  EXPECT_TRUE(absl::StrContains(err, "usage:"));
  EXPECT_EQ(RunIt({"frobnicate"}, &out, &err), 2);
  EXPECT_TRUE(absl::StrContains(err, "unknown command 'frobnicate'"));
  EXPECT_EQ(RunIt({"--output", "yaml", "list"}, &out, &err), 2);
  EXPECT_TRUE(absl::StrContains(err, "--output must be"));
  EXPECT_EQ(RunIt({"status"}, &out, &err), 2);
  EXPECT_EQ(RunIt({"--bogus=1", "list"}, &out, &err), 2);
  EXPECT_TRUE(absl::StrContains(err, "unknown flag --bogus"));
}

TEST(CtlTest, SubmitValidatesLocallyNamingFileAndFields) {
  std::string out, err;
  EXPECT_EQ(RunIt({"submit", "/nonexistent/job.textproto"}, &out, &err), 1);
  EXPECT_TRUE(absl::StrContains(err, "/nonexistent/job.textproto")) << err;
  char path[] = "/tmp/lmsgd_ctl_job_XXXXXX.textproto";
  int fd = mkstemps(path, 10);
  ASSERT_GE(fd, 0);
  const std::string body = "world_size: 2\nmomentum: 3\n";
  ASSERT_EQ(write(fd, body.data(), body.size()), static_cast<ssize_t>(body.size()));
  close(fd);
  // Invalid spec: fails before any RPC (the coordinator address is unreachable on purpose).
  EXPECT_EQ(RunIt({"--coordinator", "127.0.0.1:1", "submit", path}, &out, &err), 1);
  EXPECT_TRUE(absl::StrContains(err, "dataset.kind")) << err;
  EXPECT_TRUE(absl::StrContains(err, "momentum")) << err;
  EXPECT_FALSE(absl::StrContains(err, "cannot reach")) << err;
}

TEST(CtlTest, ProgressLine) {
  v1::JobStatus j;
  j.set_job_id("job-000001");
  j.set_state(v1::JOB_STATE_RUNNING);
  j.mutable_spec()->set_epochs(90);
  j.mutable_schedule()->set_iterations_per_epoch(100);
  j.mutable_progress()->set_iteration(250);
  j.mutable_progress()->set_epoch(2);
  j.mutable_progress()->set_lr(0.5);
  std::string line = FormatProgressLine(j, 10);
  EXPECT_TRUE(absl::StrContains(line, "[#####.....]")) << line;
  EXPECT_TRUE(absl::StrContains(line, "epoch 2/90")) << line;
  EXPECT_TRUE(absl::StrContains(line, "running")) << line;
}

}  // namespace
}  // namespace lmsgd::ctl
