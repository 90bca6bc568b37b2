// `rally run` as real processes on loopback: two agents as two nodes; a worker killed (every node
// restarts), a node killed (the survivor goes on alone, the dead node's workers die with it), a
// node added (the job grows), the restart budget exhausted (the job fails with a report on every
// node); spares beyond MAX (held quietly, in when a member is lost, done with the job); the
// hosting agent retrying a taken port; a restarted first host stepping aside for the job at a
// standby address; `rally status` (every address asked at once); signal forwarding; torchrun's
// worker environment.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <regex>
#include <thread>

#include "tests/integration/process.h"

namespace rally::testing {
namespace {

using std::chrono::milliseconds;

// `env VARS... rally run --rdzv-endpoint ... ARGS... worker.sh`, its output in a temp file.
std::unique_ptr<ChildProcess> agent(const std::string& name, std::vector<std::string> vars,
                                    std::vector<std::string> args) {
  std::vector<std::string> argv = {"/usr/bin/env"};
  argv.insert(argv.end(), vars.begin(), vars.end());
  argv.insert(argv.end(), {RALLY_BINARY, "run", "--node-id", name, "--local-addr", "127.0.0.1",
                           "--heartbeat-interval", "500ms", "--grace-period", "2s"});
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back(RALLY_WORKER);
  return std::make_unique<ChildProcess>(argv, tempPath(name + ".out"));
}

// Every "pid=N" a worker printed with `marker` on its line.
std::vector<pid_t> workerPids(const ChildProcess& p, const std::string& marker) {
  std::vector<pid_t> pids;
  std::istringstream out(p.output());
  for (std::string line; std::getline(out, line);) {
    if (line.find(marker) == std::string::npos) continue;
    const auto at = line.find("pid=");
    if (at != std::string::npos) pids.push_back(std::stoi(line.substr(at + 4)));
  }
  return pids;
}

class RunTest : public ::testing::Test {
 protected:
  std::string endpoint_ = "127.0.0.1:" + std::to_string(freePort());
};

TEST_F(RunTest, WorkerKilledRestartsEveryNode) {
  const std::vector<std::string> vars = {"FIRST_SECONDS=60", "LATER_SECONDS=0.3"};
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "wk",
                                         "--max-restarts",  "2"};
  auto a = agent("wk-a", vars, args);
  auto b = agent("wk-b", vars, args);
  ASSERT_TRUE(a->waitForOutput("gen=1", milliseconds(20000))) << a->errors();
  ASSERT_TRUE(b->waitForOutput("gen=1", milliseconds(20000))) << b->errors();
  ASSERT_TRUE(b->waitForOutput("local=1", milliseconds(5000)));
  const auto victims = workerPids(*b, "local=1");
  ASSERT_EQ(victims.size(), 1u);
  kill(victims[0], SIGKILL);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  // Every worker of the job ran again, as restart 1 in generation 2.
  EXPECT_EQ(count(a->output() + b->output(), "restart=1 gen=2"), 4u) << a->output() << b->output();
  EXPECT_NE((a->errors() + b->errors()).find("restart 1 of 2"), std::string::npos)
      << "the restart was asked for, and counted against the job's budget";
}

TEST_F(RunTest, NodeKilledSurvivorContinuesAloneAndItsWorkersDie) {
  const std::vector<std::string> vars = {"FIRST_SECONDS=60", "LATER_SECONDS=0.3"};
  const std::vector<std::string> args = {"--nnodes",        "1:2",     "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "nk",
                                         "--last-call",     "10s"};
  auto a = agent("nk-a", vars, args);
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  auto b = agent("nk-b", vars, args);
  ASSERT_TRUE(b->waitForOutput("nodes=2", milliseconds(20000))) << b->errors();
  ASSERT_TRUE(b->waitForOutput("local=1", milliseconds(5000)));
  ASSERT_TRUE(a->waitForOutput("local=1", milliseconds(5000)));
  const auto b_workers = workerPids(*b, "gen=");
  ASSERT_EQ(b_workers.size(), 2u);
  const size_t before = a->output().size();
  b->signal(SIGKILL);  // the whole node: its agent, and with it its workers
  EXPECT_EQ(exitCode(*b, milliseconds(5000)), 128 + SIGKILL);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  // After the kill the survivor ran again, alone: 2 workers, 1 node.
  EXPECT_EQ(count(a->output().substr(before), "world=2 node=0 nodes=1"), 2u) << a->output();
  for (pid_t pid : b_workers) {
    for (int i = 0; i < 200 && isRunning(pid); ++i) std::this_thread::sleep_for(milliseconds(10));
    EXPECT_FALSE(isRunning(pid)) << "worker " << pid << " outlived its agent";
  }
}

TEST_F(RunTest, NodeAddedJobGrows) {
  const std::vector<std::string> vars = {"FIRST_SECONDS=60", "LATER_SECONDS=0.3"};
  const std::vector<std::string> args = {"--nnodes",        "1:2",     "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "grow",
                                         "--last-call",     "200ms"};
  auto a = agent("grow-a", vars, args);
  ASSERT_TRUE(a->waitForOutput("world=2", milliseconds(20000))) << a->errors();
  auto b = agent("grow-b", vars, args);
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(count(a->output() + b->output(), "world=4 node="), 4u) << a->output() << b->output();
  EXPECT_NE(a->errors().find("waiting to join"), std::string::npos);
}

// Nodes beyond MAX are spares: held without disturbing the full job (no re-form for them: once a
// re-form storm restarted the workers thousands of times a second), in when a member is lost, and
// done, with success, when the job finishes without them.
TEST_F(RunTest, SparesBeyondMaxWaitReplaceALostNodeAndEndWithTheJob) {
  const std::vector<std::string> vars = {"FIRST_SECONDS=60", "LATER_SECONDS=3"};
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "1",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "spare",
                                         "--max-restarts",  "1"};
  auto a = agent("spare-a", vars, args);
  // a hosts the coordinator (b is lost below, and the coordinator must not go with it).
  ASSERT_TRUE(a->waitForErrors("listening", milliseconds(20000))) << a->errors();
  auto b = agent("spare-b", vars, args);
  ASSERT_TRUE(a->waitForOutput("world=2", milliseconds(20000))) << a->errors();
  auto c = agent("spare-c", vars, args);
  ASSERT_TRUE(c->waitForErrors("held until", milliseconds(20000))) << c->errors();
  b->signal(SIGKILL);
  EXPECT_EQ(exitCode(*b, milliseconds(5000)), 128 + SIGKILL);
  ASSERT_TRUE(c->waitForOutput("world=2", milliseconds(20000))) << c->errors();
  auto d = agent("spare-d", vars, args);  // a spare of the new round, which then finishes
  ASSERT_TRUE(d->waitForErrors("held until", milliseconds(20000))) << d->errors();
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  EXPECT_EQ(exitCode(*d), 0) << d->errors();
  EXPECT_EQ(count(a->output(), "worker rank="), 2u)
      << "started for the first round and for the one without 'spare-b', no more:\n"
      << a->output() << a->errors();
  EXPECT_EQ(count(c->output(), "worker rank="), 1u) << c->output();
  EXPECT_EQ(count(d->output(), "worker rank="), 0u) << d->output();
  EXPECT_NE(d->errors().find("the job finished while this node was held"), std::string::npos)
      << d->errors();
}

