// Crash safety of checkpoints: a saving process killed with SIGKILL at random moments (20 trials)
// always leaves the newest complete checkpoint loadable and every complete checkpoint intact; a
// real full disk (a 1 MiB tmpfs in a mount namespace the test creates; skipped, saying why, where
// mounting is not allowed) fails the save with ResourceExhausted, leaves no partial files, and
// the previous checkpoint still loads.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"
#include "runtime/checkpoint/checkpointer.h"
#include "tests/integration/process.h"

namespace rally {
namespace {

namespace fs = std::filesystem;
using testing::ChildProcess;

constexpr std::uint64_t kBytes = 8 << 20;

// The newest complete checkpoint's step after every complete one verified; -1 if none.
std::int64_t checkAll(const std::string& dir) {
  std::int64_t newest = -1;
  for (const auto& e : checkpoint::listCheckpoints(dir)) {
    if (!e.complete) continue;
    auto report = checkpoint::verifyCheckpoint(e.path);
    EXPECT_TRUE(report.ok()) << report.status().toString();
    if (report.ok()) {
      EXPECT_TRUE(report->problems.empty()) << e.path << ": " << report->problems[0];
      EXPECT_EQ(report->bytes_checked, kBytes + 0) << e.path;
    }
    newest = std::max(newest, static_cast<std::int64_t>(e.step));
  }
  return newest;
}

TEST(CheckpointCrash, KilledAtRandomDuringSavesTheNewestCompleteOneAlwaysLoads) {
  const std::string dir = testing::tempPath("ckpt-crash");
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    ChildProcess first(
        {RALLY_CHECKPOINT_SAVER, dir, "--bytes", std::to_string(kBytes), "--steps", "1"},
        dir + ".first.out");
    ASSERT_EQ(testing::exitCode(first, std::chrono::milliseconds(60000)), 0) << first.errors();
  }
  std::mt19937 rng(20261130);
  std::int64_t newest = checkAll(dir);
  ASSERT_EQ(newest, 1);
  int interrupted = 0;
  for (int trial = 0; trial < 20; ++trial) {
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    const std::string out = dir + ".trial" + std::to_string(trial) + ".out";
    ChildProcess saver(
        {RALLY_CHECKPOINT_SAVER, dir, "--bytes", std::to_string(kBytes), "--steps", "0"}, out);
    // It has loaded the newest checkpoint (and checked its contents) once it says "saving".
    ASSERT_TRUE(saver.waitForOutput("saving", std::chrono::milliseconds(30000))) << saver.errors();
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 80'000));  // the random moment
    saver.signal(SIGKILL);
    ASSERT_EQ(testing::exitCode(saver, std::chrono::milliseconds(10000)), 128 + SIGKILL)
        << saver.errors();
    for (const auto& de : fs::directory_iterator(dir)) {
      interrupted += de.path().filename().string().rfind(".partial", 0) == 0;
    }
    const std::int64_t now = checkAll(dir);
    EXPECT_GE(now, newest) << "a complete checkpoint went missing";
    newest = now;
  }
  // The next run starts from the newest one and checks its contents (exit 3 if wrong).
  ChildProcess last(
      {RALLY_CHECKPOINT_SAVER, dir, "--bytes", std::to_string(kBytes), "--steps", "1"},
      dir + ".last.out");
  EXPECT_EQ(testing::exitCode(last, std::chrono::milliseconds(60000)), 0) << last.errors();
  // Most moments fall inside a save: the kills must have interrupted some.
  EXPECT_GT(interrupted, 0) << "no kill landed during a save; the test proved nothing";
  std::printf("%d of 20 kills interrupted a save; newest complete step %lld\n", interrupted,
              static_cast<long long>(newest));
  fs::remove_all(dir);
}

TEST(CheckpointCrash, AFullDiskFailsTheSaveAndKeepsThePreviousCheckpoint) {
  const std::string dir = testing::tempPath("ckpt-full");
  fs::remove_all(dir);
  fs::create_directories(dir);
  // util-linux's unshare: a private mount namespace in which a 1 MiB tmpfs covers `dir`.
  const std::string script = "mount -t tmpfs -o size=1m rally-full-disk '" + dir +
                             "' || exit 77; exec '" RALLY_CHECKPOINT_SAVER "' '" + dir +
                             "' --full-disk";
  ChildProcess p(
      {"/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script},
      dir + ".out");
  const int rc = testing::exitCode(p, std::chrono::milliseconds(60000));
  if (rc == 77 || (rc == 1 && p.errors().find("unshare") != std::string::npos)) {
    GTEST_SKIP() << "cannot mount a tmpfs here (" << p.errors()
                 << "); checkpoint_test's write hook covers the same logic";
  }
  ASSERT_EQ(rc, 0) << p.output() << p.errors();
  const std::string out = p.output();
  EXPECT_NE(out.find("ResourceExhausted"), std::string::npos) << out;
  EXPECT_NE(out.find("No space left on device"), std::string::npos) << out;
  EXPECT_NE(out.find("partials 0"), std::string::npos) << out;
  EXPECT_NE(out.find("loaded 1 ok"), std::string::npos) << out;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace rally
