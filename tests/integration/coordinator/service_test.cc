// The coordinator service over loopback: auth, every store operation, concurrency, waits, limits,
// rendezvous, liveness (broken streams and missed heartbeats), load, shutdown. The job scope's
// copies and claims are in service_job_scope_test.cc.
#include <grpcpp/generic/generic_stub.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <tuple>

#include "runtime/rendezvous/grpc_status.h"
#include "tests/integration/coordinator/coordinator_fixture.h"
#include "tests/integration/process.h"

namespace rally::testing {
namespace {

namespace v1 = rally::v1;
using rendezvous::AgentSession;
using rendezvous::GenerationWatcher;
using rendezvous::StoreClient;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

long long msSince(Clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count();
}

class ServiceTest : public CoordinatorFixture {};

TEST_F(ServiceTest, MissingOrWrongTokenIsRefusedAndChangesNothing) {
  auto conn = connect();
  grpc::ClientContext ctx;  // no token
  ctx.set_deadline(std::chrono::system_clock::now() + milliseconds(5000));
  v1::SetRequest req;
  req.set_key("k");
  req.set_value("v");
  v1::SetResponse resp;
  const grpc::Status raw = conn->stub()->Set(&ctx, req, &resp);
  EXPECT_EQ(raw.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(raw.error_message().find("missing job token"), std::string::npos);

  StoreClient wrong(connect("not-the-token"));
  const Status s = wrong.set("k", "v");
  EXPECT_EQ(s.code(), StatusCode::kUnauthenticated);
  EXPECT_NE(s.message().find("wrong job token"), std::string::npos) << s.message();
  EXPECT_EQ(wrong.add("n", 1).status().code(), StatusCode::kUnauthenticated);

  auto session =
      AgentSession::open(connect("not-the-token", true), {.node_id = "intruder", .job_id = "job"});
  ASSERT_TRUE(session.ok());
  auto end = (*session)->endStatus(milliseconds(5000));
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(end->code(), StatusCode::kUnauthenticated);

  StoreClient good(connect());
  EXPECT_FALSE(good.get("k")->has_value()) << "a refused call changed the store";
  EXPECT_FALSE(good.get("n")->has_value());
  EXPECT_EQ(server_->service().stats().sessions, 0u);
  EXPECT_EQ(server_->service().stats().generation, 0u);
}

TEST_F(ServiceTest, EveryStoreOperation) {
  StoreClient store(connect());
  ASSERT_TRUE(store.set("a", "1").ok());
  EXPECT_EQ(**store.get("a"), "1");
  EXPECT_FALSE(store.get("b")->has_value());
  EXPECT_EQ(*store.add("counter", 3), 3);
  EXPECT_EQ(*store.add("counter", 4), 7);
  auto cas = store.compareAndSet("lock", std::nullopt, "owner-1");
  ASSERT_TRUE(cas.ok());
  EXPECT_TRUE(cas->swapped);
  cas = store.compareAndSet("lock", std::nullopt, "owner-2");
  EXPECT_FALSE(cas->swapped);
  EXPECT_EQ(cas->value, "owner-1");
  cas = store.compareAndSet("lock", std::string("owner-1"), "owner-2");
  EXPECT_TRUE(cas->swapped);
  EXPECT_TRUE(*store.remove("a"));
  EXPECT_FALSE(*store.remove("a"));

  StoreClient scoped = store.scoped("group/", 0);
  for (int i = 0; i < 1500; ++i) ASSERT_TRUE(scoped.set("k" + std::to_string(i), "v").ok());
  auto keys = scoped.list();
  ASSERT_TRUE(keys.ok());
  EXPECT_EQ(keys->size(), 1500u) << "listing pages through more than one response";
  EXPECT_EQ(keys->front(), "k0") << "keys come back without the view's prefix";
  EXPECT_EQ(store.list("group/k149")->size(), 11u);
  EXPECT_TRUE(store.wait({"counter", "lock"}, milliseconds(1000)).ok());
}

TEST_F(ServiceTest, ConcurrentAddAndCompareAndSetFromManyClients) {
  constexpr int kClients = 8, kAdds = 50, kCas = 20;
  std::vector<std::thread> threads;
  std::atomic<int> cas_retries{0};
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&] {
      StoreClient store(connect(kToken, /*dedicated=*/true));
      for (int i = 0; i < kAdds; ++i) ASSERT_TRUE(store.add("sum", 1).ok());
      for (int i = 0; i < kCas; ++i) {
        for (;;) {  // a correct read-modify-write through compare-and-set
          auto cur = store.get("cas");
          ASSERT_TRUE(cur.ok());
          const std::optional<std::string> expected = *cur;
          const int next = expected ? std::stoi(*expected) + 1 : 1;
          auto r = store.compareAndSet("cas", expected, std::to_string(next));
          ASSERT_TRUE(r.ok());
          if (r->swapped) break;
          ++cas_retries;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  StoreClient store(connect());
  EXPECT_EQ(**store.get("sum"), std::to_string(kClients * kAdds));
  EXPECT_EQ(**store.get("cas"), std::to_string(kClients * kCas)) << "no lost update";
}

TEST_F(ServiceTest, WaitTimesOutSucceedsAndIsAbortedByGenerationEnd) {
  StoreClient store(connect());
  auto t0 = Clock::now();
  const Status timed_out = store.wait({"never"}, milliseconds(300));
  EXPECT_EQ(timed_out.code(), StatusCode::kTimeout);
  EXPECT_NE(timed_out.message().find("never"), std::string::npos) << timed_out.message();
  EXPECT_GE(msSince(t0), 290);
  EXPECT_LT(msSince(t0), 3000);

  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(100));
    StoreClient other(connect(kToken, true));
    ASSERT_TRUE(other.set("later", "x").ok());
  });
  EXPECT_TRUE(store.wait({"later"}, milliseconds(5000)).ok());
  setter.join();

  // A wait in generation 1 ends at once (Aborted) when the generation moves.
  auto a = join("a");
  auto b = join("b");
  for (auto* s : {a.get(), b.get()})
    ASSERT_TRUE(s->waitFor(isRoundFormed, milliseconds(5000)).ok());
  ASSERT_EQ(server_->service().stats().generation, 1u);
  StoreClient gen1 = store.scoped("boot/", 1);
  ASSERT_TRUE(gen1.set("rank0", "addr").ok());
  Status aborted_wait;
  std::thread waiter([&] { aborted_wait = gen1.wait({"rank1"}, milliseconds(10000)); });
  std::this_thread::sleep_for(milliseconds(200));
  t0 = Clock::now();
  b->cancel();
  waiter.join();
  EXPECT_EQ(aborted_wait.code(), StatusCode::kAborted) << aborted_wait.toString();
  EXPECT_LT(msSince(t0), 2000);
  EXPECT_EQ(gen1.get("rank0").status().code(), StatusCode::kAborted)
      << "generation 1's keys were dropped";
  EXPECT_FALSE(store.scoped("boot/", 2).get("rank0")->has_value());
}

TEST_F(ServiceTest, KeyAndValueLimitsNameTheLimit) {
  StoreClient store(connect());
  const Status big_value = store.set("k", std::string(2 << 20, 'x'));
  EXPECT_EQ(big_value.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(big_value.message().find("max_value_bytes"), std::string::npos) << big_value.message();
  const Status big_key = store.set(std::string(2000, 'k'), "v");
  EXPECT_EQ(big_key.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(big_key.message().find("max_key_bytes"), std::string::npos);
}

TEST_F(ServiceTest, KeyCountAndMessageSizeLimits) {
  server_->shutdown("restart with small limits");
  auto options = defaultOptions();
  options.kv.max_keys = 10;
  options.kv.max_value_bytes = 1 << 20;
  startServer(options, /*max_message_bytes=*/64 << 10);
  StoreClient store(connect());
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(store.set("k" + std::to_string(i), "v").ok());
  const Status full = store.set("k10", "v");
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("max_keys = 10"), std::string::npos) << full.message();
  ASSERT_TRUE(store.remove("k0").ok());
  EXPECT_TRUE(store.set("k10", "v").ok()) << "room again after a delete";

  const Status oversized = store.set("k1", std::string(100 << 10, 'x'));
  EXPECT_EQ(oversized.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(**store.get("k1"), "v") << "the oversized message changed nothing";
}

TEST_F(ServiceTest, RoundFormsWithRanksOffsetsAndMaster) {
  server_->shutdown("restart with 3 nodes");
  auto options = defaultOptions();
  options.rendezvous.min_nodes = options.rendezvous.max_nodes = 3;
  startServer(options);
  auto watcher = GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  std::vector<std::unique_ptr<AgentSession>> sessions;
  const std::uint32_t lws[] = {2, 1, 3};
  for (int i = 0; i < 3; ++i) sessions.push_back(join("node" + std::to_string(i), lws[i]));
  std::map<std::uint32_t, v1::RoundFormed> by_rank;
  for (auto& s : sessions) {
    auto welcome = s->next(milliseconds(5000));
    ASSERT_TRUE(welcome.ok()) << welcome.status().toString();
    EXPECT_TRUE(welcome->has_welcome());
    EXPECT_EQ(welcome->welcome().heartbeat_interval_ms(), 200u);
    auto formed = s->waitFor(isRoundFormed, milliseconds(5000));
    ASSERT_TRUE(formed.ok()) << formed.status().toString();
    by_rank[formed->round_formed().node_rank()] = formed->round_formed();
  }
  ASSERT_EQ(by_rank.size(), 3u);
  std::uint32_t offset = 0;
  auto info = connect()->getRound();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->members_size(), 3);
  for (std::uint32_t r = 0; r < 3; ++r) {
    const auto& f = by_rank.at(r);
    EXPECT_EQ(f.generation(), 1u);
    EXPECT_EQ(f.num_nodes(), 3u);
    EXPECT_EQ(f.world_size(), 6u);
    EXPECT_EQ(f.rank_offset(), offset);
    EXPECT_EQ(f.master_address(), info->members(0).address());
    EXPECT_EQ(info->members(static_cast<int>(r)).node_rank(), r);
    offset += info->members(static_cast<int>(r)).local_world_size();
  }
  auto formed_event = (*watcher)->waitFor(
      [](const v1::GenerationEvent& e) { return e.state() == v1::GenerationEvent::FORMED; },
      milliseconds(5000));
  ASSERT_TRUE(formed_event.ok());
  EXPECT_EQ(formed_event->num_nodes(), 3u);
}

TEST_F(ServiceTest, BrokenStreamMovesGenerationAtOnce) {
  auto watcher = GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  std::vector<std::unique_ptr<AgentSession>> s;
  for (int i = 0; i < 4; ++i) s.push_back(join("n" + std::to_string(i)));
  for (auto& x : s) ASSERT_TRUE(x->waitFor(isRoundFormed, milliseconds(5000)).ok());
  const auto t0 = Clock::now();
  s[2]->cancel();
  auto ev = (*watcher)->waitFor(
      [](const v1::GenerationEvent& e) { return e.failed_node() == "n2"; }, milliseconds(5000));
  ASSERT_TRUE(ev.ok()) << ev.status().toString();
  const auto latency = msSince(t0);
  EXPECT_EQ(ev->generation(), 2u);
  EXPECT_EQ(ev->failed_node(), "n2");
  EXPECT_NE(ev->cause().find("stream"), std::string::npos) << ev->cause();
  EXPECT_LT(latency, 1000) << "a broken stream is a failure at once, not at a heartbeat timeout";
  // The survivors get the new round (generation 2, 3 nodes) pushed.
  for (int i : {0, 1, 3}) {
    auto f = s[i]->waitFor(
        [](const v1::CoordinatorMessage& m) {
          return m.has_round_formed() && m.round_formed().generation() == 2;
        },
        milliseconds(5000));
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->round_formed().num_nodes(), 3u);
  }
}

TEST_F(ServiceTest, MissedHeartbeatsAreAFailureWithinTwoIntervals) {
  // A 1 s interval, so that the bound leaves a loaded CI machine ~450 ms of slack.
  server_->shutdown("restart with a 1 s heartbeat interval");
  auto options = defaultOptions();
  options.heartbeat_interval = Milliseconds(1000);
  startServer(options);
  auto watcher = GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  auto alive = join("alive");
  rendezvous::AgentSessionOptions silent_opts;
  silent_opts.auto_heartbeat = false;
  const auto joined = Clock::now();  // its join, just after this, is its last sign of life
  auto silent = join("silent", 1, silent_opts);
  ASSERT_TRUE(silent->waitFor(isRoundFormed, milliseconds(5000)).ok());
  auto ev = (*watcher)->waitFor(
      [](const v1::GenerationEvent& e) { return e.failed_node() == "silent"; }, milliseconds(5000));
  ASSERT_TRUE(ev.ok()) << ev.status().toString();
  const auto latency = msSince(joined);
  EXPECT_EQ(ev->failed_node(), "silent");
  EXPECT_NE(ev->cause().find("no heartbeat"), std::string::npos);
  EXPECT_GE(latency, 1000 * 3 / 2 - 100) << "never before 1.5 intervals of silence";
  EXPECT_LE(latency, 2 * 1000) << "detected within 2 intervals of its last sign of life";
  auto end = silent->endStatus(milliseconds(5000));
  ASSERT_TRUE(end.has_value());
  EXPECT_EQ(end->code(), StatusCode::kUnavailable);
  EXPECT_NE(end->message().find("declared this node failed"), std::string::npos);
}

TEST_F(ServiceTest, NoFalseFailuresUnderCpuLoad) {
  auto watcher = GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  std::vector<std::unique_ptr<AgentSession>> s;
  for (int i = 0; i < 3; ++i) s.push_back(join("n" + std::to_string(i)));
  for (auto& x : s) ASSERT_TRUE(x->waitFor(isRoundFormed, milliseconds(5000)).ok());
  std::atomic<bool> stop{false};
  std::vector<std::thread> burners;
  const unsigned n = std::max(2u, std::thread::hardware_concurrency());
  for (unsigned i = 0; i < n; ++i) {
    burners.emplace_back([&] {
      volatile std::uint64_t x = 0;
      while (!stop.load(std::memory_order_relaxed)) x = x + 1;
    });
  }
  // 15 heartbeat intervals with every core busy.
  auto ev = (*watcher)->waitFor([](const v1::GenerationEvent& e) { return e.generation() > 1; },
                                milliseconds(3000));
  stop = true;
  for (auto& t : burners) t.join();
  EXPECT_EQ(ev.status().code(), StatusCode::kTimeout)
      << "false failure under load: " << (ev.ok() ? ev->cause() : ev.status().toString());
  EXPECT_EQ(server_->service().stats().generation, 1u);
}

TEST_F(ServiceTest, LateJoinerIsHeldAndAdmittedOnRequest) {
  server_->shutdown("restart");
  auto options = defaultOptions();
  options.rendezvous.min_nodes = 1;
  options.rendezvous.max_nodes = 3;
  options.rendezvous.last_call = Milliseconds(100);
  startServer(options);
  auto a = join("a");
  ASSERT_TRUE(a->waitFor(isRoundFormed, milliseconds(5000)).ok());
  auto b = join("b");
  auto welcome = b->next(milliseconds(5000));
  ASSERT_TRUE(welcome.ok());
  EXPECT_TRUE(welcome->welcome().waiting());
  auto waiting =
      a->waitFor([](const auto& m) { return m.has_nodes_waiting(); }, milliseconds(5000));
  ASSERT_TRUE(waiting.ok());
  EXPECT_EQ(waiting->nodes_waiting().count(), 1u);
  a->requestReform("admit the waiting node");
  auto fb = b->waitFor(isRoundFormed, milliseconds(5000));
  ASSERT_TRUE(fb.ok());
  EXPECT_EQ(fb->round_formed().generation(), 2u);
  EXPECT_EQ(fb->round_formed().num_nodes(), 2u);
  EXPECT_EQ(fb->round_formed().node_rank(), 1u);
}

TEST_F(ServiceTest, ShutdownTellsEveryClient) {
  auto a = join("a");
  ASSERT_TRUE(a->waitFor(isRoundFormed, milliseconds(5000)).ok());
  auto watcher = GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  ASSERT_TRUE((*watcher)->next(milliseconds(5000)).ok());
  StoreClient store(connect());
  Status wait_status;
  std::thread waiter([&] { wait_status = store.wait({"never"}, milliseconds(20000)); });
  std::this_thread::sleep_for(milliseconds(200));
  const auto t0 = Clock::now();
  server_->shutdown("maintenance");
  auto msg = a->waitFor([](const auto& m) { return m.has_shutdown(); }, milliseconds(5000));
  ASSERT_TRUE(msg.ok()) << msg.status().toString();
  EXPECT_EQ(msg->shutdown().reason(), "maintenance");
  waiter.join();
  EXPECT_EQ(wait_status.code(), StatusCode::kUnavailable);
  EXPECT_NE(wait_status.message().find("maintenance"), std::string::npos);
  EXPECT_LT(msSince(t0), 3000) << "clients are told, not left to time out";
  auto end = (*watcher)->next(milliseconds(5000));
  EXPECT_EQ(end.status().code(), StatusCode::kUnavailable);
}

// ---- Takeover (the coordinator's host lost) -----------------------------------------------------

TEST_F(ServiceTest, RoundsNameTheSuccessorsOfTheHostingNode) {
  server_->shutdown("restart as a coordinator embedded in node 'n1'");
  auto options = defaultOptions();
  options.host_node_id = "n1";
  options.rendezvous.min_nodes = 5;
  options.rendezvous.max_nodes = 5;
  startServer(options);
  std::vector<std::unique_ptr<AgentSession>> s;
  for (int i = 0; i < 5; ++i) s.push_back(join("n" + std::to_string(i)));
  std::map<std::uint32_t, std::string> by_rank;
  std::vector<std::vector<std::string>> lists;
  for (size_t i = 0; i < s.size(); ++i) {
    auto f = s[i]->waitFor(isRoundFormed, milliseconds(5000));
    ASSERT_TRUE(f.ok()) << f.status().toString();
    const auto& r = f->round_formed();
    EXPECT_EQ(r.coordinator_node(), "n1");
    by_rank[r.node_rank()] = "n" + std::to_string(i);
    std::vector<std::string> list;
    for (const auto& m : r.successors()) {
      list.push_back(m.node_id());
      EXPECT_EQ(m.address(), m.node_id() + ".local");
      EXPECT_EQ(by_rank.count(m.node_rank()) == 0 || by_rank[m.node_rank()] == m.node_id(), true);
    }
    lists.push_back(list);
  }
  // The first kSuccessors members by node rank, the host left out; the same list for everyone.
  std::vector<std::string> expected;
  for (const auto& [rank, id] : by_rank) {
    if (id != "n1" && expected.size() < coordinator::kSuccessors) expected.push_back(id);
  }
  ASSERT_EQ(expected.size(), coordinator::kSuccessors);
  for (const auto& list : lists) EXPECT_EQ(list, expected);
}

TEST_F(ServiceTest, MembersWithAStandbyEndpointComeFirstAmongTheSuccessors) {
  server_->shutdown("restart as a coordinator embedded in node 'n0'");
  auto options = defaultOptions();
  options.host_node_id = "n0";
  options.rendezvous.min_nodes = 6;
  options.rendezvous.max_nodes = 6;
  startServer(options);
  // n4 and n5 name standby addresses of --rdzv-endpoint (n0, the host, does too: left out).
  const std::map<std::string, std::string> standby = {
      {"n0", "h0:29400"}, {"n4", "h4:29401"}, {"n5", "[fd00::5]:29400"}};
  std::vector<std::unique_ptr<AgentSession>> s;
  for (int i = 0; i < 6; ++i) {
    const std::string id = "n" + std::to_string(i);
    auto it = standby.find(id);
    auto session = AgentSession::open(connect(kToken, /*dedicated=*/true),
                                      {.node_id = id,
                                       .job_id = "job",
                                       .local_world_size = 1,
                                       .address = id + ".local",
                                       .standby_endpoint = it == standby.end() ? "" : it->second});
    ASSERT_TRUE(session.ok()) << session.status().toString();
    s.push_back(std::move(*session));
  }
  std::map<std::uint32_t, std::string> by_rank;
  std::vector<std::vector<std::string>> lists;
  for (auto& session : s) {
    auto f = session->waitFor(isRoundFormed, milliseconds(5000));
    ASSERT_TRUE(f.ok()) << f.status().toString();
    std::vector<std::string> list;
    for (const auto& m : f->round_formed().successors()) {
      list.push_back(m.node_id());
      auto it = standby.find(m.node_id());
      EXPECT_EQ(m.standby_endpoint(), it == standby.end() ? "" : it->second) << m.node_id();
      by_rank[m.node_rank()] = m.node_id();
    }
    lists.push_back(list);
  }
  // The standby nodes by node rank, then others by node rank up to kSuccessors in all.
  std::vector<std::string> standby_first;
  std::vector<std::string> rest;
  for (const auto& [rank, id] : by_rank) {
    (id == "n4" || id == "n5" ? standby_first : rest).push_back(id);
  }
  std::vector<std::string> expected = standby_first;
  ASSERT_EQ(expected.size(), 2u);
  for (const auto& id : rest) {
    if (expected.size() < coordinator::kSuccessors) expected.push_back(id);
  }
  for (const auto& list : lists) EXPECT_EQ(list, expected);
  // The round's members, asked for, carry them too.
  auto conn = connect();
  auto round = conn->getRound();
  ASSERT_TRUE(round.ok()) << round.status().toString();
  EXPECT_EQ(round->job_id(), "job") << "agents looking for their job skip another job's";
  for (const auto& m : round->members()) {
    auto it = standby.find(m.node_id());
    EXPECT_EQ(m.standby_endpoint(), it == standby.end() ? "" : it->second) << m.node_id();
  }
}

TEST_F(ServiceTest, AStandbyEndpointThatIsNotHostPortIsRefused) {
  for (const std::string bad : {"h4", "h4:", ":29400", "h4:29x"}) {
    auto session = AgentSession::open(
        connect(kToken, /*dedicated=*/true),
        {.node_id = "n", .job_id = "job", .address = "n.local", .standby_endpoint = bad});
    ASSERT_TRUE(session.ok()) << session.status().toString();
    auto end = (*session)->endStatus(milliseconds(5000));
    ASSERT_TRUE(end.has_value()) << bad << ": the session was not ended";
    EXPECT_EQ(end->code(), StatusCode::kInvalidArgument) << bad << ": " << end->toString();
    EXPECT_NE(end->message().find("'" + bad + "'"), std::string::npos) << end->message();
  }
}

TEST_F(ServiceTest, AStandaloneCoordinatorNamesNoSuccessors) {
  auto a = join("a");
  auto f = a->waitFor(isRoundFormed, milliseconds(5000));
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->round_formed().successors_size(), 0);
  EXPECT_TRUE(f->round_formed().coordinator_node().empty());
}

TEST_F(ServiceTest, ATakeoverCoordinatorGoesOnFromTheLostGeneration) {
  server_->shutdown("restart as a successor");
  auto options = defaultOptions();
  options.host_node_id = "b";
  options.rendezvous.takeover =
      coordinator::Takeover{4, 2, "the coordinator's host, node 'h', was lost", {"h"}};
  startServer(options);
  // Watchers learn at once that generation 4 is over.
  auto watcher = GenerationWatcher::start(connect());
  ASSERT_TRUE(watcher.ok());
  auto first = (*watcher)->next(milliseconds(5000));
  ASSERT_TRUE(first.ok()) << first.status().toString();
  EXPECT_EQ(first->generation(), 5u);
  EXPECT_EQ(first->state(), v1::GenerationEvent::REFORMING);
  EXPECT_EQ(first->failed_node(), "h");
  // Generation 4's keys are refused here; the job scope is open.
  StoreClient store(connect());
  EXPECT_FALSE(store.scoped("x/", 4).set("k", "v").ok());
  EXPECT_TRUE(store.set("restarts", "3").ok());
  // The old members come back with their generation and rank: the round forms without a last
  // call, ranks kept where they still exist.
  auto open = [&](const std::string& id, std::uint32_t rank) {
    auto s = AgentSession::open(connect(kToken, true), {.node_id = id,
                                                        .job_id = "job",
                                                        .local_world_size = 2,
                                                        .address = id + ".local",
                                                        .last_generation = 4,
                                                        .last_node_rank = rank});
    EXPECT_TRUE(s.ok());
    return std::move(*s);
  };
  const auto t0 = Clock::now();
  auto b = open("b", 1);
  auto c = open("c", 2);
  for (auto* x : {b.get(), c.get()}) {
    auto f = x->waitFor(isRoundFormed, milliseconds(5000));
    ASSERT_TRUE(f.ok()) << f.status().toString();
    EXPECT_EQ(f->round_formed().generation(), 5u);
    EXPECT_EQ(f->round_formed().world_size(), 4u);
    EXPECT_EQ(f->round_formed().node_rank(), x == b.get() ? 1u : 0u);
    EXPECT_EQ(f->round_formed().cause(), "the coordinator's host, node 'h', was lost");
    EXPECT_EQ(f->round_formed().coordinator_node(), "b");
  }
  EXPECT_LT(msSince(t0), static_cast<double>(options.rendezvous.last_call.count()))
      << "everyone expected was back: no last call";
}

TEST_F(ServiceTest, SessionsTellALostCoordinatorFromOneThatEndedThem) {
  // Shut down: ended by the coordinator, not lost.
  auto a = join("a");
  ASSERT_TRUE(a->waitFor(isRoundFormed, milliseconds(5000)).ok());
  server_->shutdown("maintenance");
  ASSERT_TRUE(a->endStatus(milliseconds(5000)).has_value());
  EXPECT_FALSE(a->lostCoordinator());
  // Handed over: lost (the successors take it over).
  startServer();
  auto b = join("b");
  ASSERT_TRUE(b->waitFor(isRoundFormed, milliseconds(5000)).ok());
  server_->handOver("preempted");
  auto msg = b->waitFor([](const auto& m) { return m.has_shutdown(); }, milliseconds(5000));
  ASSERT_TRUE(msg.ok());
  EXPECT_TRUE(msg->shutdown().handover());
  ASSERT_TRUE(b->endStatus(milliseconds(5000)).has_value());
  EXPECT_TRUE(b->lostCoordinator());
  // Declared failed for missed heartbeats: the coordinator is alive, so not lost.
  startServer();
  rendezvous::AgentSessionOptions silent;
  silent.auto_heartbeat = false;
  auto c = join("c", 1, silent);
  ASSERT_TRUE(c->endStatus(milliseconds(5000)).has_value());
  EXPECT_NE(c->endStatus()->message().find("no heartbeat"), std::string::npos);
  EXPECT_FALSE(c->lostCoordinator());
}

// A TCP relay on loopback to `to` that holds each connection `delay` before it passes anything
// on: a coordinator on a far or busy host, slow to finish the connection's handshake.
class SlowRelay {
 public:
  SlowRelay(int to_port, milliseconds delay) : to_port_(to_port), delay_(delay) {
    const LoopbackListener l = listenOnLoopback(8);
    listen_ = l.fd;
    if (listen_ < 0) {
      ADD_FAILURE() << "cannot listen: " << std::strerror(errno);
      return;
    }
    endpoint_ = "127.0.0.1:" + std::to_string(l.port);
    acceptor_ = std::thread([this] {
      for (;;) {
        const int client = ::accept(listen_, nullptr, nullptr);
        if (client < 0) return;  // shut down
        relays_.emplace_back([this, client] { relay(client); });
      }
    });
  }
  ~SlowRelay() {
    stop_ = true;
    ::shutdown(listen_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    for (auto& t : relays_) t.join();
    ::close(listen_);
  }
  const std::string& endpoint() const { return endpoint_; }

 private:
  void relay(int client) {
    std::this_thread::sleep_for(delay_);
    const int server = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(to_port_));
    if (::connect(server, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      char buf[16384];
      while (!stop_ && ::poll(fds, 2, 100) >= 0) {
        bool done = false;
        for (int i = 0; i < 2 && !done; ++i) {
          if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
          const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
          done = n <= 0 || ::write(fds[1 - i].fd, buf, static_cast<size_t>(n)) != n;
        }
        if (done) break;
      }
    }
    ::close(server);
    ::close(client);
  }

  int to_port_;
  milliseconds delay_;
  int listen_ = -1;
  std::string endpoint_;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> relays_;  // only the acceptor adds to it
};

// A probe (rally status, the agents' takeover checks) gives a coordinator the whole of its timeout
// to answer, the connection's handshake included: one whose handshake takes 400 ms serves, it is
// not "no coordinator here". (The connection's reconnect backoff, 100 ms for a quick reconnect to
// a restarted coordinator, had bounded each connection attempt to 100 ms as well.)
TEST_F(ServiceTest, AProbeWaitsForASlowHandshakeWithinItsTimeout) {
  auto a = join("a");
  ASSERT_TRUE(a->waitFor(isRoundFormed, milliseconds(5000)).ok());
  SlowRelay slow(server_->port(), milliseconds(400));
  auto round =
      rendezvous::probeRound({.endpoint = slow.endpoint(), .token = kToken}, Milliseconds(5000));
  ASSERT_TRUE(round.ok()) << round.status().toString();
  EXPECT_EQ(round->job_id(), "job");
  EXPECT_EQ(round->generation(), 1u);
  // And within it only: a shorter timeout than the handshake is no answer.
  auto early =
      rendezvous::probeRound({.endpoint = slow.endpoint(), .token = kToken}, Milliseconds(150));
  EXPECT_FALSE(early.ok());
}

TEST_F(ServiceTest, ARetargetedConnectionMovesCallsInFlightToTheNewCoordinator) {
  auto conn = connect();
  StoreClient store(conn);
  Status waited;
  std::thread waiter([&] { waited = store.wait({"ready"}, milliseconds(20000)); });
  std::this_thread::sleep_for(milliseconds(200));  // waiting at the first coordinator
  auto other =
      coordinator::CoordinatorServer::start(defaultOptions(), {.host = "127.0.0.1", .port = 0});
  ASSERT_TRUE(other.ok());
  const std::string moved = "127.0.0.1:" + std::to_string((*other)->port());
  ASSERT_TRUE(StoreClient(conn).set("only-here", "1").ok());
  const auto t0 = Clock::now();
  ASSERT_TRUE(conn->retarget(moved).ok());
  EXPECT_EQ(conn->endpoint(), moved);
  // The retried wait now waits at the second coordinator: a key set there ends it.
  rendezvous::ClientOptions o;
  o.endpoint = moved;
  o.token = kToken;
  auto direct = rendezvous::CoordinatorConnection::open(o);
  ASSERT_TRUE(direct.ok());
  ASSERT_TRUE(StoreClient(*direct).set("ready", "1").ok());
  waiter.join();
  EXPECT_TRUE(waited.ok()) << waited.toString();
  EXPECT_LT(msSince(t0), 3000);
  auto gone = store.get("only-here");
  ASSERT_TRUE(gone.ok());
  EXPECT_FALSE(gone->has_value()) << "calls go to the second coordinator now";
  // Lost: calls fail at once, naming the coordinator, until the next retarget.
  conn->markLost(conn->targetSerial() - 1);  // about the endpoint before: ignored
  EXPECT_TRUE(store.get("ready").ok());
  conn->markLost(conn->targetSerial());
  const auto t1 = Clock::now();
  auto failed = store.get("ready");
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(failed.status().message().find("was lost"), std::string::npos);
  EXPECT_LT(msSince(t1), 500);
  ASSERT_TRUE(conn->retarget(moved).ok());
  EXPECT_TRUE(store.get("ready").ok());
  EXPECT_EQ(conn->retarget("no-port").code(), StatusCode::kInvalidArgument);
  (*other)->shutdown("test over", milliseconds(500));
}

// ---- Bad input ----------------------------------------------------------------------------------

grpc::Status rawUnary(rendezvous::CoordinatorConnection& conn, const std::string& method,
                      const std::string& bytes, std::string* reply) {
  grpc::GenericStub stub(conn.channel());
  grpc::ClientContext ctx;
  conn.prepareContext(&ctx, milliseconds(5000));
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status result;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    std::lock_guard lock(mu);
    result = s;
    done = true;
    cv.notify_all();
  });
  std::unique_lock lock(mu);
  cv.wait(lock, [&] { return done; });
  if (reply != nullptr && result.ok()) {
    std::vector<grpc::Slice> slices;
    (void)response.Dump(&slices);
    reply->clear();
    for (auto& s : slices) reply->append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return result;
}

TEST_F(ServiceTest, MalformedRequestIsRefusedAndServerKeepsServing) {
  auto conn = connect();
  const grpc::Status st =
      rawUnary(*conn, "/rally.v1.Coordinator/Set", std::string("\xff\xff\xff\xff\x0f", 5), nullptr);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.error_code(), grpc::StatusCode::UNAVAILABLE) << "the server must not fall over";
  StoreClient store(conn);
  EXPECT_TRUE(store.set("still", "serving").ok());
}

