// rally::init() in each environment: no launcher (a world of one; a torchrun-style WORLD_SIZE
// without a launcher is refused with what to do), bad variables named, and under `rally run`
// (RALLY_COORDINATOR): two workers build their communicator through the coordinator's store, and
// when the job's generation moves (a node's stream breaks) a collective blocked on a peer returns
// Aborted (or PeerLost) within 2 s, not at its 60 s timeout. Fault firings are claimed once per
// job. When the coordinator dies (a `rally coordinator` process SIGKILLed: the watch's stream
// breaks with no event), the worlds try to watch again for connect_timeout, then close: a blocked
// collective ends within that bound instead of at its timeout, and the message names the cause.
#include "runtime/world/world.h"

#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/integration/coordinator/coordinator_fixture.h"
#include "tests/integration/process.h"

namespace rally::testing {
namespace {

using collectives::DataType;
using collectives::ReduceOp;
using std::chrono::milliseconds;

TEST(WorldWithoutLauncher, IsAWorldOfOne) {
  auto w = initFrom({});
  ASSERT_TRUE(w.ok()) << w.status().toString();
  EXPECT_EQ((*w)->rank(), 0);
  EXPECT_EQ((*w)->size(), 1);
  EXPECT_EQ((*w)->launcher(), Launcher::kNone);
  EXPECT_FALSE((*w)->generationChanged());
  float x = 2.5f;
  ASSERT_TRUE(
      (*w)->comm().allreduce(&x, 1, DataType::kF32, ReduceOp::kSum)->wait(milliseconds(5000)).ok());
  EXPECT_EQ(x, 2.5f);
  EXPECT_NE((*w)->describe().find("rank 0 of 1"), std::string::npos) << (*w)->describe();
  auto claim = (*w)->firedFaults()->claim(0);
  ASSERT_TRUE(claim.ok());
  EXPECT_TRUE(*claim);
  EXPECT_FALSE(*(*w)->firedFaults()->claim(0));
}

TEST(WorldWithoutLauncher, RefusesAMultiProcessEnvironmentItCannotJoin) {
  auto w = initFrom({{"WORLD_SIZE", "4"}, {"RANK", "1"}});
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(w.status().message().find("rally run"), std::string::npos) << w.status().message();
}

TEST(WorldWithoutLauncher, RefusesAnUnknownMallocSetting) {
  auto w = initFrom({{"RALLY_MALLOC_TUNING", "maybe"}});
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(w.status().message().find("RALLY_MALLOC_TUNING=maybe is not a setting: use on or off"),
            std::string::npos)
      << w.status().message();
  EXPECT_TRUE(initFrom({{"RALLY_MALLOC_TUNING", "off"}}).ok());
}

TEST(WorldWithoutLauncher, WritesItsTraceAndMetricsEveryIntervalAndAtTheEnd) {
  const std::string dir = tempPath("world-telemetry");
  std::filesystem::remove_all(dir);
  const std::string trace = dir + "/trace/collectives-rank0.json";
  const std::string metrics = dir + "/metrics/rally-rank0.prom";
  {
    auto w = initFrom({{"RALLY_TRACE_DIR", dir + "/trace"},
                       {"RALLY_METRICS_DIR", dir + "/metrics"},
                       {"RALLY_TRACE_BUFFER", "2"},
                       {"RALLY_TELEMETRY_INTERVAL", "100ms"}});
    ASSERT_TRUE(w.ok()) << w.status().toString();
    std::vector<float> x(6, 1.0f);
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE((*w)->comm()
                      .allreduce(x.data(), x.size(), DataType::kF32, ReduceOp::kSum)
                      ->wait(milliseconds(5000))
                      .ok());
    }
    (*w)->reportProgress(41);
    // The interval's writer, while the world lives (bounded: 5 s).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (ChildProcess::readFile(metrics).find("rally_step{") == std::string::npos &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(milliseconds(20));
    }
    EXPECT_NE(ChildProcess::readFile(metrics).find("} 41\n"), std::string::npos);
    EXPECT_EQ((*w)->recentCollectives(1).rfind("#3 allreduce 24 B (6 x f32, sum) on world", 0), 0u)
        << (*w)->recentCollectives(1);
    (*w)->reportProgress(42);
  }
  // At the end: the last step, and the newest 2 of 3 allreduces (RALLY_TRACE_BUFFER).
  const std::string prom = ChildProcess::readFile(metrics);
  EXPECT_NE(prom.find("rally_step{local_rank=\"0\",node=\""), std::string::npos) << prom;
  EXPECT_NE(prom.find("} 42\n"), std::string::npos) << prom;
  EXPECT_NE(prom.find("rally_collective_operations_total{backend=\"gloo\",comm=\"world\","
                      "local_rank=\"0\",node=\""),
            std::string::npos)
      << prom;
  const std::string json = ChildProcess::readFile(trace);
  EXPECT_EQ(count(json, "\"ph\":\"X\""), 2u) << json;
  EXPECT_NE(json.find("\"dropped\":1"), std::string::npos) << json;
  EXPECT_NE(json.find("\"seq\":3"), std::string::npos) << json;
}

