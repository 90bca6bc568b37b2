// Real processes: an agent killed with SIGKILL moves the generation for the others at once,
// `rally coordinator` serves, tells its clients when it is stopped with SIGTERM, and refuses bad
// input with exit code 2, and the coordinator `rally run` hosts takes RALLY_MAX_MESSAGE_BYTES.
#include "tests/integration/process.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <optional>

#include "tests/integration/coordinator/coordinator_fixture.h"

namespace rally::testing {
namespace {

namespace v1 = rally::v1;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

class ProcessTest : public CoordinatorFixture {};

TEST_F(ProcessTest, AgentKilledWithSigkillMovesGenerationWithinBound) {
  auto watcher = rendezvous::GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  auto local = join("local");
  const std::string token_file = tempPath("victim.token");
  std::ofstream(token_file) << kToken << "\n";
  ChildProcess agent({RALLY_SIM_AGENT, endpoint_, token_file, "victim", "job"}, tempPath("victim"));
  ASSERT_GT(agent.pid(), 0);
  ASSERT_TRUE(agent.waitForOutput("joined", milliseconds(10000))) << agent.errors();
  // Both nodes are in one round now (it formed when the second arrived, or re-formed for it).
  if (!agent.waitForOutput("node rank", milliseconds(1000))) {
    local->requestReform("admit the victim");
    ASSERT_TRUE(agent.waitForOutput("node rank", milliseconds(5000))) << agent.output();
  }
  const std::uint64_t before = server_->service().stats().generation;

  const auto t0 = Clock::now();
  agent.signal(SIGKILL);
  auto ev =
      (*watcher)->waitFor([&](const v1::GenerationEvent& e) { return e.failed_node() == "victim"; },
                          milliseconds(10000));
  const auto latency = std::chrono::duration_cast<milliseconds>(Clock::now() - t0).count();
  ASSERT_TRUE(ev.ok()) << ev.status().toString();
  EXPECT_GT(ev->generation(), before);
  // The bound: the kernel closes a killed process's sockets, so the stream breaks at once; 1 s
  // leaves room for a loaded CI machine and is 2x below the heartbeat bound (2 intervals).
  EXPECT_LT(latency, 1000) << "generation moved " << latency << " ms after SIGKILL";
  const int status = agent.waitExit(milliseconds(5000));
  EXPECT_TRUE(WIFSIGNALED(status));
  auto f = local->waitFor(
      [&](const v1::CoordinatorMessage& m) {
        return m.has_round_formed() && m.round_formed().generation() == ev->generation();
      },
      milliseconds(5000));
  ASSERT_TRUE(f.ok()) << "the survivor gets the new round";
  EXPECT_EQ(f->round_formed().num_nodes(), 1u);
}

class CoordinatorCliTest : public ::testing::Test {};

TEST_F(CoordinatorCliTest, ServesAndTellsClientsOnSigterm) {
  const std::string token_file = tempPath("token");
  const std::string port_file = tempPath("port");
  ::unlink(token_file.c_str());
  ::unlink(port_file.c_str());
  ChildProcess coord({RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port", "0",
                      "--token-file", token_file, "--port-file", port_file, "--nnodes", "1:2",
                      "--job-id", "cli-job", "--heartbeat-interval", "300ms"},
                     tempPath("coord"));
  ASSERT_TRUE(coord.waitForOutput("listening on 127.0.0.1:", milliseconds(10000)))
      << coord.errors();
  const std::string port = ChildProcess::readFile(port_file);
  ASSERT_FALSE(port.empty());
  EXPECT_NE(coord.output().find("new token written to " + token_file), std::string::npos);
  auto token = rendezvous::readTokenFile(token_file);
  ASSERT_TRUE(token.ok()) << token.status().toString();
  EXPECT_EQ(token->size(), 32u);

  rendezvous::ClientOptions o;
  o.endpoint = "127.0.0.1:" + port.substr(0, port.find('\n'));
  o.token = *token;
  auto conn = rendezvous::CoordinatorConnection::open(o);
  ASSERT_TRUE(conn.ok());
  auto session = rendezvous::AgentSession::open(*conn, {.node_id = "n0", .job_id = "cli-job"});
  ASSERT_TRUE(session.ok());
  auto welcome = (*session)->next(milliseconds(5000));
  ASSERT_TRUE(welcome.ok()) << welcome.status().toString();
  EXPECT_EQ(welcome->welcome().heartbeat_interval_ms(), 300u);
  EXPECT_EQ(welcome->welcome().max_nodes(), 2u);

  // A second coordinator on the same port names the address it could not take.
  ChildProcess second({RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port",
                       port.substr(0, port.find('\n')), "--token-file", token_file},
                      tempPath("second"));
  const int second_status = second.waitExit(milliseconds(10000));
  ASSERT_TRUE(WIFEXITED(second_status));
  EXPECT_EQ(WEXITSTATUS(second_status), 1);
  EXPECT_NE(second.errors().find("127.0.0.1:" + port.substr(0, port.find('\n'))), std::string::npos)
      << second.errors();

  const auto t0 = Clock::now();
  coord.signal(SIGTERM);
  auto msg =
      (*session)->waitFor([](const auto& m) { return m.has_shutdown(); }, milliseconds(5000));
  ASSERT_TRUE(msg.ok()) << msg.status().toString();
  EXPECT_NE(msg->shutdown().reason().find("SIGTERM"), std::string::npos);
  const int status = coord.waitExit(milliseconds(10000));
  ASSERT_TRUE(WIFEXITED(status)) << "coordinator did not exit after SIGTERM";
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_LT(std::chrono::duration_cast<milliseconds>(Clock::now() - t0).count(), 5000);
  ::unlink(token_file.c_str());
  ::unlink(port_file.c_str());
}

// The coordinator that `rally run` hosts takes its message limit from RALLY_MAX_MESSAGE_BYTES, as
// its clients do (before, it kept gRPC's 4 MiB: the job scope's snapshots, cut to the limit it
// was told, went to agents that could not take them).
TEST_F(CoordinatorCliTest, TheCoordinatorOfRallyRunTakesTheMessageLimit) {
  const std::string endpoint = "127.0.0.1:" + std::to_string(freePort());
  // The agent's token, for this child only: what the environment had is put back.
  const char* had = std::getenv("RALLY_TOKEN");
  const std::optional<std::string> saved = had ? std::optional<std::string>(had) : std::nullopt;
  ::setenv("RALLY_TOKEN", kToken, 1);
  ChildProcess agent(
      {RALLY_BINARY, "run", "--nnodes", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "msg-job",
       "--max-message-bytes", "64KiB", "--state-dir", tempPath("msg-state"), "/bin/sleep", "30"},
      tempPath("msg-agent"));
  if (saved) {
    ::setenv("RALLY_TOKEN", saved->c_str(), 1);
  } else {
    ::unsetenv("RALLY_TOKEN");
  }
  ASSERT_TRUE(agent.waitForErrors("started 1 worker(s)", milliseconds(20000))) << agent.errors();
  rendezvous::ClientOptions o;
  o.endpoint = endpoint;
  o.token = kToken;
  o.max_message_bytes = 4 << 20;  // this client would send more: the coordinator refuses it
  auto conn = rendezvous::CoordinatorConnection::open(o);
  ASSERT_TRUE(conn.ok()) << conn.status().toString();
  rendezvous::StoreClient store(*conn);
  EXPECT_TRUE(store.set("small", std::string(10 << 10, 's')).ok());
  const Status big = store.set("big", std::string(100 << 10, 'b'));
  EXPECT_EQ(big.code(), StatusCode::kResourceExhausted) << big.toString();
  agent.signal(SIGTERM);
  EXPECT_TRUE(WIFEXITED(agent.waitExit(milliseconds(20000)))) << agent.errors();
}

TEST_F(CoordinatorCliTest, BadFlagsExitWithCode2AndOneClearLine) {
  struct Case {
    std::vector<std::string> args;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{"--nnodes", "3:2"}, "MIN is larger than MAX"},
      {{"--nnodes", "x"}, "--nnodes 'x'"},
      {{"--port", "70000"}, "70000"},
      {{"--last-call", "soon"}, "soon"},
      {{"--bogus"}, "--bogus"},
      {{}, "no job token"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {RALLY_BINARY, "coordinator", "--port", "0"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    ChildProcess p(argv, tempPath("bad"));
    const int status = p.waitExit(milliseconds(10000));
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 2) << c.expect;
    EXPECT_NE(p.errors().find(c.expect), std::string::npos) << p.errors();
  }
}

}  // namespace
}  // namespace rally::testing
