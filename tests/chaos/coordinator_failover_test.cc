// In-place recovery when the job's coordinator fails, through `rally run --recovery in-place` on
// loopback, with the minimal example as the workers (the other failures: inplace_recovery_test.cc):
//   - the coordinator's host lost (kill -9 of the agent hosting it; three nodes on three loopback
//     addresses): a successor takes the coordinator over on its own address, the survivors'
//     workers follow it there and re-form in place (each node started its workers once); the
//     same when the host goes silent (SIGSTOP: found by keepalive), and when the first successor
//     is lost with it (the next one takes over after --failover-timeout); a job whose workers
//     all finished while the host was lost ends at the successor (its exit barrier counted
//     there); and two successors that both took over (the first back while the second's host
//     stalled) agree on the first, where the second's nodes follow;
//   - a surviving member slower than the last call to rejoin the successor: re-formed with at
//     once when it is back, its workers kept;
//   - --rdzv-endpoint with a standby address: the standby takes the coordinator over there (before
//     a node of lower rank), and a spare held at the lost host and the lost host coming back both
//     find it at that address, without taking the round from an old member slower than they are
//     (its agent stopped across the loss); and a spare follows a coordinator handed over by a
//     SIGTERMed host there, and takes its place;
//   - the coordinator's host stopped by SIGTERM under --recovery restart: it hands the coordinator
//     over, and the job re-forms once;
//   - a standalone `rally coordinator` killed and started again: the workers train on meanwhile,
//     the round resumes untouched (no re-form), and the weights are bitwise identical; a worker
//     killed while it is away is counted against --max-restarts once it is back (re-formed for
//     with a restart left, the job failed with none);
//   - the host lost with the newest commit: the job's records in the store (the newest commit,
//     the fault plan's firings) outlive it in the successor's copy of the job scope.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "tests/chaos/inplace_fixture.h"

namespace rally::testing {
namespace {

using std::chrono::milliseconds;

class CoordinatorFailoverTest : public InPlaceFixture {
 protected:
  // Agents ID-a on 127.0.0.1 (it hosts the coordinator), ID-b on 127.0.0.2 and ID-c on 127.0.0.3,
  // with `args` and `program`, so that the coordinator's move shows in its address. `ranked`: c
  // starts once b is node rank 1 (b is then the first successor). Returns once a's workers have a
  // world of `world` ranks.
  void startThree(const std::string& id, const std::vector<std::string>& args,
                  const std::vector<std::string>& program, int world, bool ranked,
                  std::unique_ptr<ChildProcess>* a, std::unique_ptr<ChildProcess>* b,
                  std::unique_ptr<ChildProcess>* c) {
    *a = agent(id + "-a", args, program, "127.0.0.1");
    ASSERT_TRUE((*a)->waitForErrors("listening", milliseconds(20000))) << (*a)->errors();
    *b = agent(id + "-b", args, program, "127.0.0.2");
    if (ranked) {
      ASSERT_TRUE((*b)->waitForErrors("node rank 1 of", milliseconds(20000))) << (*b)->errors();
    }
    *c = agent(id + "-c", args, program, "127.0.0.3");
    ASSERT_TRUE(
        (*a)->waitForOutput("world " + std::to_string(world) + " generation", milliseconds(30000)))
        << (*a)->errors();
  }

  // Three nodes as startThree's (b node rank 1) with --rdzv-endpoint's second address a standby on
  // c's host, where c takes the coordinator over, and a fourth node d held as a spare (the round
  // is full). `last_call`: --last-call.
  struct StandbyJob {
    std::vector<std::string> program = {"--samples",      "1500", "--epochs",  "4", "--batch", "12",
                                        "--commit-every", "4",    "--step-ms", "25"};
    std::string standby;
    std::vector<std::string> args;
    std::unique_ptr<ChildProcess> a, b, c, d;
  };
  void startStandbyJob(const std::string& id, const std::string& last_call, StandbyJob* job) {
    job->standby = "127.0.0.3:" + endpoint_.substr(endpoint_.rfind(':') + 1);
    job->args = {"--nnodes",         "2:3",
                 "--nproc-per-node", "1",
                 "--rdzv-endpoint",  endpoint_ + "," + job->standby,
                 "--rdzv-id",        id,
                 "--last-call",      last_call};
    ASSERT_NO_FATAL_FAILURE(
        startThree(id, job->args, job->program, 3, /*ranked=*/true, &job->a, &job->b, &job->c));
    job->d = agent(id + "-d", job->args, job->program, "127.0.0.4");
    ASSERT_TRUE(job->d->waitForErrors("held until", milliseconds(20000))) << job->d->errors();
  }
  // a's host lost (kill -9): c takes the coordinator over at the standby address, and the spare,
  // which had no successors to go to, finds it there among --rdzv-endpoint's addresses.
  void loseTheHost(StandbyJob& job) {
    job.a->signal(SIGKILL);
    EXPECT_EQ(exitCode(*job.a, milliseconds(5000)), 128 + SIGKILL);
    ASSERT_TRUE(job.c->waitForErrors("took over the job's coordinator on " + job.standby,
                                     milliseconds(20000)))
        << job.c->errors() << job.b->errors();
    ASSERT_TRUE(
        job.d->waitForErrors("the job's coordinator is now at " + job.standby, milliseconds(20000)))
        << job.d->errors();
  }
};

TEST_F(CoordinatorFailoverTest, CoordinatorHostLostASuccessorTakesItOverAndTheWorkersFollow) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "4",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "25"};
  const Result ref = reference(program);
  ASSERT_EQ(ref.weights.size(), 8u);
  // Three nodes on three loopback addresses, so that the coordinator's move shows in its address.
  const std::vector<std::string> args = {"--nnodes",        "2:3",     "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-c",
                                         "--last-call",     "300ms"};
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("ip-c", args, program, 6, /*ranked=*/false, &a, &b, &c));
  a->signal(SIGKILL);  // the coordinator's host: its agent, the coordinator, and its workers
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  const std::string err = b->errors() + c->errors();
  // The first successor by node rank (b or c, in join order) took it over on its own address...
  const std::regex took("took over the job's coordinator on (127\\.0\\.0\\.[23]):[0-9]+");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(err, m, took)) << err;
  const std::string host = m[1].str();
  // ...and every surviving worker followed it there, in place (no process restarted).
  const std::string follow = "the job's coordinator moved from " + endpoint_ + " to " + host;
  EXPECT_EQ(count(err, follow), 4u) << err;
  const Result got = parse(b->output() + c->output());
  EXPECT_NE(got.summary.find("recoveries 1 world 4 uses_min 4 uses_max 4"), std::string::npos)
      << got.summary << "\n"
      << err;
  ASSERT_EQ(got.weights.size(), 8u);
  for (size_t i = 0; i < 8; ++i) EXPECT_NEAR(got.weights[i], ref.weights[i], 2e-2) << i;
  const std::string log = events();
  EXPECT_NE(log.find("\"event\":\"coordinator_lost\""), std::string::npos) << log;
  EXPECT_NE(log.find("\"event\":\"coordinator_moved\""), std::string::npos) << log;
  EXPECT_EQ(count(log, "\"event\":\"coordinator_moved\""), 2u) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_replaced\""), 0u)
      << "no survivor failed: nothing to replace\n"
      << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_started\""), 3u)
      << "each node started its workers once: the survivors recovered in place\n"
      << log;
  const auto recoveries = eventLines("recovery");
  EXPECT_FALSE(recoveries.empty()) << log;
  for (const std::string& line : recoveries) {
    EXPECT_NE(line.find("\"world_size\":4"), std::string::npos) << line;
  }
}