TEST(WorldWithoutLauncher, RefusesABadTelemetrySetting) {
  auto w = initFrom({{"RALLY_TRACE_BUFFER", "-1"}});
  ASSERT_FALSE(w.ok());
  EXPECT_NE(
      w.status().message().find("RALLY_TRACE_BUFFER='-1' is not a whole number of at least 0"),
      std::string::npos)
      << w.status().message();
  w = initFrom({{"RALLY_TELEMETRY_INTERVAL", "5ms"}});
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find(
                "RALLY_TELEMETRY_INTERVAL='5ms' is not a duration of at least 100ms"),
            std::string::npos)
      << w.status().message();
}

TEST(WorldUnderRally, NamesAMissingOrBadVariable) {
  std::map<std::string, std::string> env = {
      {"RALLY_COORDINATOR", "127.0.0.1:1"}, {"RALLY_WORLD_SIZE", "2"}, {"RALLY_RANK", "x"}};
  auto w = initFrom(env);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(w.status().message().find("RALLY_RANK='x' is not a whole number"), std::string::npos)
      << w.status().message();
  env["RALLY_RANK"] = "2";
  w = initFrom(env);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("RALLY_RANK=2 is not below RALLY_WORLD_SIZE=2"),
            std::string::npos);
  env["RALLY_RANK"] = "0";
  w = initFrom(env);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("RALLY_LOCAL_WORLD_SIZE is not set (rally run sets it)"),
            std::string::npos)
      << w.status().message();
}

class WorldUnderRallyTest : public CoordinatorFixture {
 protected:
  std::map<std::string, std::string> env(int rank, std::uint64_t gen) {
    return {{"RALLY_COORDINATOR", endpoint_},
            {"RALLY_TOKEN", kToken},
            {"RALLY_RANK", std::to_string(rank)},
            {"RALLY_WORLD_SIZE", "2"},
            {"RALLY_LOCAL_RANK", "0"},
            {"RALLY_LOCAL_WORLD_SIZE", "1"},
            {"RALLY_NODE_RANK", std::to_string(rank)},
            {"RALLY_NUM_NODES", "2"},
            {"RALLY_GENERATION", std::to_string(gen)},
            {"RALLY_BACKEND", "gloo"}};
  }
};

