// In-place recovery through `rally run --recovery in-place`, on loopback, with the minimal example
// (regression by data-parallel gradient descent, librally's World, ElasticState, ElasticSampler
// and ElasticRun) as the workers:
//   - 2 agents x 2 workers, one worker killed with SIGKILL by the fault plan: the other three
//     keep their processes (no worker group is restarted; one replacement is started), the job
//     finishes, every sample is used exactly once per epoch, and with MIN = MAX the final weights
//     are bitwise identical to an uninterrupted run's;
//   - two failures in a row, and a failure during a recovery (a second worker killed while the
//     group re-forms): bitwise identical again;
//   - a hung rank (SIGSTOP): its agent kills it once it has been stopped for --hang-timeout (1 s
//     here; bound asserted: stopped at most 1.5 s when killed), and the job recovers in place;
//   - a rank that stops making progress while running (a deadlock: "stall"), found by the agents'
//     progress watchdog (--progress-timeout 1 s; bound asserted: killed within 1.5 s of its last
//     step), while the ranks waiting for it in a collective are not blamed; replaced in place,
//     bitwise identical;
//   - time-triggered faults applied by the agents (a delay, then a kill): bitwise identical;
//   - a whole node killed: the survivors go on with 2 ranks; a new node joins at the next commit
//     point (no step redone) and the world grows back to 4; every sample exactly once per epoch;
//     the weights within 2e-2 of the uninterrupted run's (the data are split differently while the
//     world is smaller, so the sums are rounded differently; the model converges to the same
//     least-squares solution);
//   - the last node holding the newest commit lost (node 1 killed right after taking commit 6,
//     while node 0's ranks were held before theirs): the survivors fall back to commit 5 and say
//     so (the log, and "fell_back_from": 6 in the recovery event), redo the lost steps, and still
//     use every sample exactly once per epoch;
//   - the whole job lost (both agents SIGKILLed, with RALLY_CHECKPOINT_DIR set): a new job
//     resumes from the newest complete checkpoint on its own; every sample is still used exactly
//     once per epoch over both jobs, and the weights are bitwise identical to the uninterrupted
//     run's (resharding to other world sizes is checkpoint_test's).
// The coordinator's own failures are in coordinator_failover_test.cc.
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "tests/chaos/inplace_fixture.h"

