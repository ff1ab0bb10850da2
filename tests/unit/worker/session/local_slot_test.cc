// Local device slots: the lowest free one, the launcher's index, a held explicit index named
// with its holder's pid, a dead holder's slot taken over with its incarnation, and separate
// coordinators and hosts kept apart.
#include "worker/session/local_slot.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/unit/worker/test_data.h"

namespace lmsgd::session {
namespace {

class LocalSlotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = lmsgd::testing::MakeTempDir("slots");
    unsetenv("LOCAL_RANK");
    unsetenv("SLURM_LOCALID");
    unsetenv("JOB_COMPLETION_INDEX");
  }
  void TearDown() override {
    unsetenv("LOCAL_RANK");
    std::filesystem::remove_all(dir_);
  }
  std::string dir_;
};

TEST_F(LocalSlotTest, AutomaticSlotsAreTheLowestFreeOnesAndExplicitClashesNameTheHolder) {
  auto a = LocalSlot::Claim(dir_, "127.0.0.1:7070", "vm", -1, "inc-a");
  auto b = LocalSlot::Claim(dir_, "127.0.0.1:7070", "vm", -1, "inc-b");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->index(), 0);
  EXPECT_EQ((*b)->index(), 1);
  EXPECT_EQ((*a)->source(), "the lowest free slot");
  auto clash = LocalSlot::Claim(dir_, "127.0.0.1:7070", "vm", 1, "inc-c");
  ASSERT_FALSE(clash.ok());
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(absl::StrContains(clash.status().message(), absl::StrCat("pid ", getpid()))) << clash.status();
  EXPECT_TRUE(absl::StrContains(clash.status().message(), "another --local_device")) << clash.status();
  // Other coordinators and other host names have slots of their own.
  auto other = LocalSlot::Claim(dir_, "127.0.0.1:7071", "vm", 1, "inc-d");
  EXPECT_TRUE(other.ok()) << other.status();
  auto host = LocalSlot::Claim(dir_, "127.0.0.1:7070", "vm2", 0, "inc-e");
  EXPECT_TRUE(host.ok()) << host.status();
  // A released slot is free again and remembers who held it.
  a->reset();
  auto again = LocalSlot::Claim(dir_, "127.0.0.1:7070", "vm", -1, "inc-f");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->index(), 0);
  EXPECT_EQ((*again)->previous_incarnation(), "inc-a");
}

TEST_F(LocalSlotTest, TheLaunchersIndexIsUsedAndAKilledHoldersSlotIsTakenOver) {
  setenv("LOCAL_RANK", "3", 1);
  auto s = LocalSlot::Claim(dir_, "c:1", "vm", -1, "inc-x");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->index(), 3);
  EXPECT_EQ((*s)->source(), "LOCAL_RANK");
  s->reset();
  unsetenv("LOCAL_RANK");
  // A child holds slot 5 and is killed with SIGKILL: the kernel drops its lock.
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  if (child == 0) {
    auto held = LocalSlot::Claim(dir_, "c:1", "vm", 5, "inc-child");
    char ok = held.ok() ? 'y' : 'n';
    (void)!write(ready[1], &ok, 1);
    pause();
    _exit(0);
  }
  char ok = 0;
  ASSERT_EQ(read(ready[0], &ok, 1), 1);
  ASSERT_EQ(ok, 'y');
  auto busy = LocalSlot::Claim(dir_, "c:1", "vm", 5, "inc-y");
  ASSERT_FALSE(busy.ok());
  EXPECT_TRUE(absl::StrContains(busy.status().message(), absl::StrCat("pid ", child))) << busy.status();
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  auto taken = LocalSlot::Claim(dir_, "c:1", "vm", 5, "inc-z");
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_EQ((*taken)->previous_incarnation(), "inc-child");
}

}  // namespace
}  // namespace lmsgd::session