TEST_F(WorldUnderRallyTest, GenerationMoveAbortsABlockedCollectiveAtOnce) {
  auto a = join("a");
  auto b = join("b");
  for (auto* s : {a.get(), b.get()})
    ASSERT_TRUE(s->waitFor(isRoundFormed, milliseconds(5000)).ok());
  const std::uint64_t gen = server_->service().stats().generation;
  std::vector<std::unique_ptr<World>> worlds(2);
  std::vector<std::thread> threads;
  // Rank 0 keeps a trace (rewritten every 10 s: not within this test, unless the move asks).
  const std::string trace_dir = tempPath("world-move-trace");
  std::filesystem::remove_all(trace_dir);
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto vars = env(r, gen);
      if (r == 0) vars["RALLY_TRACE_DIR"] = trace_dir;
      auto w = initFrom(vars, {.op_timeout = Milliseconds(60'000)});
      ASSERT_TRUE(w.ok()) << w.status().toString();
      float x = static_cast<float>(r + 1);
      ASSERT_TRUE((*w)->comm()
                      .allreduce(&x, 1, DataType::kF32, ReduceOp::kSum)
                      ->wait(milliseconds(10000))
                      .ok());
      EXPECT_EQ(x, 3.0f);
      worlds[r] = std::move(*w);
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(worlds[0] && worlds[1]);
  EXPECT_EQ(worlds[1]->launcher(), Launcher::kRally);
  EXPECT_EQ(worlds[1]->generation(), gen);
  // Fault firings: once per job, whichever world asks.
  EXPECT_TRUE(*worlds[0]->firedFaults()->claim(5));
  EXPECT_FALSE(*worlds[1]->firedFaults()->claim(5));

  // Rank 0 waits in an allreduce that rank 1 never joins; node b's session breaks.
  float x = 1;
  auto work = worlds[0]->comm().allreduce(&x, 1, DataType::kF32, ReduceOp::kSum);
  std::this_thread::sleep_for(milliseconds(100));
  const auto t0 = std::chrono::steady_clock::now();
  b->cancel();
  const Status s = work->wait(milliseconds(30'000));
  const auto took = std::chrono::steady_clock::now() - t0;
  // Aborted by its own watch, or PeerLost when rank 1's watch aborted the shared communicator
  // first: either way at once.
  EXPECT_TRUE(s.code() == StatusCode::kAborted || s.code() == StatusCode::kPeerLost)
      << s.toString();
  EXPECT_LT(took, milliseconds(2000));
  for (int i = 0; i < 200 && !worlds[0]->generationChanged(); ++i) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  EXPECT_TRUE(worlds[0]->generationChanged());
  EXPECT_GT(worlds[0]->latestGeneration(), gen);
  // The move had rank 0's trace written at once, with the allreduce it was in (bounded: 5 s).
  const std::string trace = trace_dir + "/collectives-rank0.json";
  std::string text;
  for (int i = 0; i < 500 && text.find("\"seq\":2") == std::string::npos; ++i) {
    std::this_thread::sleep_for(milliseconds(10));
    text = ChildProcess::readFile(trace);
  }
  EXPECT_NE(text.find("\"seq\":2"), std::string::npos) << trace << ": " << text;
}

TEST(WorldUnderRallyCoordinatorLost, ABlockedCollectiveEndsAndTheWorldCloses) {
  const std::string token_file = tempPath("world-lost.token"),
                    port_file = tempPath("world-lost.port");
  std::ofstream(token_file) << kToken;
  std::remove(port_file.c_str());
  ChildProcess coordinator(
      {RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port", "0", "--port-file", port_file,
       "--token-file", token_file, "--nnodes", "1:4", "--job-id", "job", "--last-call", "200ms"},
      tempPath("world-lost.out"));
  ASSERT_TRUE(coordinator.waitForOutput("listening", milliseconds(20000)) ||
              coordinator.waitForErrors("listening", milliseconds(100)))
      << coordinator.errors();
  const std::string endpoint = "127.0.0.1:" + ChildProcess::readFile(port_file);
  auto session = [&](const std::string& node) {
    rendezvous::ClientOptions o;
    o.endpoint = endpoint;
    o.token = kToken;
    o.dedicated_connection = true;
    auto conn = rendezvous::CoordinatorConnection::open(o);
    EXPECT_TRUE(conn.ok()) << conn.status().toString();
    auto s = rendezvous::AgentSession::open(
        *conn, {.node_id = node, .job_id = "job", .local_world_size = 1, .address = node});
    EXPECT_TRUE(s.ok()) << s.status().toString();
    return std::move(*s);
  };
  auto a = session("a");
  auto b = session("b");
  for (auto* s : {a.get(), b.get()}) {
    ASSERT_TRUE(
        s->waitFor([](const rally::v1::CoordinatorMessage& m) { return m.has_round_formed(); },
                   milliseconds(5000))
            .ok());
  }
  std::vector<std::unique_ptr<World>> worlds(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      std::map<std::string, std::string> env = {{"RALLY_COORDINATOR", endpoint},
                                                {"RALLY_TOKEN", kToken},
                                                {"RALLY_RANK", std::to_string(r)},
                                                {"RALLY_WORLD_SIZE", "2"},
                                                {"RALLY_LOCAL_RANK", "0"},
                                                {"RALLY_LOCAL_WORLD_SIZE", "1"},
                                                {"RALLY_NODE_RANK", std::to_string(r)},
                                                {"RALLY_NUM_NODES", "2"},
                                                {"RALLY_GENERATION", "1"},
                                                {"RALLY_BACKEND", "gloo"}};
      auto w = initFrom(
          env, {.connect_timeout = Milliseconds(1500), .op_timeout = Milliseconds(60'000)});
      ASSERT_TRUE(w.ok()) << w.status().toString();
      worlds[r] = std::move(*w);
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(worlds[0] && worlds[1]);
  float x = 1;
  auto work = worlds[0]->comm().allreduce(&x, 1, DataType::kF32, ReduceOp::kSum);
  const auto t0 = std::chrono::steady_clock::now();
  coordinator.signal(SIGKILL);
  const Status s = work->wait(milliseconds(30'000));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(s.code() == StatusCode::kAborted || s.code() == StatusCode::kPeerLost)
      << s.toString();
  EXPECT_LT(took, milliseconds(6000)) << "not bounded by connect_timeout (1.5 s) plus retries";
  for (int i = 0; i < 400 && !(worlds[0]->closed() && worlds[1]->closed()); ++i) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(worlds[0]->closed());
  EXPECT_TRUE(worlds[1]->closed());
  EXPECT_TRUE(worlds[0]->generationChanged());
  // Whichever rank noticed first aborted with the cause; the other may see its peer go.
  if (s.code() == StatusCode::kAborted) {
    EXPECT_NE(s.message().find("lost the job's coordinator"), std::string::npos) << s.message();
  }
}

}  // namespace
}  // namespace rally::testing
