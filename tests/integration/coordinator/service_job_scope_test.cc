// The job scope's copies over loopback: the holders have every write before it is answered, a
// lagging holder is passed by, a takeover adopts the rejoiners' copies, a restarted coordinator
// holds job-scope calls until a copy is in, and claims survive a coordinator that is away.
#include <atomic>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "runtime/rendezvous/grpc_status.h"
#include "tests/integration/coordinator/coordinator_fixture.h"

namespace rally::testing {
namespace {

namespace v1 = rally::v1;
using rendezvous::AgentSession;
using rendezvous::StoreClient;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

long long msSince(Clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count();
}

class ServiceJobScopeTest : public CoordinatorFixture {
 protected:
  // Node `id` back after a lost coordinator: a Join with its last round (generation, node rank,
  // nodes), then its copy of the job scope, on a connection of `max_message_bytes`.
  std::unique_ptr<AgentSession> rejoin(const std::string& id,
                                       std::shared_ptr<rendezvous::JobScopeReplica> copy,
                                       std::uint64_t last_generation, std::uint32_t rank,
                                       std::uint32_t num_nodes,
                                       std::int64_t max_message_bytes = 4 << 20) {
    rendezvous::AgentSessionOptions o;
    o.replica = std::move(copy);
    auto s = AgentSession::open(connect(kToken, true, max_message_bytes),
                                {.node_id = id,
                                 .job_id = "job",
                                 .local_world_size = 1,
                                 .address = id + ".local",
                                 .last_generation = last_generation,
                                 .last_node_rank = rank,
                                 .last_num_nodes = num_nodes},
                                std::move(o));
    EXPECT_TRUE(s.ok()) << s.status().toString();
    return s.ok() ? std::move(*s) : nullptr;
  }
};

// A claim (a compare-and-set on an absent key with the caller's own value) counts an earlier
// attempt of its own, and waits out a coordinator that is away instead of failing.
TEST_F(ServiceJobScopeTest, AClaimCountsItsOwnEarlierAttemptAndWaitsOutARestart) {
  StoreClient store(connect());
  EXPECT_TRUE(*store.claim("fault/3", "node-a/17"));
  EXPECT_TRUE(*store.claim("fault/3", "node-a/17")) << "an earlier attempt of this claim";
  EXPECT_FALSE(*store.claim("fault/3", "node-b/17")) << "someone else's";
  // The coordinator goes away and comes back on the same port: the claim waits for it.
  const int port = server_->port();
  auto conn = connect();
  server_->shutdown("restarting", Milliseconds(500));
  server_.reset();
  std::optional<Result<bool>> claimed;
  std::thread claimer([&] { claimed = StoreClient(conn).claim("fault/4", "node-a/17"); });
  std::this_thread::sleep_for(milliseconds(200));  // let it fail once or more first
  auto s = coordinator::CoordinatorServer::start(options_, {.host = "127.0.0.1", .port = port});
  ASSERT_TRUE(s.ok()) << s.status().toString();
  server_ = std::move(*s);
  claimer.join();
  ASSERT_TRUE(claimed && claimed->ok()) << (claimed ? claimed->status().toString() : "");
  EXPECT_TRUE(**claimed);
  // A coordinator handing over refuses calls as one that is away (they may go to the successor);
  // one that stops says so finally.
  for (const bool handover : {true, false}) {
    auto c = connect();
    ASSERT_TRUE(StoreClient(c).set("x", "1").ok());
    server_->service().shutdown("stopping", handover);
    grpc::ClientContext ctx;
    c->prepareContext(&ctx, milliseconds(2000));
    v1::SetRequest req;
    req.set_key("y");
    v1::SetResponse resp;
    const grpc::Status st = c->stub()->Set(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    EXPECT_EQ(rendezvous::isFinal(st), !handover) << st.error_message();
    server_->shutdown("test", Milliseconds(500));
    startServer(options_);
  }
}

// The job scope is copied to the holders (the successors), each holder has every write of it
// before the write is answered, and no one else holds a copy.
TEST_F(ServiceJobScopeTest, HoldersHaveTheJobScopeBeforeAWriteOfItIsAnswered) {
  server_->shutdown("restart as a coordinator embedded in node 'h'");
  auto options = defaultOptions();
  options.host_node_id = "h";
  options.rendezvous.min_nodes = 5;
  options.rendezvous.max_nodes = 5;
  options.heartbeat_interval = Milliseconds(5000);  // so that no acknowledgement is late here
  startServer(options);
  StoreClient store(connect());
  ASSERT_TRUE(store.set("before", "1").ok()) << "no holders yet: answered at once";
  std::map<std::string, std::shared_ptr<rendezvous::JobScopeReplica>> copies;
  std::vector<std::unique_ptr<AgentSession>> s;
  for (const std::string id : {"h", "a", "b", "c", "d"}) {
    copies[id] = std::make_shared<rendezvous::JobScopeReplica>();
    // A copy left from an earlier round: dropped by a Join that is not a rejoin.
    copies[id]->apply([] {
      v1::JobScope m;
      m.set_full(true);
      auto* e = m.add_entries();
      e->set_key("stale");
      e->set_revision(99);
      return m;
    }());
    rendezvous::AgentSessionOptions o;
    o.replica = copies[id];
    s.push_back(join(id, 1, std::move(o)));
  }
  std::set<std::string> successors;
  for (auto& session : s) {
    auto f = session->waitFor(isRoundFormed, milliseconds(5000));
    ASSERT_TRUE(f.ok()) << f.status().toString();
    for (const auto& m : f->round_formed().successors()) successors.insert(m.node_id());
  }
  ASSERT_EQ(successors.size(), coordinator::kSuccessors);
  // A holder learns the round after its snapshot.
  for (const auto& [id, copy] : copies) {
    if (successors.count(id) != 0) {
      EXPECT_EQ(copy->get("before"), "1") << id;
      EXPECT_EQ(copy->get("stale"), std::nullopt) << id;
    } else {
      EXPECT_TRUE(copy->empty()) << id << " holds no copy";
    }
  }
  const auto stats = server_->service().stats();
  EXPECT_EQ(stats.holders, coordinator::kSuccessors);
  EXPECT_EQ(stats.holders_lagging, 0u);
  ASSERT_TRUE(store.set("k", "v").ok());
  ASSERT_TRUE(store.add("n", 5).ok());
  ASSERT_TRUE(store.remove("before").ok());
  auto swapped = store.compareAndSet("claim", std::nullopt, "a");
  ASSERT_TRUE(swapped.ok() && swapped->swapped);
  ASSERT_TRUE(store.scoped("g/", 1).set("x", "y").ok());  // a generation's key: not copied
  for (const auto& [id, copy] : copies) {
    if (successors.count(id) == 0) {
      EXPECT_TRUE(copy->empty()) << id;
      continue;
    }
    // Already there, as each call returned: no waiting here.
    EXPECT_EQ(copy->get("k"), "v") << id;
    EXPECT_EQ(copy->get("n"), "5") << id;
    EXPECT_EQ(copy->get("claim"), "a") << id;
    EXPECT_EQ(copy->get("before"), std::nullopt) << id;
    EXPECT_EQ(copy->size(), 4u) << id << ": k, n, claim and the deletion of 'before'";
    EXPECT_EQ(copy->revision(), server_->service().stats().job_scope_revision) << id;
    // Each holder knows who the holders are: a resuming coordinator waits for each one's copy.
    const auto named = copy->holders();
    EXPECT_EQ(std::set<std::string>(named.begin(), named.end()), successors) << id;
  }
}

// A holder that does not acknowledge holds one write up for one heartbeat interval, then no more
// until it catches up.
TEST_F(ServiceJobScopeTest, AHolderThatDoesNotAcknowledgeDelaysOneWriteThenIsPassedBy) {
  server_->shutdown("restart with a longer heartbeat interval");
  auto options = defaultOptions();
  options.heartbeat_interval = Milliseconds(400);
  startServer(options);
  auto conn = connect(kToken, true);
  grpc::ClientContext ctx;
  conn->prepareContext(&ctx, milliseconds(30000));
  auto stream = conn->stub()->Session(&ctx);
  v1::AgentMessage join;
  join.mutable_join()->set_node_id("mute");
  join.mutable_join()->set_job_id("job");
  join.mutable_join()->set_local_world_size(1);
  join.mutable_join()->set_keeps_job_scope(true);
  ASSERT_TRUE(stream->Write(join));
  std::atomic<int> snapshots{0};
  std::thread reader([&] {
    v1::CoordinatorMessage in;
    while (stream->Read(&in)) {
      if (in.has_job_scope() && in.job_scope().full()) ++snapshots;
    }
  });
  // Heartbeats (and, when asked, one acknowledgement) from one writer thread.
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> ack{0};
  std::thread writer([&] {
    while (!stop) {
      v1::AgentMessage m;
      if (const std::uint64_t r = ack.exchange(0); r != 0) {
        m.mutable_job_scope_ack()->set_revision(r);
      } else {
        m.mutable_heartbeat();
      }
      if (!stream->Write(m)) break;
      std::this_thread::sleep_for(milliseconds(50));
    }
  });
  // A standalone coordinator's holders are its first nodes by node rank: here, the only one.
  ASSERT_TRUE(eventually([&] { return snapshots.load() == 1; }));
  EXPECT_EQ(server_->service().stats().holders, 1u);
  StoreClient store(connect());
  const auto t0 = Clock::now();
  ASSERT_TRUE(store.set("k", "1").ok());
  EXPECT_GE(msSince(t0), 300) << "answered only when the holder's acknowledgement was overdue";
  EXPECT_EQ(server_->service().stats().holders_lagging, 1u);
  ASSERT_TRUE(store.set("k", "2").ok()) << "a lagging holder is not waited for";
  ack = server_->service().stats().job_scope_revision;
  EXPECT_TRUE(eventually([&] { return server_->service().stats().holders_lagging == 0; }))
      << "it caught up";
  stop = true;
  writer.join();
  ctx.TryCancel();
  reader.join();
}

// A coordinator that took over adopts the copies of the holders that rejoin it, key by key: the
// newer revision wins, a deletion too, and nothing replaces a key written here.
TEST_F(ServiceJobScopeTest, ATakeoverAdoptsTheRejoiningHoldersCopiesKeyByKey) {
  server_->shutdown("restart as a successor");
  auto options = defaultOptions();
  options.host_node_id = "b";
  options.rendezvous.takeover =
      coordinator::Takeover{4, 2, "the coordinator's host, node 'h', was lost", {"h"}};
  // The successor's agent's own copy: in before any call.
  v1::JobScope seed;
  auto* seeded = seed.add_entries();
  seeded->set_key("seeded");
  seeded->set_value("s");
  seeded->set_revision(2);
  options.job_scope_seed = {seed};
  startServer(options);
  StoreClient store(connect());
  EXPECT_EQ(*store.get("seeded"), "s");
  ASSERT_TRUE(store.set("restarts", "3").ok());  // as the successor's agent seeds it
  auto copyOf = [](std::vector<std::tuple<std::string, std::string, std::uint64_t, bool>> es) {
    auto r = std::make_shared<rendezvous::JobScopeReplica>();
    v1::JobScope m;
    m.set_full(true);
    m.set_complete(true);
    for (const auto& [k, v, rev, del] : es) {
      auto* e = m.add_entries();
      e->set_key(k);
      e->set_value(v);
      e->set_revision(rev);
      e->set_deleted(del);
      m.set_revision(std::max(m.revision(), rev));
    }
    r->apply(m);
    return r;
  };
  auto b_copy = copyOf({{"restarts", "1", 10, false},
                        {"fired/0", "h", 5, false},
                        {"gone", "", 7, true},
                        {"old", "x", 3, false}});
  auto c_copy = copyOf({{"old", "y", 9, false},
                        {"fired/0", "other", 4, false},
                        {"gone", "back", 6, false},
                        {"only-c", "z", 8, false}});
  auto b = rejoin("b", b_copy, 4, 1, 0);
  auto c = rejoin("c", c_copy, 4, 2, 0);
  for (auto* x : {b.get(), c.get()})
    ASSERT_TRUE(x->waitFor(isRoundFormed, milliseconds(5000)).ok());
  EXPECT_EQ(*store.get("restarts"), "3") << "written here: no copy replaces it";
  EXPECT_EQ(*store.get("fired/0"), "h") << "revision 5 over 4";
  EXPECT_EQ(*store.get("old"), "y") << "revision 9 over 3";
  EXPECT_EQ(*store.get("gone"), std::nullopt) << "the deletion at 7 over the value at 6";
  EXPECT_EQ(*store.get("only-c"), "z");
  // c is the successor now (b hosts): it holds the adopted scope (its snapshot came with the
  // round; what c's own copy added, after it); b, the host, holds none.
  const std::uint64_t revision = server_->service().stats().job_scope_revision;
  EXPECT_TRUE(eventually([&] { return c_copy->revision() >= revision; }));
  EXPECT_EQ(c_copy->revision(), revision);
  EXPECT_EQ(c_copy->get("old"), "y");
  EXPECT_EQ(c_copy->get("restarts"), "3");
  EXPECT_EQ(c_copy->get("fired/0"), "h");
  EXPECT_EQ(c_copy->get("gone"), std::nullopt);
  EXPECT_TRUE(b_copy->empty());
  // A copy from a node that did not rejoin is not taken.
  v1::AgentMessage join;
  join.mutable_join()->set_node_id("new");
  join.mutable_join()->set_job_id("job");
  join.mutable_join()->set_local_world_size(1);
  v1::AgentMessage upload;
  auto* e = upload.mutable_job_scope()->add_entries();
  e->set_key("restarts");
  e->set_value("100");
  e->set_revision(1000);
  auto* e2 = upload.mutable_job_scope()->add_entries();
  e2->set_key("planted");
  e2->set_value("1");
  e2->set_revision(1000);
  rawSession(*connect(), {join, upload});
  EXPECT_EQ(*store.get("planted"), std::nullopt);
  EXPECT_EQ(*store.get("restarts"), "3");
}

// A coordinator that may be resuming a job (any but a successor's) holds job-scope calls: until
// a rejoining holder's copy is in (so a fault already fired is not claimed again), or, for a new
// job, until its first round forms.
TEST_F(ServiceJobScopeTest, ARestartedCoordinatorAnswersJobScopeCallsOnceAHoldersCopyIsIn) {
  server_->shutdown("restart as a coordinator that may be resuming");
  auto options = defaultOptions();
  options.job_scope_grace = Milliseconds(30000);  // never reached here
  startServer(options);
  StoreClient store(connect());
  // A worker's fault claim comes before any node rejoins.
  std::optional<Result<rendezvous::CompareAndSetResult>> claim;
  std::thread worker([&] { claim = store.compareAndSet("fired/0", std::nullopt, "again"); });
  eventually([&] { return server_->service().stats().held_calls != 0; });
  ASSERT_EQ(server_->service().stats().held_calls, 1u);
  // A holder rejoins with its copy: the fault had fired.
  auto copy = std::make_shared<rendezvous::JobScopeReplica>();
  v1::JobScope m;
  m.set_full(true);
  m.set_complete(true);
  m.set_revision(7);
  auto* e = m.add_entries();
  e->set_key("fired/0");
  e->set_value("node-a");
  e->set_revision(7);
  copy->apply(m);
  auto a = rejoin("a", copy, 3, 0, 1);
  ASSERT_TRUE(a);
  worker.join();
  ASSERT_TRUE(claim && claim->ok()) << (claim ? claim->status().toString() : "no answer");
  EXPECT_FALSE((*claim)->swapped) << "claimed once for the job: before the restart";
  EXPECT_EQ((*claim)->value, "node-a");
  EXPECT_EQ(server_->service().stats().held_calls, 0u);

  // A new job: its first round forms with no node rejoined, and what waited goes on then. A call
  // whose caller gave up while it waited is not made.
  server_->shutdown("restart for a new job");
  startServer(options);
  {
    auto impatient = connect();
    grpc::ClientContext ctx;
    impatient->prepareContext(&ctx, milliseconds(300));
    v1::SetRequest req;
    req.set_key("late");
    req.set_value("1");
    v1::SetResponse resp;
    const grpc::Status st = impatient->stub()->Set(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  }
  StoreClient fresh(connect());
  std::thread caller([&] { claim = fresh.compareAndSet("fired/0", std::nullopt, "first"); });
  eventually([&] { return server_->service().stats().held_calls >= 2; });
  ASSERT_EQ(server_->service().stats().held_calls, 2u) << "the impatient call, and this one";
  auto b = join("b");
  caller.join();
  ASSERT_TRUE(claim && claim->ok());
  EXPECT_TRUE((*claim)->swapped);
  EXPECT_EQ(*fresh.get("late"), std::nullopt) << "its caller was told it failed";
}

// Under a small message limit (RALLY_MAX_MESSAGE_BYTES) a snapshot goes in several messages that
// fit it, and so does a holder's upload (before, both went in messages of up to 1 MiB: a holder's
// session broke, and the coordinator refused its copy).
TEST_F(ServiceJobScopeTest, CopiesGoInMessagesUnderTheMessageLimit) {
  constexpr std::int64_t kLimit = 64 << 10;
  server_->shutdown("restart with a small message limit");
  auto options = defaultOptions();
  options.rendezvous.min_nodes = options.rendezvous.max_nodes = 1;
  startServer(options, kLimit);
  StoreClient store(connect(kToken, false, kLimit));
  std::map<std::string, std::string> written;
  for (int i = 0; i < 20; ++i) {
    const std::string key = "big/" + std::to_string(i);
    written[key] = std::string(10 << 10, static_cast<char>('a' + i));  // 200 KiB in all
    ASSERT_TRUE(store.set(key, written[key]).ok());
  }
  auto copy = std::make_shared<rendezvous::JobScopeReplica>();
  {
    rendezvous::AgentSessionOptions o;
    o.replica = copy;
    auto a = AgentSession::open(
        connect(kToken, true, kLimit),
        {.node_id = "a", .job_id = "job", .local_world_size = 1, .address = "a.local"},
        std::move(o));
    ASSERT_TRUE(a.ok()) << a.status().toString();
    ASSERT_TRUE((*a)->waitFor(isRoundFormed, milliseconds(5000)).ok());
    ASSERT_TRUE(eventually([&] { return copy->size() == written.size(); })) << copy->size();
    for (const auto& [key, value] : written) EXPECT_EQ(copy->get(key), value) << key;
    EXPECT_EQ(server_->service().stats().holders, 1u) << "its session still stands";
  }
  // A restarted coordinator takes the whole copy from the holder's upload.
  server_->shutdown("restart as a coordinator that may be resuming");
  options.job_scope_grace = Milliseconds(30000);  // never reached here
  startServer(options, kLimit);
  auto a = rejoin("a", copy, 1, 0, 1, kLimit);
  ASSERT_TRUE(a);
  StoreClient again(connect(kToken, false, kLimit));
  for (const auto& [key, value] : written) {
    auto got = again.get(key);
    ASSERT_TRUE(got.ok()) << got.status().toString();
    EXPECT_EQ(*got, value) << key;
  }
}

// A resuming coordinator waits for the copy of every holder the copies name, not only the first
// to come: a lagging holder's copy, in first, lacks the newest writes (here, a fault's firing),
// and a claim answered on it alone would fire the fault again.
TEST_F(ServiceJobScopeTest, AResumingCoordinatorWaitsForEveryNamedHoldersCopy) {
  server_->shutdown("restart as a coordinator that may be resuming");
  auto options = defaultOptions();
  options.job_scope_grace = Milliseconds(30000);  // never reached here
  startServer(options);
  StoreClient store(connect());
  std::optional<Result<rendezvous::CompareAndSetResult>> claim;
  std::thread worker([&] { claim = store.compareAndSet("fired/0", std::nullopt, "again"); });
  ASSERT_TRUE(eventually([&] { return server_->service().stats().held_calls == 1; }));
  // Holder a's copy (revision 5) misses the firing at 7; it names a and b as the holders.
  const auto copyOf = [](std::uint64_t revision, bool fired) {
    auto copy = std::make_shared<rendezvous::JobScopeReplica>();
    v1::JobScope m;
    m.set_full(true);
    m.set_complete(true);
    m.set_revision(revision);
    auto* e = m.add_entries();
    e->set_key("restarts");
    e->set_value("1");
    e->set_revision(3);
    if (fired) {
      e = m.add_entries();
      e->set_key("fired/0");
      e->set_value("node-a");
      e->set_revision(7);
    }
    m.add_holders("a");
    m.add_holders("b");
    copy->apply(m);
    return copy;
  };
  auto a = rejoin("a", copyOf(5, false), 3, 0, 2);
  ASSERT_TRUE(eventually([&] { return server_->service().stats().keys >= 1; }));
  std::this_thread::sleep_for(milliseconds(200));  // a's copy is in: the gate must stay shut
  EXPECT_EQ(server_->service().stats().held_calls, 1u) << "b's copy is not in yet";
  EXPECT_FALSE(claim.has_value());
  auto b = rejoin("b", copyOf(7, true), 3, 1, 2);
  worker.join();
  ASSERT_TRUE(claim && claim->ok()) << (claim ? claim->status().toString() : "no answer");
  EXPECT_FALSE((*claim)->swapped) << "fired once for the job: b's copy says so";
  EXPECT_EQ((*claim)->value, "node-a");
}

// A holder whose session ended and that holds again in a later round (the same holders as before)
// is told who the holders are in its new snapshot: its copy, sent to a resuming coordinator,
// names them (before, the list went only to the holders when it changed, and this one's named
// nobody: a resume could open on its copy alone).
TEST_F(ServiceJobScopeTest, AHolderBackInALaterRoundIsToldTheHoldersAgain) {
  server_->shutdown("restart as a standalone coordinator of one node");
  auto options = defaultOptions();
  options.rendezvous.min_nodes = options.rendezvous.max_nodes = 1;
  startServer(options);
  auto copy = std::make_shared<rendezvous::JobScopeReplica>();
  const auto session = [&] {
    rendezvous::AgentSessionOptions o;
    o.replica = copy;
    auto s = join("a", 1, std::move(o));
    EXPECT_TRUE(s->waitFor(isRoundFormed, milliseconds(5000)).ok());
    return s;
  };
  auto first = session();
  ASSERT_TRUE(eventually([&] { return copy->held() && !copy->holders().empty(); }));
  EXPECT_EQ(copy->holders(), (std::vector<std::string>{"a"}));
  first.reset();  // its stream ends: a is a failed node, the round is gone
  ASSERT_TRUE(eventually([&] { return server_->service().stats().sessions == 0; }));
  auto again = session();  // a new node of the same id: its copy is cleared, then a snapshot
  ASSERT_TRUE(eventually([&] { return copy->held(); }));
  EXPECT_EQ(copy->holders(), (std::vector<std::string>{"a"})) << "named in the snapshot";
  const auto chunks = copy->chunks();
  ASSERT_FALSE(chunks.empty());
  EXPECT_EQ(chunks.front().holders_size(), 1);
}

}  // namespace
}  // namespace rally::testing
