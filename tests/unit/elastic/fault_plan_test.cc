// Fault plans: every action, target and trigger parses and prints back; bad lines are refused
// with the source, the line and what would be right; the injector fires each step fault once, for
// its rank only, at the first boundary at or after its step, and never again (nor in a replacement
// that shares the record of fired faults).
#include "runtime/faults/fault_plan.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <vector>

#include "runtime/faults/fault_injector.h"

namespace rally {
namespace {

TEST(FaultPlan, ParsesEveryFormAndPrintsItBack) {
  auto plan = FaultPlan::parse(
      "# a drill\n"
      "kill rank=1 step=20\n"
      "hang  rank=2   step=30   # SIGSTOP\n"
      "\n"
      "delay rank=0 step=10 for=500ms; fail rank=3 time=5s code=3\n"
      "kill node=1 time=3s\n"
      "kill rank=2 recovery=1\n"
      "kill node=0 commit=6; delay rank=2 commit=6 for=2s\n",
      "drill.txt");
  ASSERT_TRUE(plan.ok()) << plan.status().toString();
  ASSERT_EQ(plan->faults().size(), 8u);
  EXPECT_EQ(plan->toText(),
            "kill rank=1 step=20\nhang rank=2 step=30\ndelay rank=0 step=10 for=500ms\n"
            "fail rank=3 time=5s code=3\nkill node=1 time=3s\nkill rank=2 recovery=1\n"
            "kill node=0 commit=6\ndelay rank=2 commit=6 for=2s\n");
  EXPECT_EQ(plan->faults()[3].line, 5);
  EXPECT_EQ(plan->faults()[4].target, Fault::Target::kNode);
  auto again = FaultPlan::parse(plan->toText(), "round trip");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->toText(), plan->toText());
}

TEST(FaultPlan, RefusesBadLinesSayingWhereAndWhatWouldBeRight) {
  const std::pair<const char*, const char*> cases[] = {
      {"kil rank=1 step=2", "unknown action 'kil' (one of kill, hang, delay, fail, stall)"},
      {"stall rank=1 time=2s", "stall happens inside the worker"},
      {"kill step=2", "no target: add rank=R"},
      {"kill rank=1", "give exactly one trigger"},
      {"kill rank=1 step=2 time=1s", "give exactly one trigger"},
      {"kill rank=1 step=2 recovery=1", "give exactly one trigger"},
      {"kill rank=1 recovery=0", "recovery=0 is not a whole number of at least 1"},
      {"kill rank=-1 step=2", "rank=-1 is not a whole number of at least 0"},
      {"kill rank=1 step=x", "step=x is not a whole number"},
      {"kill rank=1 time=5parsecs", "time=5parsecs"},
      {"hang node=1 time=1s", "a node can only be killed"},
      {"kill node=1 step=3", "a node fault needs time=T or commit=K"},
      {"kill rank=1 commit=0", "commit=0 is not a whole number of at least 1"},
      {"kill rank=1 commit=2 step=2", "give exactly one trigger"},
      {"delay rank=0 step=1", "delay needs for=D"},
      {"kill rank=0 step=1 for=1s", "for=D is only for delay"},
      {"kill rank=0 step=1 code=2", "code=N is only for fail"},
      {"fail rank=0 step=1 code=300", "not an exit code"},
      {"kill rank=0 step=1 colour=red", "unknown key 'colour'"},
      {"kill rank=0 rank=1 step=1", "one target"},
      {"kill rank", "'rank' is not key=value"},
  };
  for (const auto& [text, want] : cases) {
    auto plan = FaultPlan::parse(std::string("kill rank=0 step=1\n") + text, "p.txt");
    ASSERT_FALSE(plan.ok()) << text;
    EXPECT_EQ(plan.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(plan.status().message().find("fault plan p.txt line 2"), std::string::npos)
        << plan.status().message();
    EXPECT_NE(plan.status().message().find(want), std::string::npos)
        << text << " -> " << plan.status().message();
  }
}

TEST(FaultPlan, ReadsTheEnvironmentAndFiles) {
  ::unsetenv("RALLY_FAULTS");
  auto none = FaultPlan::fromEnvironment();
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  ::setenv("RALLY_FAULTS", "kill rank=1 step=5;hang rank=0 step=9", 1);
  auto env = FaultPlan::fromEnvironment();
  ::unsetenv("RALLY_FAULTS");
  ASSERT_TRUE(env.ok()) << env.status().toString();
  EXPECT_EQ(env->faults().size(), 2u);
  auto missing = FaultPlan::fromFile("/nonexistent/plan.txt");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/plan.txt"), std::string::npos);
}

struct Recorder {
  std::vector<std::string> fired;
  FaultActions actions() {
    auto rec = [this](const Fault& f) { fired.push_back(f.describe()); };
    return {.kill = rec,
            .kill_node = [this](const Fault& f) { fired.push_back("node: " + f.describe()); },
            .hang = rec,
            .delay = rec,
            .fail = rec,
            .stall = rec};
  }
};

TEST(FaultInjector, FiresEachStepFaultOnceForItsRankAtOrAfterItsStep) {
  auto plan = FaultPlan::parse(
      "kill rank=1 step=3; delay rank=1 step=5 for=10ms; fail rank=0 step=4; kill rank=1 time=1s",
      "t");
  ASSERT_TRUE(plan.ok());
  auto fired = std::make_shared<LocalFiredFaults>();
  Recorder r1, r0;
  FaultInjector rank1(*plan, fired, r1.actions());
  FaultInjector rank0(*plan, fired, r0.actions());
  for (std::int64_t step : {0, 1, 2}) ASSERT_TRUE(rank1.atStep(1, step).ok());
  EXPECT_TRUE(r1.fired.empty());
  ASSERT_TRUE(rank1.atStep(1, 4).ok());  // step 3 was skipped over: fires at the next boundary
  EXPECT_EQ(r1.fired, std::vector<std::string>{"kill rank=1 step=3"});
  for (std::int64_t step = 4; step < 10; ++step) ASSERT_TRUE(rank1.atStep(1, step).ok());
  EXPECT_EQ(r1.fired,
            (std::vector<std::string>{"kill rank=1 step=3", "delay rank=1 step=5 for=10ms"}));
  // A replacement for rank 1 (same record of fired faults) rolls back to step 2 and passes 3 and 5
  // again: nothing fires twice. The time fault is the agent's, never the injector's.
  Recorder again;
  FaultInjector replacement(*plan, fired, again.actions());
  for (std::int64_t step = 2; step < 10; ++step) ASSERT_TRUE(replacement.atStep(1, step).ok());
  EXPECT_TRUE(again.fired.empty());
  for (std::int64_t step = 0; step < 10; ++step) ASSERT_TRUE(rank0.atStep(0, step).ok());
  EXPECT_EQ(r0.fired, std::vector<std::string>{"fail rank=0 step=4 code=1"});
}

TEST(FaultInjector, FiresRecoveryFaultsDuringTheirRecoveryOnly) {
  auto plan = FaultPlan::parse("kill rank=2 recovery=2; hang rank=1 step=0", "t");
  ASSERT_TRUE(plan.ok());
  Recorder r;
  FaultInjector f(*plan, std::make_shared<LocalFiredFaults>(), r.actions());
  ASSERT_TRUE(f.atRecovery(2, 1).ok());
  ASSERT_TRUE(f.atRecovery(1, 2).ok());
  ASSERT_TRUE(f.atStep(2, 100).ok());  // steps never fire a recovery fault
  EXPECT_TRUE(r.fired.empty());
  ASSERT_TRUE(f.atRecovery(2, 2).ok());
  ASSERT_TRUE(f.atRecovery(2, 2).ok());
  EXPECT_EQ(r.fired, std::vector<std::string>{"kill rank=2 recovery=2"});
}

TEST(FaultInjector, CommitFaultsStrikeAroundTheirCommit) {
  auto plan = FaultPlan::parse(
      "kill node=0 commit=3; fail rank=1 commit=3; delay rank=2 commit=3 for=10s; "
      "delay rank=3 commit=2 for=20ms",
      "t");
  ASSERT_TRUE(plan.ok());
  auto fired = std::make_shared<LocalFiredFaults>();
  Recorder r;
  FaultInjector f(*plan, fired, r.actions());
  const auto never = [] { return false; };
  // Kills and fails: after the commit, the node's by its local rank 0 only.
  ASSERT_TRUE(f.afterCommit(1, 0, 1, 2).ok());
  EXPECT_TRUE(r.fired.empty());
  ASSERT_TRUE(f.afterCommit(1, 0, 1, 3).ok());  // rank 1: its fail; not local rank 0: no node kill
  ASSERT_TRUE(f.afterCommit(0, 0, 0, 3).ok());
  ASSERT_TRUE(f.afterCommit(0, 0, 0, 3).ok());  // once
  EXPECT_EQ(r.fired, (std::vector<std::string>{"fail rank=1 commit=3 code=1",
                                               "node: kill node=0 commit=3"}));
  // Delays: before the commit; they never go through afterCommit.
  ASSERT_TRUE(f.afterCommit(2, 1, 0, 3).ok());
  EXPECT_EQ(r.fired.size(), 2u);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(f.beforeCommit(3, 2, never).ok());  // waited its 20 ms
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(20));
  // A delay ends early, with Aborted, when the job moves on: the rank must not take the commit.
  int polls = 0;
  const auto t1 = std::chrono::steady_clock::now();
  const Status s = f.beforeCommit(2, 3, [&] { return ++polls > 3; });
  EXPECT_EQ(s.code(), StatusCode::kAborted) << s.toString();
  EXPECT_LT(std::chrono::steady_clock::now() - t1, std::chrono::seconds(2));
  EXPECT_TRUE(f.beforeCommit(2, 3, never).ok());  // fired once
}

class FailingClaims final : public FiredFaults {
 public:
  Result<bool> claim(size_t) override { return unavailable("coordinator unreachable"); }
};

TEST(FaultInjector, DoesNotFireWhenItCannotClaim) {
  auto plan = FaultPlan::parse("kill rank=0 step=1", "t");
  ASSERT_TRUE(plan.ok());
  Recorder r;
  FaultInjector f(*plan, std::make_shared<FailingClaims>(), r.actions());
  const Status s = f.atStep(0, 1);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.toString().find("kill rank=0 step=1"), std::string::npos) << s.toString();
  EXPECT_TRUE(r.fired.empty());
}

// The default actions on a real process: "fail" exits with the fault's code, "kill" dies by
// SIGKILL, both after saying which fault fired.
TEST(FaultInjectorDeathTest, DefaultActionsActOnThisProcess) {
  auto plan = FaultPlan::parse("fail rank=0 step=1 code=7; kill rank=1 step=1", "t");
  ASSERT_TRUE(plan.ok());
  EXPECT_EXIT(
      {
        FaultInjector f(*plan, std::make_shared<LocalFiredFaults>());
        (void)f.atStep(0, 1);
      },
      ::testing::ExitedWithCode(7), "fault plan: fail rank=0 step=1 code=7");
  EXPECT_EXIT(
      {
        FaultInjector f(*plan, std::make_shared<LocalFiredFaults>());
        (void)f.atStep(1, 2);
      },
      ::testing::KilledBySignal(SIGKILL), "fault plan: kill rank=1 step=1");
}

}  // namespace
}  // namespace rally