// A surviving member slower than the last call (its agent stopped while the host is lost): the
// successor's round forms without it. When it comes back, the job re-forms with it at once, and
// its workers, which waited, re-form in place with the others (before, it was held as a newcomer
// and its workers gave up: "not a member of generation 3's round").
TEST_F(CoordinatorFailoverTest, AMemberBackLateToTheSuccessorIsReFormedWithAndItsWorkersStay) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "3",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "20"};
  const std::vector<std::string> args = {"--nnodes",        "1:3",     "--nproc-per-node", "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-l",
                                         "--last-call",     "300ms"};
  // b is node rank 1: the first successor
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("ip-l", args, program, 3, /*ranked=*/true, &a, &b, &c));
  const auto all = [&] { return a->errors() + b->errors() + c->errors(); };
  // c's agent stops (its worker goes on), then the host is lost: b takes over, and its round
  // forms without c after the last call.
  c->signal(SIGSTOP);
  a->signal(SIGKILL);
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  ASSERT_TRUE(b->waitForErrors("round formed with 1 node(s)", milliseconds(30000))) << all();
  c->signal(SIGCONT);
  EXPECT_EQ(exitCode(*b), 0) << all();
  EXPECT_EQ(exitCode(*c), 0) << all();
  EXPECT_NE(b->errors().find("node 'ip-l-c' came back from generation"), std::string::npos)
      << all();
  EXPECT_NE(c->errors().find("re-formed in place"), std::string::npos) << all();
  EXPECT_EQ(c->errors().find("is not a member of generation"), std::string::npos) << all();
  const std::string log = events();
  EXPECT_EQ(count(log, "\"event\":\"workers_started\""), 3u)
      << "each node started its workers once: c's stayed\n"
      << log;
  const Result got = parse(b->output() + c->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 3 uses_max 3"), std::string::npos)
      << got.summary << "\n"
      << all();
}

// The lost host started again, with the same command, while its successor serves the job at an
// address --rdzv-endpoint does not list: its agent finds the job where its host last saw the
// coordinator's successors, joins it as a new node, and the world grows back (before, it started
// a coordinator of its own at the listed address: a second job of the same id).
TEST_F(CoordinatorFailoverTest, TheLostHostStartedAgainFindsTheJobWhereItMoved) {
  // Long enough (about 9 s after the host is lost) for the host's agent to start again and be
  // admitted on a loaded machine.
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "6",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "30"};
  const std::vector<std::string> args = {"--nnodes",        "2:3",     "--nproc-per-node", "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-r",
                                         "--last-call",     "300ms"};
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("ip-r", args, program, 3, /*ranked=*/false, &a, &b, &c));
  a->signal(SIGKILL);
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  // The successor (b or c, by join order) took over, and its round formed without a.
  const auto both = [&] { return b->errors() + c->errors(); };
  const auto deadline = std::chrono::steady_clock::now() + milliseconds(30000);
  while (both().find("round formed with 2 node(s)") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  ASSERT_NE(both().find("round formed with 2 node(s)"), std::string::npos) << both();
  ASSERT_NE(both().find("took over the job's coordinator"), std::string::npos) << both();
  // `rally status` on a's host finds it too, from the same memory (none answers at the listed
  // address).
  ChildProcess status({RALLY_BINARY, "status", "--rdzv-endpoint", endpoint_, "--rdzv-id", "ip-r",
                       "--state-dir", state_dir_ + "/ip-r-a"},
                      tempPath("ip-r-status.out"));
  EXPECT_EQ(exitCode(status), 0) << status.output() << status.errors();
  EXPECT_NE(status.output().find("(where this host last saw the job's coordinator or successors): "
                                 "job 'ip-r'"),
            std::string::npos)
      << status.output();
  auto again = agent("ip-r-a", args, program, "127.0.0.1");
  EXPECT_EQ(exitCode(*again), 0) << again->errors() << b->errors() << c->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  const std::string err = again->errors();
  EXPECT_NE(err.find("where this host last saw it or its successors"), std::string::npos) << err;
  EXPECT_EQ(err.find("hosting the job's coordinator"), std::string::npos)
      << "one coordinator for the job\n"
      << err;
  const Result got = parse(again->output() + b->output() + c->output());
  EXPECT_NE(got.summary.find("world 3 uses_min 6 uses_max 6"), std::string::npos)
      << got.summary << "\n"
      << err << b->errors() << c->errors();
}