// The rendezvous port is taken by something that is not a rally coordinator, then freed: the agent
// of its host keeps trying to listen rather than waiting for a coordinator that nobody starts. (Two
// agents of one host that bind the port at the same instant can both fail to listen, about 1 in 30
// simultaneous starts here; each then found the other's coordinator missing in the same way.)
TEST_F(RunTest, TheHostingAgentTriesAgainWhileItsPortIsTakenAndNobodyServesIt) {
  const int port = std::stoi(endpoint_.substr(endpoint_.rfind(':') + 1));
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << strerror(errno);
  ASSERT_EQ(listen(fd, 4), 0);  // answers TCP, not gRPC
  auto a = agent("taken-a", {},
                 {"--nnodes", "1", "--rdzv-endpoint", endpoint_, "--rdzv-id", "taken",
                  "--connect-timeout", "20s"});
  const bool waited = a->waitForErrors("trying again", milliseconds(20000));
  close(fd);
  ASSERT_TRUE(waited) << a->errors();
  EXPECT_EQ(exitCode(*a), 0) << a->errors();
  EXPECT_NE(a->errors().find("hosting the job's coordinator on " + endpoint_), std::string::npos)
      << a->errors();
  EXPECT_EQ(count(a->output(), "worker rank="), 1u) << a->output();
}

