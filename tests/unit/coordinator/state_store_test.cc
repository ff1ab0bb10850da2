#include "coordinator/state_store.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"

namespace lmsgd::coordinator {
namespace {

TEST(FileStateStoreTest, SaveLoadAndCorruptRecordSetAside) {
  char tmpl[] = "/tmp/lmsgd_store_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  auto store = FileStateStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  for (int i = 1; i <= 3; ++i) {
    v1::JobStatus j;
    j.set_job_id(JobIdFromSeq(i));
    j.set_state(v1::JOB_STATE_RUNNING);
    j.set_generation(i);
    ASSERT_TRUE((*store)->SaveJob(j).ok());
  }
  // Damage job 2; leave a stray temp file as a crash would.
  const std::string victim = dir + "/jobs/job-000002.job";
  std::string raw = *ReadFileToString(victim);
  raw[raw.size() - 1] ^= 1;
  ASSERT_TRUE(WriteFileAtomically(victim, raw).ok());
  ASSERT_TRUE(WriteFileAtomically(dir + "/jobs/job-000004.job.tmp.1.2.3", "junk").ok());

  auto loaded = (*store)->Load();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->jobs.size(), 2u);
  EXPECT_EQ(loaded->jobs[0].job_id(), "job-000001");
  EXPECT_EQ(loaded->jobs[1].generation(), 3u);
  ASSERT_EQ(loaded->errors.size(), 1u);
  EXPECT_TRUE(absl::StrContains(loaded->errors[0], "job-000002.job")) << loaded->errors[0];
  EXPECT_EQ(loaded->max_job_seq, 3u);
  // Moved aside, still counted for id allocation; the temp file is gone.
  auto again = (*store)->Load();
  EXPECT_EQ(again->errors.size(), 0u);
  EXPECT_EQ(again->max_job_seq, 3u);
  auto files = ListFiles(dir + "/jobs");
  EXPECT_EQ(files->size(), 3u);
}

TEST(FileStateStoreTest, OneStorePerDirectoryAndTheLockGoesWithIt) {
  char tmpl[] = "/tmp/lmsgd_store_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  {
    auto first = FileStateStore::Open(dir);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(*ReadFileToString(dir + "/LOCK"), absl::StrCat(getpid(), "\n"));
    auto second = FileStateStore::Open(dir);
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_TRUE(absl::StrContains(second.status().message(), dir)) << second.status();
    EXPECT_TRUE(absl::StrContains(second.status().message(), absl::StrCat("pid ", getpid()))) << second.status();
  }
  // Released with the store (and by the kernel when its process dies).
  auto again = FileStateStore::Open(dir);
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST(FileStateStoreTest, UnwritableDirectoryIsAnError) {
  auto store = FileStateStore::Open("/proc/lmsgd-cannot-exist");
  EXPECT_FALSE(store.ok());
  EXPECT_TRUE(absl::StrContains(store.status().message(), "/proc/lmsgd-cannot-exist")) << store.status();
}

TEST(JobIdTest, RoundTrip) {
  EXPECT_EQ(JobIdFromSeq(42), "job-000042");
  EXPECT_EQ(JobSeqFromId("job-000042"), 42u);
  EXPECT_EQ(JobSeqFromId("nope"), 0u);
  EXPECT_EQ(JobIdFromSeq(1234567), "job-1234567");
}

}  // namespace
}  // namespace lmsgd::coordinator