// The lost host started again while the takeover is still under way (its first successor was lost
// with it; the second waits --failover-timeout): nothing serves the job yet, so it hosts at the
// listed address. Until a round forms there it keeps asking where its host last saw the
// successors, and when the second one serves the job it steps aside and joins it (before, both
// waited for a second node until the join timeout).
TEST_F(CoordinatorFailoverTest, TheLostHostBackDuringTheTakeoverStepsAsideForIt) {
  const std::vector<std::string> program = {"--samples", "600", "--epochs",       "3",
                                            "--batch",   "12",  "--commit-every", "4",
                                            "--step-ms", "25"};
  const std::vector<std::string> args = {"--nnodes",        "2:3",     "--nproc-per-node",   "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",          "ip-w",
                                         "--last-call",     "300ms",   "--failover-timeout", "2s",
                                         "--join-timeout",  "60s"};
  auto a = agent("ip-w-a", args, program, "127.0.0.1");
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  std::map<std::string, std::unique_ptr<ChildProcess>> others;
  others["ip-w-b"] = agent("ip-w-b", args, program, "127.0.0.2");
  others["ip-w-c"] = agent("ip-w-c", args, program, "127.0.0.3");
  ASSERT_TRUE(a->waitForOutput("world 3 generation", milliseconds(30000))) << a->errors();
  std::string first, second;
  for (const auto& [name, p] : others) {
    ASSERT_TRUE(p->waitForErrors(" of 3", milliseconds(10000))) << p->errors();
    (p->errors().find("node rank 1 of 3") != std::string::npos ? first : second) = name;
  }
  a->signal(SIGKILL);
  others[first]->signal(SIGKILL);
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  auto again = agent("ip-w-a", args, program, "127.0.0.1");
  EXPECT_EQ(exitCode(*again), 0) << again->errors() << others[second]->errors();
  EXPECT_EQ(exitCode(*others[second]), 0) << others[second]->errors();
  const std::string err = again->errors();
  // Stepped aside for it, or (on a machine slow enough that the takeover was done before the
  // host's agent first asked) joined it at once.
  EXPECT_TRUE(err.find("it moved there while this node was away") != std::string::npos ||
              err.find("where this host last saw it or its successors") != std::string::npos)
      << err;
  EXPECT_EQ(count(err, "took over the job's coordinator"), 0u) << err;
  EXPECT_NE(others[second]->errors().find("took over the job's coordinator"), std::string::npos)
      << others[second]->errors();
  const Result got = parse(again->output() + others[second]->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 3 uses_max 3"), std::string::npos)
      << got.summary << "\n"
      << err << others[second]->errors();
}

// The first successor stalled longer than --failover-timeout while the host is lost: the second
// takes over, and when the first comes back it joins that coordinator instead of starting one of
// its own (before, it took over too: two coordinators, each training a part of the job).
TEST_F(CoordinatorFailoverTest, AFirstSuccessorBackAfterTheNextTookOverJoinsIt) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "3",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "20"};
  const std::vector<std::string> args = {"--nnodes",        "1:3",     "--nproc-per-node",   "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",          "ip-f",
                                         "--last-call",     "300ms",   "--failover-timeout", "1s"};
  // b is node rank 1: the first successor
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("ip-f", args, program, 3, /*ranked=*/true, &a, &b, &c));
  const auto all = [&] { return a->errors() + b->errors() + c->errors(); };
  // b's agent stops (its worker goes on), then the host is lost: c waits --failover-timeout for
  // b, takes over, and its round forms without b after the last call.
  b->signal(SIGSTOP);
  a->signal(SIGKILL);
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  ASSERT_TRUE(c->waitForErrors("round formed with 1 node(s)", milliseconds(30000))) << all();
  b->signal(SIGCONT);
  EXPECT_EQ(exitCode(*b), 0) << all();
  EXPECT_EQ(exitCode(*c), 0) << all();
  EXPECT_NE(c->errors().find("took over the job's coordinator on 127.0.0.3"), std::string::npos)
      << all();
  EXPECT_EQ(b->errors().find("took over the job's coordinator"), std::string::npos)
      << "one coordinator for the job\n"
      << all();
  EXPECT_NE(b->errors().find("node 'ip-f-c' took it over"), std::string::npos) << all();
  EXPECT_NE(c->errors().find("node 'ip-f-b' came back from generation"), std::string::npos)
      << all();
  const Result got = parse(b->output() + c->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 3 uses_max 3"), std::string::npos)
      << got.summary << "\n"
      << all();
}