// The first host restarted while its job runs at a standby address (here a standalone coordinator
// there, whose round two nodes formed): nothing answered when its agent looked, so it hosts a
// coordinator, then finds the job at the standby address, joins it, and hands its own over, rather
// than splitting the job.
TEST_F(RunTest, ARestartedFirstHostStepsAsideForTheJobAtAStandbyAddress) {
  ::setenv("RALLY_TOKEN", "defer-token", 1);  // the coordinator's and the agents'
  struct Unset {
    ~Unset() { ::unsetenv("RALLY_TOKEN"); }
  } unset;
  const std::string port = endpoint_.substr(endpoint_.rfind(':') + 1);
  const std::string standby = "127.0.0.2:" + port;
  const std::vector<std::string> vars = {"FIRST_SECONDS=60", "LATER_SECONDS=1"};
  auto first = agent("defer-a", vars,
                     {"--nnodes", "2:3", "--rdzv-endpoint", endpoint_ + "," + standby, "--rdzv-id",
                      "defer", "--last-call", "200ms"});
  ASSERT_TRUE(
      first->waitForErrors("hosting the job's coordinator on " + endpoint_, milliseconds(20000)))
      << first->errors();
  ChildProcess job({RALLY_BINARY, "coordinator", "--host", "127.0.0.2", "--port", port, "--job-id",
                    "defer", "--nnodes", "2:3", "--heartbeat-interval", "500ms"},
                   tempPath("defer-coordinator.out"));
  ASSERT_TRUE(job.waitForErrors("listening", milliseconds(20000))) << job.errors();
  const std::vector<std::string> args = {"--nnodes",  "2:3",   "--rdzv-endpoint", standby,
                                         "--rdzv-id", "defer", "--last-call",     "200ms"};
  auto b = agent("defer-b", vars, args);
  auto c = agent("defer-c", vars, args);
  ASSERT_TRUE(b->waitForOutput("world=2", milliseconds(20000))) << b->errors();
  ASSERT_TRUE(first->waitForErrors("steps aside", milliseconds(10000))) << first->errors();
  EXPECT_EQ(exitCode(*first), 0) << first->errors();
  EXPECT_EQ(exitCode(*b), 0) << b->errors();
  EXPECT_EQ(exitCode(*c), 0) << c->errors();
  EXPECT_EQ(count(first->output(), "world=3"), 1u) << first->output() << first->errors();
  job.signal(SIGTERM);
  EXPECT_EQ(exitCode(job, milliseconds(10000)), 0) << job.errors();
}