TEST_F(ServiceTest, UnknownFieldsAreIgnored) {
  auto conn = connect();
  v1::SetRequest req;
  req.set_key("fwd");
  req.set_value("compatible");
  std::string bytes = req.SerializeAsString();
  bytes += std::string("\xf8\x06\x2a", 3);  // field 111, varint 42: from a newer client
  ASSERT_TRUE(rawUnary(*conn, "/rally.v1.Coordinator/Set", bytes, nullptr).ok());
  EXPECT_EQ(**StoreClient(conn).get("fwd"), "compatible");
}

TEST_F(ServiceTest, BadSessionMessagesGetClearErrors) {
  auto conn = connect();
  v1::AgentMessage empty;  // a kind this coordinator does not know (or none)
  grpc::Status st = rawSession(*conn, {empty});
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();

  v1::AgentMessage join;
  join.mutable_join()->set_node_id("x");
  join.mutable_join()->set_job_id("job");
  join.mutable_join()->set_local_world_size(1);
  st = rawSession(*conn, {join, empty});
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("rally.v1"), std::string::npos) << st.error_message();

  v1::AgentMessage hb;
  hb.mutable_heartbeat();
  st = rawSession(*conn, {hb});
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("first message"), std::string::npos);

  v1::AgentMessage join2 = join;
  join2.mutable_join()->set_node_id("y");
  st = rawSession(*conn, {join2, join2});
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("already joined"), std::string::npos);

  v1::AgentMessage wrong_job = join;
  wrong_job.mutable_join()->set_node_id("z");
  wrong_job.mutable_join()->set_job_id("another-job");
  st = rawSession(*conn, {wrong_job});
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("another-job"), std::string::npos);
}