// Two successors both take the coordinator over: c, the second, after b (the first) did not
// answer within --failover-timeout; then b, back while c's host stalls (SIGSTOP), checks c, gets
// no answer in time, and starts one too. Neither round has formed (each waits the last call for
// the old members): b comes first among the successors, so c's coordinator steps aside, c joins
// b's, and so does d, which had joined c's: it looks for the coordinator again among the lost
// round's successors. The job goes on as one (before, b and c each formed a round of their own
// and trained apart).
TEST_F(CoordinatorFailoverTest, TwoSuccessorsThatBothTookOverAgreeOnOne) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "3",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "20"};
  const std::vector<std::string> args = {
      "--nnodes",  "1:4",  "--nproc-per-node",   "1",  "--rdzv-endpoint", endpoint_,
      "--rdzv-id", "ip-r", "--failover-timeout", "1s", "--last-call",     "6s"};
  std::unique_ptr<ChildProcess> a, b, c;
  // b is node rank 1: the first successor
  ASSERT_NO_FATAL_FAILURE(startThree("ip-r", args, program, 3, /*ranked=*/true, &a, &b, &c));
  auto d = agent("ip-r-d", args, program, "127.0.0.4");
  ASSERT_TRUE(a->waitForOutput("world 4 generation", milliseconds(30000))) << d->errors();
  const auto all = [&] { return a->errors() + b->errors() + c->errors() + d->errors(); };
  b->signal(SIGSTOP);
  a->signal(SIGKILL);
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  ASSERT_TRUE(c->waitForErrors("took over the job's coordinator on 127.0.0.3", milliseconds(20000)))
      << all();
  ASSERT_TRUE(d->waitForErrors("the job's coordinator is now at 127.0.0.3", milliseconds(20000)))
      << all();
  c->signal(SIGSTOP);
  b->signal(SIGCONT);
  const bool b_took =
      b->waitForErrors("took over the job's coordinator on 127.0.0.2", milliseconds(20000));
  c->signal(SIGCONT);
  ASSERT_TRUE(b_took) << "b did not start a second coordinator: nothing to agree on\n" << all();
  EXPECT_EQ(exitCode(*b), 0) << all();
  EXPECT_EQ(exitCode(*c), 0) << all();
  EXPECT_EQ(exitCode(*d), 0) << all();
  EXPECT_NE(c->errors().find("node 'ip-r-b' took the job's coordinator over too, at 127.0.0.2"),
            std::string::npos)
      << all();
  EXPECT_EQ(b->errors().find("took the job's coordinator over too"), std::string::npos)
      << "one side steps aside\n"
      << all();
  EXPECT_NE(d->errors().find("the job's coordinator is now at 127.0.0.2"), std::string::npos)
      << all();
  EXPECT_EQ(count(all(), "round formed with 1 node(s)"), 0u) << "no round of one\n" << all();
  const Result got = parse(b->output() + c->output() + d->output());
  EXPECT_NE(got.summary.find("world 3 uses_min 3 uses_max 3"), std::string::npos)
      << got.summary << "\n"
      << all();
}

// The coordinator's host goes silent (SIGSTOP: no reset, no answer, as a host powered off or cut
// off): the agents find it by keepalive (2 heartbeat intervals of pings, 2 more to answer), not
// when TCP gives up minutes later, and a successor takes over.
TEST_F(CoordinatorFailoverTest, CoordinatorHostSilentIsFoundByKeepaliveAndTakenOver) {
  // Long enough to outlast the takeover: keepalive, then the 1 s asking the silent host whether
  // it still answers (a job that ends during the takeover is the next test's).
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "3",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "25"};
  const std::vector<std::string> args = {"--nnodes",        "2:3",     "--nproc-per-node", "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-q",
                                         "--last-call",     "300ms"};
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("ip-q", args, program, 3, /*ranked=*/false, &a, &b, &c));
  a->signal(SIGSTOP);
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  a->signal(SIGKILL);  // its worker goes with it (parent-death signal)
  const std::string err = b->errors() + c->errors();
  // Found at all: without keepalive the streams would break only when TCP gives up, minutes
  // after this test's bounds.
  EXPECT_EQ(count(err, "lost the coordinator at " + endpoint_ + " (node 'ip-q-a'"), 2u) << err;
  EXPECT_EQ(count(err, "took over the job's coordinator"), 1u) << err;
  const Result got = parse(b->output() + c->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 3 uses_max 3"), std::string::npos) << got.summary;
}