// `rally status` at a list of addresses: the one where the job's coordinator serves gives its
// round (job, generation, state, members), the other says that nothing answers there; --json has
// the same; a wrong token is told apart from an empty address; no coordinator at all is exit 1.
TEST_F(RunTest, StatusShowsTheRoundWhereTheCoordinatorAnswers) {
  const std::vector<std::string> vars = {"FIRST_SECONDS=60"};
  const std::vector<std::string> args = {"--nnodes",  "2",      "--rdzv-endpoint", endpoint_,
                                         "--rdzv-id", "status", "--last-call",     "200ms"};
  auto a = agent("status-a", vars, args);
  auto b = agent("status-b", vars, args);
  ASSERT_TRUE(a->waitForOutput("world=2", milliseconds(20000))) << a->errors();
  ASSERT_TRUE(b->waitForOutput("world=2", milliseconds(20000))) << b->errors();
  const std::string nobody = "127.0.0.1:" + std::to_string(freePort());
  ChildProcess status(
      {RALLY_BINARY, "status", "--rdzv-endpoint", nobody + "," + endpoint_, "--rdzv-id", "status"},
      tempPath("status.out"));
  EXPECT_EQ(exitCode(status), 0) << status.output() << status.errors();
  const std::string out = status.output();
  EXPECT_NE(out.find(nobody + ": no coordinator answers"), std::string::npos) << out;
  EXPECT_NE(out.find(endpoint_ + ": job 'status', generation 1, formed; 2 node(s), 2 worker(s); 0 "
                                 "waiting"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("node rank   0  status-"), std::string::npos) << out;
  EXPECT_NE(out.find("node rank   1  status-"), std::string::npos) << out;
  EXPECT_EQ(count(out, "at 127.0.0.1  1 worker(s)"), 2u) << out;

  ChildProcess json(
      {RALLY_BINARY, "status", "--rdzv-endpoint", endpoint_, "--rdzv-id", "status", "--json"},
      tempPath("status-json.out"));
  EXPECT_EQ(exitCode(json), 0) << json.errors();
  EXPECT_NE(json.output().find("\"generation\": 1"), std::string::npos) << json.output();
  EXPECT_NE(json.output().find("\"state\": \"FORMED\""), std::string::npos) << json.output();
  EXPECT_EQ(count(json.output(), "\"node_id\": \"status-"), 2u) << json.output();

  ChildProcess wrong({"/usr/bin/env", "RALLY_TOKEN=not-the-jobs", RALLY_BINARY, "status",
                      "--rdzv-endpoint", endpoint_},
                     tempPath("status-wrong.out"));
  EXPECT_EQ(exitCode(wrong), 1);
  EXPECT_NE(wrong.output().find("a coordinator that refuses the token"), std::string::npos)
      << wrong.output();

  ChildProcess none({RALLY_BINARY, "status", "--rdzv-endpoint", nobody, "--rdzv-id", "status"},
                    tempPath("status-none.out"));
  EXPECT_EQ(exitCode(none), 1);
  EXPECT_NE(none.errors().find("no coordinator of job 'status' answers at " + nobody),
            std::string::npos)
      << none.errors();
  ChildProcess bad({RALLY_BINARY, "status", "--rdzv-endpoint", "a:0"}, tempPath("status-bad.out"));
  EXPECT_EQ(exitCode(bad), 2);
  EXPECT_NE(bad.errors().find("'a:0' has port '0'"), std::string::npos) << bad.errors();
  a->signal(SIGTERM);
  b->signal(SIGTERM);
  exitCode(*a);
  exitCode(*b);
}

// A TCP listener on loopback that accepts one connection and never answers (a host that hangs,
// or a firewall that lets the connection in): when it came, and whether it was still open when
// `other`'s came.
class SilentListener {
 public:
  SilentListener() {
    const LoopbackListener l = listenOnLoopback(4);
    fd_ = l.fd;
    if (fd_ < 0) {
      ADD_FAILURE() << "cannot listen: " << std::strerror(errno);
      return;
    }
    endpoint_ = "127.0.0.1:" + std::to_string(l.port);
    thread_ = std::thread([this] {
      const int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      {
        std::lock_guard lock(mu_);
        accepted_ = true;
      }
      cv_.notify_all();
      char buf[4096];
      while (::read(c, buf, sizeof buf) > 0) {  // until the client gives up and closes it
      }
      {
        std::lock_guard lock(mu_);
        closed_ = true;
      }
      cv_.notify_all();
      ::close(c);
    });
  }
  ~SilentListener() {
    ::shutdown(fd_, SHUT_RDWR);  // ends an accept() that no connection came to
    if (thread_.joinable()) thread_.join();
    ::close(fd_);
  }
  const std::string& endpoint() const { return endpoint_; }
  // Waits (up to `within`) for the connection; whether it came, and whether it is still open.
  std::pair<bool, bool> waitForConnection(milliseconds within) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, within, [&] { return accepted_; });
    return {accepted_, accepted_ && !closed_};
  }

 private:
  int fd_ = -1;
  std::string endpoint_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool accepted_ = false, closed_ = false;
};

