// Worker supervision with real processes: exits seen at once, signal forwarding and the grace
// period, SIGKILL escalation to the whole process group, no zombies, output handling.
#include "launcher/agent/worker_group.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <sstream>

#include "tests/integration/process.h"

namespace rally::agent {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

WorkerSpec shell(int local_rank, const std::string& script) {
  WorkerSpec s;
  s.local_rank = local_rank;
  s.argv = {"sh", "-c", script};
  s.env = {{"PATH", "/usr/bin:/bin"}, {"LOCAL_RANK", std::to_string(local_rank)}};
  s.stdout_to_console = false;
  s.stderr_to_console = false;
  return s;
}

// Children of this process in state Z (zombies).
int zombieChildren() {
  int zombies = 0;
  DIR* d = opendir("/proc");
  for (dirent* e; d != nullptr && (e = readdir(d)) != nullptr;) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream stat(std::string("/proc/") + e->d_name + "/stat");
    std::string content((std::istreambuf_iterator<char>(stat)), {});
    const auto close = content.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(content.substr(close + 2));
    char state = 0;
    int ppid = 0;
    rest >> state >> ppid;
    if (ppid == getpid() && state == 'Z') ++zombies;
  }
  if (d != nullptr) closedir(d);
  return zombies;
}

TEST(WorkerGroupTest, ExitsAreSeenAtOnceWithCodesAndStderrTail) {
  std::atomic<int> seen{0};
  auto g =
      WorkerGroup::start({shell(0, "echo one >&2; echo two >&2; exit 7"), shell(1, "kill -9 $$")},
                         [&](const WorkerExit&) { ++seen; });
  ASSERT_TRUE(g.ok()) << g.status().toString();
  const auto t0 = Clock::now();
  ASSERT_TRUE((*g)->waitAll(milliseconds(5000)));
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));
  auto exits = (*g)->exits();
  ASSERT_EQ(exits.size(), 2u);
  // An exit is recorded before its callback runs (so that a callback sees running() drop).
  for (int i = 0; i < 500 && seen.load() < 2; ++i) std::this_thread::sleep_for(milliseconds(2));
  EXPECT_EQ(seen.load(), 2);
  for (const auto& e : exits) {
    if (e.local_rank == 0) {
      EXPECT_EQ(e.exit_code, 7);
      EXPECT_EQ(e.stderr_tail, (std::vector<std::string>{"one", "two"}));
      EXPECT_EQ(e.describe(), "exit code 7");
    } else {
      EXPECT_EQ(e.signal, SIGKILL);
      EXPECT_NE(e.describe().find("SIGKILL"), std::string::npos);
    }
  }
}

TEST(WorkerGroupTest, ForwardedSignalLetsWorkersExitCleanly) {
  auto g = WorkerGroup::start(
      {shell(0, "trap 'echo got TERM >&2; exit 0' TERM; while :; do sleep 0.02; done")}, {});
  ASSERT_TRUE(g.ok());
  std::this_thread::sleep_for(milliseconds(200));  // let the trap be installed
  const auto t0 = Clock::now();
  (*g)->stop(SIGTERM, milliseconds(5000));
  EXPECT_LT(Clock::now() - t0, milliseconds(2000)) << "no need to wait out the grace period";
  auto exits = (*g)->exits();
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_EQ(exits[0].exit_code, 0);
  ASSERT_FALSE(exits[0].stderr_tail.empty());
  EXPECT_EQ(exits[0].stderr_tail.back(), "got TERM") << "the worker ran its handler";
}

TEST(WorkerGroupTest, WorkerIgnoringSignalIsKilledAfterGracePeriod) {
  auto g = WorkerGroup::start({shell(0, "trap '' TERM; while :; do sleep 0.02; done")}, {});
  ASSERT_TRUE(g.ok());
  std::this_thread::sleep_for(milliseconds(200));
  const auto t0 = Clock::now();
  (*g)->stop(SIGTERM, milliseconds(300));
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, milliseconds(290)) << "the grace period is honoured";
  EXPECT_LT(took, milliseconds(3000));
  auto exits = (*g)->exits();
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_EQ(exits[0].signal, SIGKILL);
}

TEST(WorkerGroupTest, GrandchildrenDieWithTheGroupAndNoZombiesRemain) {
  const std::string pidfile = rally::testing::tempPath("grandchild");
  auto g = WorkerGroup::start({shell(0, "sleep 300 & echo $! > " + pidfile + "; wait")}, {});
  ASSERT_TRUE(g.ok());
  pid_t grandchild = 0;
  for (int i = 0; i < 200 && grandchild == 0; ++i) {
    std::ifstream(pidfile) >> grandchild;
    std::this_thread::sleep_for(milliseconds(10));
  }
  ASSERT_GT(grandchild, 0);
  ASSERT_TRUE(rally::testing::isRunning(grandchild));
  (*g)->stop(SIGKILL, milliseconds(0));
  g->reset();
  for (int i = 0; i < 100 && rally::testing::isRunning(grandchild); ++i)
    std::this_thread::sleep_for(milliseconds(10));
  EXPECT_FALSE(rally::testing::isRunning(grandchild)) << "the worker's child outlived the group";
  EXPECT_EQ(zombieChildren(), 0);
  ::unlink(pidfile.c_str());
}

TEST(WorkerGroupTest, OutputGoesToFilesWithPrefixAndEnvironmentIsTheWorkers) {
  WorkerSpec s = shell(0, "echo out-$LOCAL_RANK; echo err-line >&2; exit 0");
  s.stdout_file = rally::testing::tempPath("out.log");
  s.stderr_file = rally::testing::tempPath("err.log");
  ::unlink(s.stdout_file.c_str());
  ::unlink(s.stderr_file.c_str());
  auto g = WorkerGroup::start({s}, {});
  ASSERT_TRUE(g.ok());
  ASSERT_TRUE((*g)->waitAll(milliseconds(5000)));
  EXPECT_EQ(rally::testing::ChildProcess::readFile(s.stdout_file), "out-0\n");
  EXPECT_EQ(rally::testing::ChildProcess::readFile(s.stderr_file), "err-line\n");
}

TEST(WorkerGroupTest, ProgramThatCannotRunIsReportedByName) {
  WorkerSpec s = shell(0, "");
  s.argv = {"/no/such/program", "x"};
  auto g = WorkerGroup::start({shell(1, "sleep 30"), s}, {});
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("/no/such/program"), std::string::npos);
  EXPECT_NE(g.status().message().find("No such file"), std::string::npos);
  EXPECT_EQ(zombieChildren(), 0) << "the worker started before it was stopped and reaped";
}

}  // namespace
}  // namespace rally::agent