// The job's workers all finish while the coordinator's host is lost: every agent is stopped
// (SIGSTOP: a's with its coordinator, so nobody is declared failed meanwhile) while the workers
// train to the end, then a's host is killed and b and c go on. Their exit barrier cannot count
// them at the lost coordinator; the successor's round (in place, nothing to re-form) counts them,
// and the job ends. Before, it did not: both waited out the exit barrier (5 min).
TEST_F(CoordinatorFailoverTest, WorkersThatFinishedWhileTheCoordinatorWasLostEndTheJob) {
  const std::vector<std::string> program = {"--samples", "600", "--epochs",       "2",
                                            "--batch",   "12",  "--commit-every", "4",
                                            "--step-ms", "20"};
  const std::vector<std::string> args = {"--nnodes",        "2:3",     "--nproc-per-node", "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-w",
                                         "--last-call",     "300ms"};
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("ip-w", args, program, 3, /*ranked=*/false, &a, &b, &c));
  const auto all = [&] { return a->errors() + b->errors() + c->errors(); };
  // The workers' pids, from the agents' events.
  std::vector<pid_t> workers;
  for (const std::string& line : eventLines("workers_started")) {
    const std::regex pids("\"pids\":\\[([0-9,]*)\\]");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(line, m, pids)) << line;
    std::istringstream list(m[1].str());
    for (std::string pid; std::getline(list, pid, ',');) workers.push_back(std::stoi(pid));
  }
  ASSERT_EQ(workers.size(), 3u) << events();
  for (ChildProcess* p : {a.get(), b.get(), c.get()}) p->signal(SIGSTOP);
  // The workers go on (their collectives are their own; commits they cannot record are only
  // logged) to the end: they exit, left as zombies until their stopped agents go on.
  const auto deadline = std::chrono::steady_clock::now() + milliseconds(60000);
  while (std::any_of(workers.begin(), workers.end(), isRunning) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_FALSE(std::any_of(workers.begin(), workers.end(), isRunning))
      << "the workers did not finish while the agents were stopped\n"
      << all();
  a->signal(SIGKILL);
  EXPECT_EQ(exitCode(*a, milliseconds(5000)), 128 + SIGKILL);
  b->signal(SIGCONT);
  c->signal(SIGCONT);
  EXPECT_EQ(exitCode(*b, milliseconds(60000)), 0) << all();
  EXPECT_EQ(exitCode(*c, milliseconds(60000)), 0) << all();
  const std::string err = b->errors() + c->errors();
  EXPECT_EQ(count(err, "took over the job's coordinator on"), 1u) << err;
  // Each saw its worker succeed (rank 0's summary went with a's agent, which forwarded it).
  EXPECT_EQ(count(err, "all 1 worker(s) finished"), 2u) << err;
  EXPECT_EQ(count(err, "the job ended: every worker finished"), 2u) << err;
}

// The coordinator's host and its first successor lost together: the others wait
// --failover-timeout for the first successor, then the next one takes the coordinator over.
TEST_F(CoordinatorFailoverTest, CoordinatorHostAndFirstSuccessorLostTheNextOneTakesOver) {
  const std::vector<std::string> program = {"--samples", "600", "--epochs",       "3",
                                            "--batch",   "12",  "--commit-every", "4",
                                            "--step-ms", "25"};
  const std::vector<std::string> args = {"--nnodes",        "1:3",     "--nproc-per-node",   "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",          "ip-d",
                                         "--last-call",     "300ms",   "--failover-timeout", "1s"};
  auto a = agent("ip-d-a", args, program, "127.0.0.1");
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  std::map<std::string, std::unique_ptr<ChildProcess>> others;
  others["ip-d-b"] = agent("ip-d-b", args, program, "127.0.0.2");
  others["ip-d-c"] = agent("ip-d-c", args, program, "127.0.0.3");
  ASSERT_TRUE(a->waitForOutput("world 3 generation", milliseconds(30000))) << a->errors();
  // Node rank 1 is the first successor (node rank 0, the host, is not one).
  std::string first, second;
  for (const auto& [name, p] : others) {
    ASSERT_TRUE(p->waitForErrors(" of 3", milliseconds(10000))) << p->errors();
    (p->errors().find("node rank 1 of 3") != std::string::npos ? first : second) = name;
  }
  ASSERT_FALSE(first.empty());
  ASSERT_FALSE(second.empty());
  a->signal(SIGKILL);
  others[first]->signal(SIGKILL);
  EXPECT_EQ(exitCode(*others[second]), 0) << others[second]->errors();
  const std::string err = others[second]->errors();
  EXPECT_NE(err.find("no answer from the coordinator at 127.0.0."), std::string::npos) << err;
  EXPECT_NE(err.find("took over the job's coordinator"), std::string::npos) << err;
  const Result got = parse(others[second]->output());
  EXPECT_NE(got.summary.find("world 1 uses_min 3 uses_max 3"), std::string::npos) << got.summary;
}

// --rdzv-endpoint with a standby address: the node there takes the coordinator over before any
// other (whatever its node rank), and serves it at that address, where nodes that were not in the
// round find it: a spare held when the host was lost, and the lost host coming back (which joins
// the job there rather than starting a coordinator of its own).
TEST_F(CoordinatorFailoverTest, CoordinatorMovesToTheStandbyAddressWhereOtherNodesFindIt) {
  StandbyJob job;
  ASSERT_NO_FATAL_FAILURE(startStandbyJob("ip-s", "1s", &job));
  ASSERT_NO_FATAL_FAILURE(loseTheHost(job));
  const auto& [program, standby, args, a, b, c, d] = job;
  // The lost host comes back: it finds the job at the standby address (the round is full again
  // with d, or about to be: it waits as a spare, or fills the place).
  auto a2 = agent("ip-s-a2", args, program, "127.0.0.1");
  ASSERT_TRUE(a2->waitForErrors("the job's coordinator is at " + standby, milliseconds(20000)))
      << a2->errors();
  // On a failure, every node's log: which node joined the successor when tells the story.
  const auto all = [&] { return b->errors() + c->errors() + d->errors() + a2->errors(); };
  EXPECT_EQ(exitCode(*b), 0) << all();
  EXPECT_EQ(exitCode(*c), 0) << all();
  EXPECT_EQ(exitCode(*d), 0) << all();
  EXPECT_EQ(exitCode(*a2), 0) << all();
  EXPECT_EQ(a2->errors().find("hosting the job's coordinator"), std::string::npos) << a2->errors();
  EXPECT_EQ(b->errors().find("took over"), std::string::npos) << "b is not the standby";
  const Result got = parse(b->output() + c->output() + d->output() + a2->output());
  EXPECT_NE(got.summary.find("world 3 uses_min 4 uses_max 4"), std::string::npos)
      << got.summary << "\n"
      << b->errors();
}