// rally status asks every address at once: with two addresses that never answer, the second is
// asked while the first still waits (asked in turn, it would be asked only once the first had
// given up, after --timeout-ms). Both are reported, in order.
TEST_F(RunTest, StatusAsksEveryAddressAtOnce) {
  SilentListener first, second;
  ChildProcess status(
      {RALLY_BINARY, "status", "--rdzv-endpoint", first.endpoint() + "," + second.endpoint(),
       "--rdzv-id", "silent", "--timeout-ms", "20000"},
      tempPath("status-silent.out"));
  ASSERT_TRUE(first.waitForConnection(milliseconds(10000)).first)
      << "rally status did not connect to the first address";
  EXPECT_TRUE(second.waitForConnection(milliseconds(10000)).first)
      << "the second address was not asked while the first still waited";
  EXPECT_TRUE(first.waitForConnection(milliseconds(0)).second)
      << "the first address had given up before the second was asked";
  EXPECT_EQ(exitCode(status, milliseconds(60000)), 1) << status.errors();
  const std::string out = status.output();
  const auto at_first = out.find(first.endpoint() + ": no coordinator answers");
  const auto at_second = out.find(second.endpoint() + ": no coordinator answers");
  EXPECT_NE(at_first, std::string::npos) << out;
  EXPECT_NE(at_second, std::string::npos) << out;
  EXPECT_LT(at_first, at_second) << "in --rdzv-endpoint's order\n" << out;
}

TEST_F(RunTest, RestartBudgetIsTheJobsAndItsExhaustionIsReportedOnEveryNode) {
  const std::vector<std::string> vars = {"FIRST_SECONDS=30", "LATER_SECONDS=30", "FAIL_RANK=3",
                                         "FAIL_ALWAYS=1", "FAIL_CODE=4"};
  const std::vector<std::string> args = {"--nnodes",        "2",       "--nproc-per-node", "2",
                                         "--rdzv-endpoint", endpoint_, "--rdzv-id",        "budget",
                                         "--max-restarts",  "2"};
  auto a = agent("budget-a", vars, args);
  auto b = agent("budget-b", vars, args);
  EXPECT_EQ(exitCode(*a), 1) << a->errors();
  EXPECT_EQ(exitCode(*b), 1) << b->errors();
  // Two restarts for the job, not per node: rank 3 failed three times in all.
  EXPECT_EQ(count(a->errors() + b->errors(), "\nrank 3 failing with 4"), 3u);
  for (auto* p : {a.get(), b.get()}) {
    const std::string err = p->errors();
    EXPECT_NE(err.find("failed after 2 restart(s) (--max-restarts 2)"), std::string::npos) << err;
    EXPECT_NE(err.find("root cause"), std::string::npos);
    EXPECT_NE(err.find("ranks       : node 1, local 1, global 3"), std::string::npos) << err;
    EXPECT_NE(err.find("exit        : exit code 4"), std::string::npos);
    EXPECT_NE(err.find("    rank 3 failing with 4"), std::string::npos) << "stderr tail";
  }
}