namespace rally::testing {
namespace {

using std::chrono::milliseconds;

class InPlaceRecoveryTest : public InPlaceFixture {};

TEST_F(InPlaceRecoveryTest, WorkerKilledOthersKeepTheirProcessesAndResultIsBitwiseIdentical) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "2",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "5"};
  const Result ref = reference(program);
  ASSERT_EQ(ref.weights.size(), 8u);
  const std::string plan = tempPath("inplace-plan.txt");
  {
    std::ofstream(plan) << "kill rank=0 step=27   # between commits; rank 0 writes no event then\n";
  }
  const std::string trace_dir = tempPath("inplace-trace"),
                    metrics_dir = tempPath("inplace-metrics");
  std::filesystem::remove_all(trace_dir);
  std::filesystem::remove_all(metrics_dir);
  const std::vector<std::string> args = {
      "--nnodes",    "2",       "--nproc-per-node", "2",        "--rdzv-endpoint", endpoint_,
      "--rdzv-id",   "ip-w",    "--max-restarts",   "2",        "--fault-plan",    plan,
      "--trace-dir", trace_dir, "--metrics-dir",    metrics_dir};
  auto a = agent("ip-w-a", args, program);
  auto b = agent("ip-w-b", args, program);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  const std::string out = a->output() + b->output(), log = events();
  const Result got = parse(out);
  EXPECT_EQ(got.weights_text, ref.weights_text) << "not bitwise identical to the uninterrupted run";
  // Rank 0 is now the replacement (it joined; it did not recover): "recoveries 0".
  EXPECT_NE(got.summary.find("recoveries 0 world 4 uses_min 2 uses_max 2"), std::string::npos)
      << got.summary;
  // The other three kept their processes: each node started its workers once, one replacement
  // was started, and no worker group was stopped.
  EXPECT_EQ(count(log, "\"event\":\"workers_started\""), 2u) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_replaced\""), 1u) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_stopped\""), 0u) << log;
  EXPECT_EQ(count(log, "\"event\":\"recovery\""), 1u) << log;
  for (const char* phase : {"\"detect\":", "\"abort\":", "\"rendezvous\":", "\"rebuild\":",
                            "\"restore\":", "\"first_step\":"}) {
    EXPECT_NE(log.find(phase), std::string::npos) << phase << " missing from " << log;
  }

  // Each survivor logged the collective it was in when the job moved on.
  const std::string errors = a->errors() + b->errors();
  EXPECT_NE(errors.find("recovering in place. Its last collectives:"), std::string::npos) << errors;
  EXPECT_NE(errors.find(" allreduce "), std::string::npos) << errors;

  // Telemetry: a trace and metrics per worker process that lived to write them (the killed one
  // died at once; its replacement wrote its own), and `rally trace` names the rank the others
  // were left waiting for in the generation that failed.
  size_t traces = 0, metrics = 0, agent_metrics = 0;
  std::string prom, agent_prom;
  for (const auto& e : std::filesystem::directory_iterator(trace_dir)) {
    traces += e.path().extension() == ".json";
  }
  for (const auto& e : std::filesystem::directory_iterator(metrics_dir)) {
    if (e.path().extension() != ".prom") continue;
    if (e.path().filename().string().rfind("rally-agent-", 0) == 0) {
      ++agent_metrics;
      agent_prom += ChildProcess::readFile(e.path().string());
    } else {
      ++metrics;
      prom += ChildProcess::readFile(e.path().string());
    }
  }
  EXPECT_EQ(traces, 4u);
  EXPECT_EQ(metrics, 4u);
  // Each agent's node metrics: its events counted, the generation it ended in.
  EXPECT_EQ(agent_metrics, 2u);
  EXPECT_EQ(count(agent_prom, "rally_agent_events_total{event=\"workers_started\","), 2u)
      << agent_prom;
  EXPECT_EQ(count(agent_prom, "rally_agent_events_total{event=\"workers_replaced\","), 1u)
      << agent_prom;
  EXPECT_NE(agent_prom.find("rally_agent_generation{node=\"ip-w-a\",run=\"ip-w\"} 2\n"),
            std::string::npos)
      << agent_prom;
  EXPECT_NE(agent_prom.find("rally_agent_world_size{node=\"ip-w-b\",run=\"ip-w\"} 4\n"),
            std::string::npos)
      << agent_prom;
  // The three survivors re-formed once; the replacement started in the new generation.
  std::map<std::string, int> recoveries;
  std::istringstream lines(prom);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("rally_recoveries_total{", 0) == 0)
      ++recoveries[line.substr(line.rfind(' ') + 1)];
  }
  EXPECT_EQ(recoveries, (std::map<std::string, int>{{"0", 1}, {"1", 3}})) << prom;
  EXPECT_EQ(count(prom, "rally_last_recovery_seconds{"), 3u) << prom;  // the survivors'
  EXPECT_EQ(count(prom, "rally_steps_redone_total{"), 4u) << prom;
  EXPECT_EQ(count(prom, "rally_world_size{"), 4u);
  EXPECT_NE(prom.find("rally_world_size{local_rank=\"0\",node=\"ip-w-a\",run=\"ip-w\"} 4"),
            std::string::npos)
      << prom;
  EXPECT_NE(prom.find("rally_collective_operations_total{backend=\"gloo\",comm=\"world\","
                      "local_rank=\"0\",node=\"ip-w-a\",op=\"allreduce\",run=\"ip-w\"} "),
            std::string::npos)
      << prom;
  const std::string merged = tempPath("inplace-trace-merged.json");
  ChildProcess trace({RALLY_BINARY, "trace", trace_dir, "-o", merged},
                     tempPath("inplace-trace.out"));
  ASSERT_EQ(exitCode(trace), 0) << trace.errors();
  const std::string summary = trace.output();
  // Generation 1: rank 0 was killed at the start of a step; the others were in its allreduce.
  EXPECT_NE(summary.find("world, generation 1, 4 ranks"), std::string::npos) << summary;
  EXPECT_NE(summary.find("rank 0: no records"), std::string::npos) << summary;
  EXPECT_NE(summary.find("=> the others wait for rank 0, which never issued #"), std::string::npos)
      << summary;
  // The survivors' allreduce failed (PeerLost or Aborted, whichever reached each first); none of
  // them is behind or still waiting.
  EXPECT_NE(summary.find(": failed in #"), std::string::npos) << summary;
  EXPECT_EQ(summary.find("behind:"), std::string::npos) << summary;
  EXPECT_EQ(summary.find("waiting in"), std::string::npos) << summary;
  // The generation it recovered into ran to the end on every rank.
  EXPECT_NE(summary.find("ranks 0, 1, 2, 3: completed #"), std::string::npos) << summary;
  const std::string merged_text = ChildProcess::readFile(merged);
  EXPECT_GT(count(merged_text, "\"ph\":\"X\""), 100u);
}