// The same, with the race that once failed the test above made certain: b's agent is stopped
// across the loss, so that the spare and the restarted host reach the standby first and make up
// MAX with its own node. The round waits for b (an old member, whose worker is alive and
// re-forming in place) within the last call, and takes it before them; the restarted host waits
// as a spare. Before, the round formed at once without b, which was held as a newcomer until its
// worker gave up, and b failed.
TEST_F(CoordinatorFailoverTest, NewNodesAtTheStandbyDoNotTakeTheRoundFromAnOldMemberComingBack) {
  // The coordinators log each join (at debug level), so that b goes on once the others are in.
  // (The agents take the environment as they start; it is restored as the test ends.)
  struct Restore {
    const char* had = std::getenv("RALLY_LOG_LEVEL");
    std::optional<std::string> saved = had ? std::optional<std::string>(had) : std::nullopt;
    ~Restore() {
      if (saved) {
        ::setenv("RALLY_LOG_LEVEL", saved->c_str(), 1);
      } else {
        ::unsetenv("RALLY_LOG_LEVEL");
      }
    }
  } restore;
  ::setenv("RALLY_LOG_LEVEL", "info,rendezvous=debug", 1);
  // A last call long enough for b to be back on a loaded machine (a few ms on an idle one); the
  // first round waits for it too.
  StandbyJob job;
  ASSERT_NO_FATAL_FAILURE(startStandbyJob("ip-n", "3s", &job));
  const auto& [program, standby, args, a, b, c, d] = job;
  b->signal(SIGSTOP);
  ASSERT_NO_FATAL_FAILURE(loseTheHost(job));
  auto a2 = agent("ip-n-a2", args, program, "127.0.0.1");
  for (const char* node : {"ip-n-d", "ip-n-a2"}) {
    ASSERT_TRUE(c->waitForErrors(std::string("node '") + node + "' joined", milliseconds(20000)))
        << c->errors() << a2->errors();
  }
  b->signal(SIGCONT);
  const auto all = [&] { return b->errors() + c->errors() + d->errors() + a2->errors(); };
  EXPECT_EQ(exitCode(*b), 0) << all();
  EXPECT_EQ(exitCode(*c), 0) << all();
  EXPECT_EQ(exitCode(*d), 0) << all();
  EXPECT_EQ(exitCode(*a2), 0) << all();
  EXPECT_NE(c->errors().find("generation 3: round formed with 3 node(s)"), std::string::npos)
      << all();
  EXPECT_NE(b->errors().find("generation 3: node rank"), std::string::npos) << all();
  EXPECT_EQ(b->errors().find("held until"), std::string::npos) << all();
  EXPECT_NE(a2->errors().find("the job finished while this node was held"), std::string::npos)
      << "the restarted host waits as a spare\n"
      << all();
  const Result got = parse(b->output() + c->output() + d->output() + a2->output());
  EXPECT_NE(got.summary.find("world 3"), std::string::npos) << got.summary << "\n" << all();
}

// The coordinator's host is stopped (SIGTERM: it hands the coordinator over) while a spare waits:
// the spare knows no successors, looks at --rdzv-endpoint's addresses, finds the standby that took
// over, and takes the stopped node's place.
TEST_F(CoordinatorFailoverTest, ASpareFollowsAHandedOverCoordinatorToTheStandbyAndFillsThePlace) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "4",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "25"};
  const std::string port = endpoint_.substr(endpoint_.rfind(':') + 1);
  const std::string standby = "127.0.0.2:" + port;
  const std::vector<std::string> args = {
      "--nnodes",  "2",    "--nproc-per-node", "1",    "--rdzv-endpoint", endpoint_ + "," + standby,
      "--rdzv-id", "ip-h", "--last-call",      "300ms"};
  auto a = agent("ip-h-a", args, program, "127.0.0.1");
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  auto b = agent("ip-h-b", args, program, "127.0.0.2");
  ASSERT_TRUE(a->waitForOutput("world 2 generation", milliseconds(30000))) << a->errors();
  auto c = agent("ip-h-c", args, program, "127.0.0.3");  // a spare: the job is at MAX
  ASSERT_TRUE(c->waitForErrors("held until", milliseconds(20000))) << c->errors();
  a->signal(SIGTERM);
  EXPECT_EQ(exitCode(*a, milliseconds(10000)), 128 + SIGTERM) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  EXPECT_NE(b->errors().find("took over the job's coordinator on " + standby), std::string::npos)
      << b->errors();
  EXPECT_NE(c->errors().find("its host is leaving"), std::string::npos) << c->errors();
  EXPECT_NE(c->errors().find("the job's coordinator is now at " + standby), std::string::npos)
      << c->errors();
  const Result got = parse(b->output() + c->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 4 uses_max 4"), std::string::npos)
      << got.summary << "\n"
      << b->errors() << c->errors();
}