TEST_F(RunTest, SignalIsForwardedToWorkers) {
  const std::string script = tempPath("trap.sh");
  std::ofstream(script) << "#!/bin/sh\ntrap 'echo worker got TERM; exit 0' TERM\necho ready\n"
                           "while :; do sleep 0.02; done\n";
  chmod(script.c_str(), 0755);
  ChildProcess p({RALLY_BINARY, "run", "--nproc-per-node", "2", script}, tempPath("sig.out"));
  ASSERT_TRUE(p.waitForOutput("ready\nready", milliseconds(20000)) ||
              p.waitForOutput("ready", milliseconds(1)));
  std::this_thread::sleep_for(milliseconds(300));
  p.signal(SIGTERM);
  EXPECT_EQ(exitCode(p, milliseconds(10000)), 128 + SIGTERM);
  EXPECT_EQ(count(p.output(), "worker got TERM"), 2u) << p.output() << p.errors();
}

TEST_F(RunTest, WorkersGetTorchrunsEnvironment) {
  ChildProcess p({"/usr/bin/env", "-u", "OMP_NUM_THREADS", RALLY_BINARY, "run", "--nproc-per-node",
                  "2", "--rdzv-id", "envjob", "--role", "trainer", "--max-restarts", "3",
                  "--no-python", "/usr/bin/env"},
                 tempPath("env.out"));
  ASSERT_EQ(exitCode(p), 0) << p.errors();
  const std::string out = p.output();
  for (const char* expected : {"LOCAL_RANK=0",
                               "LOCAL_RANK=1",
                               "RANK=1",
                               "GROUP_RANK=0",
                               "ROLE_RANK=1",
                               "ROLE_NAME=trainer",
                               "LOCAL_WORLD_SIZE=2",
                               "WORLD_SIZE=2",
                               "GROUP_WORLD_SIZE=1",
                               "ROLE_WORLD_SIZE=2",
                               "MASTER_ADDR=127.0.0.1",
                               "MASTER_PORT=",
                               "TORCHELASTIC_RESTART_COUNT=0",
                               "TORCHELASTIC_MAX_RESTARTS=3",
                               "TORCHELASTIC_RUN_ID=envjob",
                               "TORCHELASTIC_ERROR_FILE=",
                               "OMP_NUM_THREADS=1",
                               "RALLY_RANK=1",
                               "RALLY_GENERATION=1",
                               "RALLY_COORDINATOR=127.0.0.1:"}) {
    EXPECT_NE(out.find(std::string("\n") + expected), std::string::npos) << expected;
  }
}

TEST_F(RunTest, StaticBackendUsesTheGivenRanks) {
  ChildProcess p({"/usr/bin/env", RALLY_BINARY, "run", "--rdzv-backend", "static", "--nnodes", "2",
                  "--node-rank", "1", "--nproc-per-node", "2", "--master-addr", "10.9.9.9",
                  "--master-port", "29999", "--no-python", "/usr/bin/env"},
                 tempPath("static.out"));
  ASSERT_EQ(exitCode(p), 0) << p.errors();
  const std::string out = p.output();
  for (const char* expected : {"\nRANK=2", "\nRANK=3", "\nGROUP_RANK=1", "\nWORLD_SIZE=4",
                               "\nMASTER_ADDR=10.9.9.9", "\nMASTER_PORT=29999"}) {
    EXPECT_NE(out.find(expected), std::string::npos) << expected;
  }
}

TEST_F(RunTest, UnreachableCoordinatorIsAnErrorNamingIt) {
  // A port where nothing listens, on an address that is not this host's: the agent cannot host it.
  ChildProcess p(
      {RALLY_BINARY, "run", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:9", "--rdzv-conf",
       "is_host=false", "--connect-timeout", "1s", "--no-python", "/bin/true"},
      tempPath("unreachable.out"));
  EXPECT_EQ(exitCode(p), 1);
  EXPECT_NE(p.errors().find("cannot reach the coordinator at 127.0.0.1:9"), std::string::npos)
      << p.errors();
}