TEST_F(InPlaceRecoveryTest, TwoFailuresInARowAndAFailureDuringRecovery) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "2",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "5"};
  const Result ref = reference(program);
  const std::string plan = tempPath("inplace-plan2.txt");
  {
    std::ofstream(plan) << "kill rank=1 step=18\n"
                           "kill rank=3 step=40   # after the first recovery\n"
                           "kill rank=0 recovery=2   # while the group re-forms after the second\n";
  }
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-2",
                                         "--max-restarts",  "5",       "--fault-plan",     plan};
  auto a = agent("ip-2-a", args, program);
  auto b = agent("ip-2-b", args, program);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  const Result got = parse(a->output() + b->output());
  EXPECT_EQ(got.weights_text, ref.weights_text) << "not bitwise identical to the uninterrupted run";
  EXPECT_NE(got.summary.find("world 4 uses_min 2 uses_max 2"), std::string::npos) << got.summary;
  const std::string log = events();
  EXPECT_EQ(count(log, "\"event\":\"workers_started\""), 2u) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_replaced\""), 3u) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_stopped\""), 0u) << log;
  EXPECT_NE((a->errors() + b->errors()).find("fault plan: kill rank=0 recovery=2"),
            std::string::npos);
}

TEST_F(InPlaceRecoveryTest, HungRankIsDetectedAndReplaced) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "2",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "5"};
  const Result ref = reference(program);
  const std::string plan = tempPath("inplace-plan-hang.txt");
  { std::ofstream(plan) << "hang rank=2 step=22\n"; }
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-h",
                                         "--max-restarts",  "2",       "--fault-plan",     plan,
                                         "--hang-timeout",  "1s"};
  auto a = agent("ip-h-a", args, program);
  auto b = agent("ip-h-b", args, program);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  const Result got = parse(a->output() + b->output());
  EXPECT_EQ(got.weights_text, ref.weights_text);
  EXPECT_NE(got.summary.find("recoveries 1 world 4 uses_min 2 uses_max 2"), std::string::npos)
      << got.summary;
  const std::string log = events();
  ASSERT_EQ(count(log, "\"event\":\"worker_hung\""), 1u) << log;
  const auto at = log.find("\"stopped_ms\":");
  ASSERT_NE(at, std::string::npos);
  const long stopped_ms = std::strtol(log.c_str() + at + 13, nullptr, 10);
  EXPECT_GE(stopped_ms, 1000);
  EXPECT_LE(stopped_ms, 1500) << "killed later than --hang-timeout plus the 100 ms check";
  EXPECT_NE(log.find("hung: stopped for"), std::string::npos) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_replaced\""), 1u) << log;
}

TEST_F(InPlaceRecoveryTest, AStalledRankIsFoundByTheProgressWatchdogAndReplaced) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "2",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "5"};
  const Result ref = reference(program);
  const std::string plan = tempPath("inplace-plan-stall.txt");
  { std::ofstream(plan) << "stall rank=1 step=22   # blocks forever, but keeps running\n"; }
  const std::vector<std::string> args = {
      "--nnodes",           "2",    "--nproc-per-node", "2", "--rdzv-endpoint", endpoint_,
      "--rdzv-id",          "ip-s", "--max-restarts",   "2", "--fault-plan",    plan,
      "--progress-timeout", "1s"};
  auto a = agent("ip-s-a", args, program);
  auto b = agent("ip-s-b", args, program);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  const Result got = parse(a->output() + b->output());
  EXPECT_EQ(got.weights_text, ref.weights_text);
  EXPECT_NE(got.summary.find("world 4 uses_min 2 uses_max 2"), std::string::npos) << got.summary;
  const std::string log = events();
  // Only the stalled rank is blamed: the three waiting for it in the allreduce are not.
  ASSERT_EQ(count(log, "\"event\":\"worker_hung\""), 1u) << log;
  EXPECT_NE(log.find("\"step\":22"), std::string::npos) << log;
  const auto at = log.find("\"no_progress_ms\":");
  ASSERT_NE(at, std::string::npos);
  const long still_ms = std::strtol(log.c_str() + at + 17, nullptr, 10);
  EXPECT_GE(still_ms, 1000);
  // The bound: the timeout, plus one report interval (250 ms) and one check (20 ms), with room.
  EXPECT_LE(still_ms, 1500) << "killed later than --progress-timeout plus a report interval";
  EXPECT_NE(log.find("hung: no progress for"), std::string::npos) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_replaced\""), 1u) << log;
}