// Restart level, and a graceful loss: the coordinator's host is stopped (SIGTERM, as a preemption
// notice would); it hands the coordinator over at once and the others restart their workers in a
// world without it.
TEST_F(CoordinatorFailoverTest, CoordinatorHostStoppedHandsTheCoordinatorOverUnderRestarts) {
  recovery_ = "restart";
  const std::vector<std::string> program = {"--samples", "600", "--epochs",       "2",
                                            "--batch",   "12",  "--commit-every", "4",
                                            "--step-ms", "25"};
  const std::vector<std::string> args = {"--nnodes",        "2:3",     "--nproc-per-node", "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "rs-c",
                                         "--last-call",     "300ms"};
  std::unique_ptr<ChildProcess> a, b, c;
  ASSERT_NO_FATAL_FAILURE(startThree("rs-c", args, program, 3, /*ranked=*/false, &a, &b, &c));
  a->signal(SIGTERM);
  EXPECT_EQ(exitCode(*a, milliseconds(10000)), 128 + SIGTERM) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  const std::string err = b->errors() + c->errors();
  EXPECT_NE(err.find("its host is leaving: the agent hosting the coordinator received SIGTERM"),
            std::string::npos)
      << err;
  EXPECT_EQ(count(err, "took over the job's coordinator on 127.0.0."), 1u) << err;
  // One re-form, the takeover's: the host did not leave first (which would be a second).
  const std::string log = events();
  EXPECT_EQ(count(log, "\"event\":\"coordinator_moved\""), 2u) << log;
  std::set<std::string> generations;
  for (const std::string& line : eventLines("workers_started")) {
    const auto at = line.find("\"generation\":");
    if (at != std::string::npos) generations.insert(line.substr(at + 13, 2));
  }
  EXPECT_EQ(generations, (std::set<std::string>{"1,", "2,"})) << log;
  EXPECT_NE((b->output() + c->output()).find("world 2 generation 2"), std::string::npos);
}

// A standalone coordinator (`rally coordinator`, as the Kubernetes recipe runs it) killed and
// started again where it was: the agents wait for it while the workers go on training, the round
// resumes unchanged (no re-form, no restart), and the result is bitwise identical.
TEST_F(CoordinatorFailoverTest, StandaloneCoordinatorRestartedTheRoundResumesUntouched) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "8",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "25"};
  const Result ref = reference(program);
  ::setenv("RALLY_TOKEN", "restart-test-token", 1);  // the coordinator's and the agents'
  struct Unset {
    ~Unset() { ::unsetenv("RALLY_TOKEN"); }
  } unset;
  const std::string port = endpoint_.substr(endpoint_.rfind(':') + 1);
  int starts = 0;
  const auto coordinator = [&] {
    return std::make_unique<ChildProcess>(
        std::vector<std::string>{RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port", port,
                                 "--job-id", "ip-r", "--nnodes", "2", "--heartbeat-interval",
                                 "500ms"},
        tempPath("ip-r-coordinator" + std::to_string(++starts) + ".out"));
  };
  auto first = coordinator();
  ASSERT_TRUE(first->waitForErrors("listening", milliseconds(20000))) << first->errors();
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-r"};
  auto a = agent("ip-r-a", args, program);
  auto b = agent("ip-r-b", args, program);
  // Rank 0 prints the progress; either node may have it.
  const auto training = std::chrono::steady_clock::now() + milliseconds(30000);
  while ((a->output() + b->output()).find("world 4 generation 1") == std::string::npos &&
         std::chrono::steady_clock::now() < training) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  ASSERT_NE((a->output() + b->output()).find("world 4 generation 1"), std::string::npos)
      << a->errors() << b->errors();
  first->signal(SIGKILL);
  EXPECT_EQ(exitCode(*first, milliseconds(5000)), 128 + SIGKILL);
  ASSERT_TRUE(a->waitForErrors("waiting up to", milliseconds(10000))) << a->errors();
  ASSERT_TRUE(b->waitForErrors("waiting up to", milliseconds(10000))) << b->errors();
  // Training goes on with no coordinator (commit points included) for 100 steps, some 3 s (the
  // workers' watches fail and restart meanwhile), then the coordinator is started again.
  const size_t before = count(a->output() + b->output(), "step ");
  const auto trained = std::chrono::steady_clock::now() + milliseconds(30000);
  while (count(a->output() + b->output(), "step ") < before + 10 &&
         std::chrono::steady_clock::now() < trained) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  ASSERT_GE(count(a->output() + b->output(), "step "), before + 10)
      << "the workers stopped while the coordinator was away";
  auto second = coordinator();
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  const Result got = parse(a->output() + b->output());
  EXPECT_EQ(got.weights_text, ref.weights_text) << "the round went on untouched";
  EXPECT_NE(got.summary.find("recoveries 0 world 4 uses_min 8 uses_max 8"), std::string::npos)
      << got.summary;
  const std::string err = a->errors() + b->errors();
  EXPECT_EQ(count(err, "the job's coordinator is back at " + endpoint_), 2u) << err;
  EXPECT_EQ(count(err, "the restarted coordinator resumed the round"), 2u) << err;
  EXPECT_EQ(count(err, "re-formed in place"), 0u) << err;
  EXPECT_NE(second->errors().find("all 2 node(s) of generation 1 are back"), std::string::npos)
      << second->errors();
  const std::string log = events();
  EXPECT_EQ(count(log, "\"event\":\"coordinator_lost\""), 2u) << log;
  EXPECT_EQ(count(log, "\"event\":\"coordinator_moved\""), 2u) << log;
  EXPECT_EQ(count(log, "\"event\":\"workers_started\""), 2u) << log;
}