TEST_F(RunTest, JoinsAStandaloneCoordinatorWithItsToken) {
  const std::string token_file = tempPath("standalone.token");
  ::unlink(token_file.c_str());
  const std::string port = endpoint_.substr(endpoint_.find(':') + 1);
  ChildProcess coord({RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port", port,
                      "--token-file", token_file, "--job-id", "solo"},
                     tempPath("standalone.coord"));
  ASSERT_TRUE(coord.waitForOutput("listening", milliseconds(10000))) << coord.errors();
  std::string token;
  std::ifstream(token_file) >> token;

  // Without the token the node is refused, and told why.
  auto refused =
      agent("solo-x", {}, {"--nnodes", "1", "--rdzv-endpoint", endpoint_, "--rdzv-id", "solo"});
  EXPECT_EQ(exitCode(*refused), 1);
  EXPECT_NE(refused->errors().find("refused this node's job token"), std::string::npos)
      << refused->errors();
  // With it: a job id the coordinator does not serve is refused by name; its own job runs.
  auto wrong = agent("solo-b", {"RALLY_TOKEN=" + token},
                     {"--nnodes", "1", "--rdzv-endpoint", endpoint_, "--rdzv-id", "other"});
  EXPECT_EQ(exitCode(*wrong), 1);
  EXPECT_NE(wrong->errors().find("refused this node: node 'solo-b' is for job 'other'"),
            std::string::npos)
      << wrong->errors();
  // The same with standby addresses: the coordinator on this host's port is joined, so that its
  // refusal is reported, rather than looked for elsewhere until --connect-timeout.
  auto listed = agent(
      "solo-c", {"RALLY_TOKEN=" + token},
      {"--nnodes", "1", "--rdzv-endpoint", endpoint_ + ",127.0.0.1:" + std::to_string(freePort()),
       "--rdzv-id", "other", "--connect-timeout", "20s"});
  EXPECT_EQ(exitCode(*listed), 1);
  EXPECT_NE(listed->errors().find("refused this node: node 'solo-c' is for job 'other'"),
            std::string::npos)
      << listed->errors();
  auto ok = agent("solo-a", {"RALLY_TOKEN=" + token},
                  {"--nnodes", "1", "--rdzv-endpoint", endpoint_, "--rdzv-id", "solo"});
  EXPECT_EQ(exitCode(*ok), 0) << ok->errors();
  coord.signal(SIGTERM);
  ::unlink(token_file.c_str());
}

// --events in a directory that does not exist yet (a fresh volume): it is made.
TEST_F(RunTest, TheEventLogsDirectoryIsMade) {
  const std::string events = tempPath("new-dir") + "/sub/events.jsonl";
  ChildProcess p({RALLY_BINARY, "run", "--events", events, "--no-python", "/bin/true"},
                 tempPath("events.out"));
  ASSERT_EQ(exitCode(p), 0) << p.errors();
  std::ifstream in(events);
  std::string first;
  ASSERT_TRUE(std::getline(in, first)) << "no events in " << events;
  EXPECT_NE(first.find("\"event\""), std::string::npos) << first;
}

TEST_F(RunTest, BadInputExitsWithCode2AndOneLine) {
  for (std::vector<std::string> args :
       std::vector<std::vector<std::string>>{{"--nnodes", "3:2", "x.py"},
                                             {"--nproc-per-node", "-1", "x.py"},
                                             {"--rdzv-backend", "etcd3", "x.py"},
                                             {"--nproc-per-node", "2"},
                                             {"--trace-buffer", "-1", "/bin/true"},
                                             {"--telemetry-interval", "1ms", "/bin/true"},
                                             {"--trace-dir", "/proc/none", "/bin/true"}}) {
    std::vector<std::string> argv = {RALLY_BINARY, "run"};
    argv.insert(argv.end(), args.begin(), args.end());
    ChildProcess p(argv, tempPath("bad.out"));
    EXPECT_EQ(exitCode(p, milliseconds(10000)), 2) << args[0];
    EXPECT_EQ(count(p.errors(), "\n"), 1u) << p.errors();
  }
}

}  // namespace
}  // namespace rally::testing