TEST_F(InPlaceRecoveryTest, TimeTriggeredFaultsAreAppliedByTheAgents) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "4",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "15"};
  const Result ref = reference(program);
  const std::string plan = tempPath("inplace-plan-time.txt");
  { std::ofstream(plan) << "delay rank=0 time=300ms for=200ms\nkill rank=3 time=900ms\n"; }
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-t",
                                         "--max-restarts",  "2",       "--fault-plan",     plan};
  auto a = agent("ip-t-a", args, program);
  auto b = agent("ip-t-b", args, program);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  const Result got = parse(a->output() + b->output());
  EXPECT_EQ(got.weights_text, ref.weights_text);
  EXPECT_NE(got.summary.find("recoveries 1 world 4 uses_min 4 uses_max 4"), std::string::npos)
      << got.summary;
  const std::string log = events();
  EXPECT_EQ(count(log, "\"event\":\"fault_injected\""), 2u) << log;
  EXPECT_NE(log.find("kill rank=3 time=900ms"), std::string::npos) << log;
}

TEST_F(InPlaceRecoveryTest, NodeLostSurvivorsGoOnAndANewNodeGrowsTheWorldBack) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "4",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "25"};
  const Result ref = reference(program);
  ASSERT_EQ(ref.weights.size(), 8u);
  const std::vector<std::string> args = {"--nnodes",        "1:2",     "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-n",
                                         "--last-call",     "300ms"};
  auto a = agent("ip-n-a", args, program);
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  auto b = agent("ip-n-b", args, program);
  ASSERT_TRUE(a->waitForOutput("world 4 generation", milliseconds(30000))) << a->errors();
  b->signal(SIGKILL);  // the whole node: its agent, and with it its workers
  EXPECT_EQ(exitCode(*b, milliseconds(5000)), 128 + SIGKILL);
  ASSERT_TRUE(a->waitForOutput("world 2 generation", milliseconds(30000))) << a->errors();
  auto c = agent("ip-n-c", args, program);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  const Result got = parse(a->output() + c->output());
  EXPECT_NE(got.summary.find("recoveries 2 world 4 uses_min 4 uses_max 4"), std::string::npos)
      << got.summary << "\n"
      << a->output();
  ASSERT_EQ(got.weights.size(), 8u);
  for (size_t i = 0; i < 8; ++i) EXPECT_NEAR(got.weights[i], ref.weights[i], 2e-2) << i;
  const std::string log = events();
  EXPECT_NE(log.find("\"event\":\"recovery\""), std::string::npos) << log;
  EXPECT_NE(log.find("\"world_size\":2"), std::string::npos) << log;
  // The new node was admitted at a commit point: the growth redid no step.
  bool grew = false;
  for (const std::string& line : eventLines("recovery")) {
    if (line.find("\"world_size\":4") == std::string::npos) continue;
    grew = true;
    EXPECT_NE(line.find("\"steps_redone\":0"), std::string::npos) << line;
  }
  EXPECT_TRUE(grew) << log;
  EXPECT_NE(a->errors().find("at a commit point"), std::string::npos);
}