// A worker killed while the standalone coordinator is away counts against --max-restarts once it
// is back, like any failure: with a restart left the resumed round re-forms for it (in place);
// with none the job fails with its report.
TEST_F(CoordinatorFailoverTest, AWorkerFailureWhileTheCoordinatorIsAwayCountsAgainstTheRestarts) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "8",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "25"};
  ::setenv("RALLY_TOKEN", "outage-test-token", 1);
  struct Unset {
    ~Unset() { ::unsetenv("RALLY_TOKEN"); }
  } unset;
  for (const std::string max_restarts : {"1", "0"}) {
    SCOPED_TRACE("--max-restarts " + max_restarts);
    std::remove(events_.c_str());
    endpoint_ = "127.0.0.1:" + std::to_string(freePort());
    const std::string port = endpoint_.substr(endpoint_.rfind(':') + 1);
    const std::string id = "ip-o" + max_restarts;
    int starts = 0;
    const auto coordinator = [&] {
      return std::make_unique<ChildProcess>(
          std::vector<std::string>{RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port",
                                   port, "--job-id", id, "--nnodes", "2", "--heartbeat-interval",
                                   "500ms"},
          tempPath(id + "-coordinator" + std::to_string(++starts) + ".out"));
    };
    auto first = coordinator();
    ASSERT_TRUE(first->waitForErrors("listening", milliseconds(20000))) << first->errors();
    const std::vector<std::string> args = {"--nnodes",        "2",         "--nproc-per-node", "1",
                                           "--rdzv-endpoint", endpoint_,   "--rdzv-id",        id,
                                           "--max-restarts",  max_restarts};
    auto a = agent(id + "-a", args, program);
    auto b = agent(id + "-b", args, program);
    ASSERT_TRUE(a->waitForErrors("started 1 worker(s)", milliseconds(30000))) << a->errors();
    // a's worker, from its workers_started event.
    pid_t worker = 0;
    const auto listed = std::chrono::steady_clock::now() + milliseconds(10000);
    while (worker == 0 && std::chrono::steady_clock::now() < listed) {
      for (const std::string& line : eventLines("workers_started")) {
        if (line.find("\"node\":\"" + id + "-a\"") == std::string::npos) continue;
        std::smatch m;
        if (std::regex_search(line, m, std::regex("\"pids\":\\[([0-9]+)"))) {
          worker = std::stoi(m[1].str());
        }
      }
      if (worker == 0) std::this_thread::sleep_for(milliseconds(20));
    }
    ASSERT_GT(worker, 0) << events();
    first->signal(SIGKILL);
    EXPECT_EQ(exitCode(*first, milliseconds(5000)), 128 + SIGKILL);
    ASSERT_TRUE(a->waitForErrors("waiting up to", milliseconds(10000))) << a->errors();
    ::kill(worker, SIGKILL);
    ASSERT_TRUE(a->waitForErrors("failed: signal SIGKILL", milliseconds(10000))) << a->errors();
    auto second = coordinator();
    ASSERT_TRUE(
        a->waitForErrors("while the coordinator was away: counting them now", milliseconds(20000)))
        << a->errors();
    if (max_restarts == "1") {
      EXPECT_EQ(exitCode(*a), 0) << a->errors();
      EXPECT_EQ(exitCode(*b), 0) << b->errors();
      EXPECT_NE(a->errors().find("in-place recovery 1 of 1"), std::string::npos) << a->errors();
      const Result got = parse(a->output() + b->output());
      EXPECT_NE(got.summary.find("world 2 uses_min 8 uses_max 8"), std::string::npos)
          << got.summary;
    } else {
      EXPECT_EQ(exitCode(*a), 1) << a->errors();
      EXPECT_EQ(exitCode(*b), 1) << b->errors();
      EXPECT_NE(a->errors().find("failed after 0 restart(s) (--max-restarts 0)"), std::string::npos)
          << a->errors();
    }
    second->signal(SIGTERM);
    exitCode(*second, milliseconds(10000));
  }
}

// The same, but the node lost with the newest commit hosts the coordinator: the job's records in
// the store (the newest commit, the fault plan's firings) outlive it in the successor's copy. So
// the survivor says it fell back, and when it passes commit 6 again the kill, already fired, does
// not strike the node that is node 0 now (before the copies, it did: the job lost both nodes).
TEST_F(CoordinatorFailoverTest, CoordinatorHostLostWithTheNewestCommitTheJobScopeSurvivesIt) {
  const std::vector<std::string> program = {"--samples", "1500", "--epochs",       "2",
                                            "--batch",   "12",   "--commit-every", "4",
                                            "--step-ms", "5"};
  const std::string plan = tempPath("inplace-scope-plan.txt");
  {
    std::ofstream(plan) << "delay rank=2 commit=6 for=20s   # node 1 held before commit 6\n"
                           "delay rank=3 commit=6 for=20s\n"
                           "kill node=0 commit=6             # node 0, the host, lost after it\n";
  }
  const std::vector<std::string> args = {"--nnodes",        "1:2",     "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "ip-s",
                                         "--fault-plan",    plan};
  auto a = agent("ip-s-a", args, program);
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  auto b = agent("ip-s-b", args, program);
  const int ca = exitCode(*a), cb = exitCode(*b);
  EXPECT_EQ(ca, 128 + SIGKILL) << a->errors();
  EXPECT_EQ(cb, 0) << b->errors();
  const std::string err = a->errors() + b->errors();
  EXPECT_NE(b->errors().find("took over the job's coordinator"), std::string::npos) << err;
  EXPECT_NE(b->errors().find("job scope: took"), std::string::npos) << err;
  // Node 0's worker says so as it fires (the line may die with its agent); node 1's never.
  EXPECT_EQ(count(b->errors(), "rally: fault plan: kill node=0"), 0u) << err;
  EXPECT_NE(err.find("fell back: commit 6 was held only by workers that are gone"),
            std::string::npos)
      << err;
  const Result got = parse(b->output());
  EXPECT_NE(got.summary.find("world 2 uses_min 2 uses_max 2"), std::string::npos) << got.summary;
  const auto recoveries = eventLines("recovery");
  EXPECT_FALSE(recoveries.empty()) << events();
  for (const std::string& line : recoveries) {
    EXPECT_NE(line.find("\"fell_back_from\":6"), std::string::npos) << line;
  }
}

}  // namespace
}  // namespace rally::testing