TEST_F(ServiceTest, FloodOfJoinsFromOneNodeIdAdmitsOne) {
  constexpr int kFlood = 40;
  std::vector<std::unique_ptr<AgentSession>> flood;
  auto conn = connect(kToken, true);
  for (int i = 0; i < kFlood; ++i) {
    auto s = AgentSession::open(conn, {.node_id = "same", .job_id = "job"});
    ASSERT_TRUE(s.ok());
    flood.push_back(std::move(*s));
  }
  int admitted = 0, refused = 0;
  for (auto& s : flood) {
    auto m = s->next(milliseconds(5000));
    if (m.ok() && m->has_welcome()) {
      ++admitted;
    } else {
      auto end = s->endStatus(milliseconds(5000));
      ASSERT_TRUE(end.has_value());
      EXPECT_EQ(end->code(), StatusCode::kAlreadyExists) << end->toString();
      ++refused;
    }
  }
  EXPECT_EQ(admitted, 1);
  EXPECT_EQ(refused, kFlood - 1);
  EXPECT_EQ(server_->service().stats().sessions, 1u);
  for (auto& s : flood) {
    if (!s->ended()) {
      ASSERT_TRUE(s->waitFor(isRoundFormed, milliseconds(5000)).ok());
    }
  }
  EXPECT_EQ(server_->service().stats().generation, 1u) << "the flood moved no generation";
  EXPECT_TRUE(StoreClient(connect()).set("responsive", "yes").ok());
}

}  // namespace
}  // namespace rally::testing