TEST_F(InPlaceRecoveryTest, LastNodeWithTheNewestCommitLostFallsBackAndSaysSo) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "2",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "5"};
  const std::string plan = tempPath("inplace-fallback-plan.txt");
  {
    // Node 1 loses (losing node 0, the coordinator's host, is the takeover test's case).
    std::ofstream(plan) << "delay rank=0 commit=6 for=20s   # node 0 held before commit 6\n"
                           "delay rank=1 commit=6 for=20s\n"
                           "kill node=1 commit=6             # node 1 lost right after it\n";
  }
  const std::vector<std::string> args = {"--nnodes",        "1:2",     "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-f",
                                         "--fault-plan",    plan};
  auto a = agent("ip-f-a", args, program);
  // a hosts the coordinator and joins first (node 0); then b.
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  auto b = agent("ip-f-b", args, program);
  const int ca = exitCode(*a), cb = exitCode(*b);
  // Node 1 was killed (its agent by its own worker), node 0 finished.
  EXPECT_EQ(ca, 0) << a->errors();
  EXPECT_EQ(cb, 128 + SIGKILL) << b->errors();
  const std::string log = events(), err = a->errors() + b->errors();
  const Result got = parse(a->output() + b->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 2 uses_max 2"), std::string::npos) << got.summary;
  EXPECT_NE(err.find("falling back to commit 5: commit 6 was held only by ranks that are gone"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("fell back: commit 6 was held only by workers that are gone"),
            std::string::npos)
      << err;
  const auto recoveries = eventLines("recovery");
  EXPECT_FALSE(recoveries.empty()) << log;
  for (const std::string& line : recoveries) {
    EXPECT_NE(line.find("\"fell_back_from\":6"), std::string::npos) << line;
    EXPECT_NE(line.find("\"commit\":5"), std::string::npos) << line;
  }
}

TEST_F(InPlaceRecoveryTest, WholeJobLostANewJobResumesFromTheNewestCheckpoint) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "3",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "10"};
  const Result ref = reference(program);
  ASSERT_EQ(ref.weights.size(), 8u);
  const std::string dir = tempPath("inplace-ckpt");
  std::filesystem::remove_all(dir);
  ::setenv("RALLY_CHECKPOINT_DIR", dir.c_str(), 1);
  ::setenv("RALLY_CHECKPOINT_EVERY", "2", 1);
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-c"};
  {
    auto a = agent("ip-c-a", args, program);
    auto b = agent("ip-c-b", args, program);
    // Lost in the second epoch, after some checkpoints (rank 0, which prints, is on either node).
    const auto deadline = std::chrono::steady_clock::now() + milliseconds(60000);
    while ((a->output() + b->output()).find("epoch 1 loss") == std::string::npos) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << a->errors() << b->errors();
      std::this_thread::sleep_for(milliseconds(20));
    }
    a->signal(SIGKILL);
    b->signal(SIGKILL);
    EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
    EXPECT_EQ(exitCode(*b, milliseconds(5000)), 128 + SIGKILL);
  }
  // Every complete checkpoint left behind verifies (partial saves may be left: they are ignored).
  ChildProcess verify({RALLY_BINARY, "checkpoint", "verify", dir}, tempPath("inplace-verify.out"));
  EXPECT_EQ(exitCode(verify), 0) << verify.output() << verify.errors();
  // A new job, on one node of 4 workers, finds the checkpoint on its own (told where by flags
  // this time, which the agent passes on to its workers).
  ::unsetenv("RALLY_CHECKPOINT_DIR");
  ::unsetenv("RALLY_CHECKPOINT_EVERY");
  std::vector<std::string> argv = {
      RALLY_BINARY,         "run", "--standalone", "--nproc-per-node", "4", "--checkpoint-dir", dir,
      "--checkpoint-every", "2",   RALLY_MINIMAL};
  argv.insert(argv.end(), program.begin(), program.end());
  ChildProcess again(argv, tempPath("inplace-resume.out"));
  EXPECT_EQ(exitCode(again), 0) << again.errors();
  const std::string err = again.errors();
  const auto at = err.find("resumed from checkpoint step ");
  ASSERT_NE(at, std::string::npos) << err;
  EXPECT_GT(std::atoll(err.c_str() + at + 29), 0) << err.substr(at, 80);
  const Result got = parse(again.output());
  EXPECT_NE(got.summary.find("world 4 uses_min 3 uses_max 3"), std::string::npos) << got.summary;
  // The checkpoint holds the exact state (weights, sampler, step): the same world size goes on
  // as if nothing had happened.
  EXPECT_EQ(got.weights_text, ref.weights_text) << "not bitwise identical to the uninterrupted run";
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace rally::testing
