// The round state machine as pure logic: min/max, last call, late joiners, failures during and
// between rounds, duplicate ids, rejoin, rank stability, join timeout, closing, and a takeover
// (a successor's coordinator going on from the generation and ranks of a lost one).
#include "launcher/coordinator/rendezvous.h"

#include <gtest/gtest.h>

#include <set>

namespace rally::coordinator {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

class RendezvousTest : public ::testing::Test {
 protected:
  void make(std::uint32_t min, std::uint32_t max, milliseconds last_call = milliseconds(2000),
            milliseconds join_timeout = seconds(600)) {
    rdzv_ =
        std::make_unique<Rendezvous>(RendezvousOptions{"job", min, max, last_call, join_timeout});
  }
  NodeInfo node(const std::string& id, std::uint32_t lws = 1) {
    return NodeInfo{id, "job", 0, 0, lws, id + ".host"};
  }
  Result<JoinOutcome> join(const std::string& id, std::uint32_t lws = 1) {
    return rdzv_->join(node(id, lws), now_, &events_);
  }
  template <typename T>
  std::vector<T> take() {
    std::vector<T> out;
    for (auto& e : events_) {
      if (auto* p = std::get_if<T>(&e)) out.push_back(*p);
    }
    return out;
  }
  std::vector<RoundFormedEvent> formed() { return take<RoundFormedEvent>(); }
  std::map<std::string, std::uint32_t> ranks() {
    std::map<std::string, std::uint32_t> out;
    for (const Member& m : rdzv_->snapshot().members) out[m.node_id] = m.node_rank;
    return out;
  }

  std::unique_ptr<Rendezvous> rdzv_;
  TimePoint now_ = TimePoint() + seconds(1000);
  Events events_;
};

TEST_F(RendezvousTest, FormsAtOnceWhenMaxJoin) {
  make(2, 3);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  EXPECT_TRUE(formed().empty()) << "MIN reached: the last call must run first";
  ASSERT_TRUE(join("c").ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 1u);
  EXPECT_EQ(f[0].members.size(), 3u);
  EXPECT_EQ(rdzv_->state(), RoundState::kFormed);
}

TEST_F(RendezvousTest, LastCallClosesRoundAfterMinReached) {
  make(2, 4, milliseconds(500));
  ASSERT_TRUE(join("a").ok());
  now_ += milliseconds(100);
  ASSERT_TRUE(join("b").ok());
  ASSERT_TRUE(rdzv_->nextDeadline().has_value());
  EXPECT_EQ(*rdzv_->nextDeadline(), now_ + milliseconds(500));
  rdzv_->tick(now_ + milliseconds(499), &events_);
  EXPECT_TRUE(formed().empty());
  now_ += milliseconds(200);
  ASSERT_TRUE(join("c").ok());  // joins inside the last call window: included
  rdzv_->tick(now_ + milliseconds(300), &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].members.size(), 3u);
}

TEST_F(RendezvousTest, BelowMinNeverForms) {
  make(3, 3);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  rdzv_->tick(now_ + seconds(60), &events_);
  EXPECT_TRUE(formed().empty());
  EXPECT_EQ(rdzv_->state(), RoundState::kWaiting);
  EXPECT_EQ(rdzv_->generation(), 0u);
}

TEST_F(RendezvousTest, LateJoinersAreHeldForTheNextRound) {
  make(2, 3);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  rdzv_->tick(now_ + seconds(3), &events_);
  ASSERT_EQ(formed().size(), 1u);
  events_.clear();
  auto late = join("c");
  ASSERT_TRUE(late.ok());
  EXPECT_TRUE(late->waiting);
  EXPECT_TRUE(formed().empty()) << "a formed round is closed to newcomers";
  auto waiting = take<NodesWaitingEvent>();
  ASSERT_EQ(waiting.size(), 1u);
  EXPECT_EQ(waiting[0].count, 1u);
  EXPECT_EQ(rdzv_->snapshot().members.size(), 2u);
  EXPECT_EQ(rdzv_->generation(), 1u);

  // A member asks for a new round (at a commit point): the held node comes in.
  events_.clear();
  ASSERT_TRUE(rdzv_->requestReform("a", "admit waiting nodes", now_, &events_).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 2u);
  EXPECT_EQ(f[0].members.size(), 3u);
}

TEST_F(RendezvousTest, HeldNodesBeyondMaxStayHeld) {
  make(1, 2);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  ASSERT_EQ(formed().size(), 1u);
  ASSERT_TRUE(join("c").ok());
  ASSERT_TRUE(join("d").ok());
  events_.clear();
  rdzv_->leave("b", "lost: stream broken", true, now_, &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  ASSERT_EQ(f[0].members.size(), 2u);
  EXPECT_EQ(f[0].members[0].node_id, "a");
  EXPECT_EQ(f[0].members[1].node_id, "c") << "the earliest held node is admitted first";
  EXPECT_EQ(rdzv_->snapshot().waiting, 1u);
}

TEST_F(RendezvousTest, FailureOfMemberMovesGenerationAndReformsAtOnce) {
  make(2, 4, milliseconds(500));
  for (auto id : {"a", "b", "c", "d"}) ASSERT_TRUE(join(id).ok());
  ASSERT_EQ(rdzv_->generation(), 1u);
  const auto before = ranks();
  events_.clear();
  rdzv_->leave("b", "lost: stream broken", true, now_, &events_);
  auto gens = take<GenerationEvent>();
  ASSERT_GE(gens.size(), 2u);
  EXPECT_EQ(gens[0].generation, 2u);
  EXPECT_EQ(gens[0].state, RoundState::kReforming);
  EXPECT_EQ(gens[0].failed_nodes, std::vector<std::string>{"b"});
  EXPECT_NE(gens[0].cause.find("stream broken"), std::string::npos);
  // No last call on a re-form: everyone who can come is here.
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 2u);
  EXPECT_EQ(f[0].members.size(), 3u);
  const auto after = ranks();
  EXPECT_EQ(after.at("a"), before.at("a"));
  EXPECT_EQ(after.at("c"), before.at("c"));
  EXPECT_EQ(after.at("d"), 1u) << "the node whose rank no longer exists takes the freed rank";
}

TEST_F(RendezvousTest, BelowMinAfterFailureWaitsForReplacement) {
  make(3, 3);
  for (auto id : {"a", "b", "c"}) ASSERT_TRUE(join(id).ok());
  events_.clear();
  rdzv_->leave("c", "lost: no heartbeat", true, now_, &events_);
  EXPECT_TRUE(formed().empty());
  EXPECT_EQ(rdzv_->state(), RoundState::kReforming);
  EXPECT_EQ(rdzv_->generation(), 2u);
  ASSERT_TRUE(join("c2").ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u) << "MIN = MAX: the replacement completes the round at once";
  EXPECT_EQ(f[0].generation, 2u) << "the generation moved once, at the failure";
  EXPECT_EQ(ranks().at("c2"), 2u);
}

TEST_F(RendezvousTest, FailureDuringGatheringDoesNotMoveGeneration) {
  make(3, 3);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  rdzv_->leave("b", "lost: stream broken", true, now_, &events_);
  EXPECT_TRUE(take<GenerationEvent>().empty());
  EXPECT_EQ(rdzv_->snapshot().gathering, 1u);
  ASSERT_TRUE(join("b").ok()) << "a failed node may rejoin under its id";
  ASSERT_TRUE(join("c").ok());
  EXPECT_EQ(formed().size(), 1u);
  EXPECT_EQ(rdzv_->generation(), 1u);
}

TEST_F(RendezvousTest, FailureDuringLastCallBelowMinCancelsIt) {
  make(2, 4, milliseconds(500));
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  rdzv_->leave("a", "lost", true, now_, &events_);
  rdzv_->tick(now_ + seconds(1), &events_);
  EXPECT_TRUE(formed().empty());
  ASSERT_TRUE(join("c").ok());
  rdzv_->tick(now_ + milliseconds(499), &events_);
  EXPECT_TRUE(formed().empty()) << "the last call restarts when MIN is reached again";
  rdzv_->tick(now_ + milliseconds(500), &events_);
  EXPECT_EQ(formed().size(), 1u);
}

TEST_F(RendezvousTest, TwoFailuresInARow) {
  make(1, 4);
  for (auto id : {"a", "b", "c", "d"}) ASSERT_TRUE(join(id).ok());
  rdzv_->leave("a", "lost", true, now_, &events_);
  rdzv_->leave("d", "lost", true, now_, &events_);
  EXPECT_EQ(rdzv_->generation(), 3u);
  const auto r = ranks();
  ASSERT_EQ(r.size(), 2u);
  std::set<std::uint32_t> got{r.at("b"), r.at("c")};
  EXPECT_EQ(got, (std::set<std::uint32_t>{0, 1}));
  EXPECT_EQ(r.at("b"), 1u) << "b keeps rank 1";
}

TEST_F(RendezvousTest, FailuresSeenTogetherMoveTheGenerationOnce) {
  make(1, 8);
  for (auto id : {"a", "b", "c", "d", "e", "f"}) ASSERT_TRUE(join(id).ok());
  rdzv_->tick(now_ + seconds(3), &events_);
  events_.clear();
  std::vector<Rendezvous::Departure> gone;
  for (auto id : {"b", "c", "d", "e"}) gone.push_back({id, "lost: no heartbeat", true});
  gone.push_back({"unknown", "lost", true});
  rdzv_->leave(gone, now_, &events_);
  EXPECT_EQ(rdzv_->generation(), 2u) << "one re-form for all";
  auto gens = take<GenerationEvent>();
  ASSERT_EQ(gens.size(), 2u);
  EXPECT_EQ(gens[0].failed_nodes, (std::vector<std::string>{"b", "c", "d", "e"}));
  EXPECT_NE(gens[0].cause.find("and 1 more"), std::string::npos) << gens[0].cause;
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].members.size(), 2u);
}

TEST_F(RendezvousTest, DuplicateNodeIdIsRefusedWhileLive) {
  make(2, 2);
  ASSERT_TRUE(join("a").ok());
  auto dup = join("a");
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.status().code(), StatusCode::kAlreadyExists);
  EXPECT_NE(dup.status().message().find("'a'"), std::string::npos);
  EXPECT_EQ(rdzv_->snapshot().gathering, 1u) << "the refused join changed nothing";
}

TEST_F(RendezvousTest, RejoinAfterFailureKeepsRank) {
  make(3, 3);
  for (auto id : {"a", "b", "c"}) ASSERT_TRUE(join(id).ok());
  const auto before = ranks();
  rdzv_->leave("a", "lost", true, now_, &events_);
  ASSERT_TRUE(join("a").ok());
  EXPECT_EQ(ranks(), before) << "the same nodes get the same ranks";
  EXPECT_EQ(rdzv_->generation(), 2u);
}

TEST_F(RendezvousTest, RanksStayStableAcrossRoundsAndFillGaps) {
  make(1, 8);
  for (auto id : {"a", "b", "c", "d", "e"}) ASSERT_TRUE(join(id).ok());
  rdzv_->tick(now_ + seconds(3), &events_);
  const auto first = ranks();
  EXPECT_EQ(first.at("a"), 0u);
  EXPECT_EQ(first.at("e"), 4u);
  rdzv_->leave("b", "lost", true, now_, &events_);  // ranks 0,2,3 keep; e (4) -> 1
  auto r = ranks();
  EXPECT_EQ(r.at("a"), 0u);
  EXPECT_EQ(r.at("c"), 2u);
  EXPECT_EQ(r.at("d"), 3u);
  EXPECT_EQ(r.at("e"), 1u);
  ASSERT_TRUE(join("f").ok());
  ASSERT_TRUE(rdzv_->requestReform("a", "grow", now_, &events_).ok());
  r = ranks();
  EXPECT_EQ(r.at("a"), 0u);
  EXPECT_EQ(r.at("e"), 1u);
  EXPECT_EQ(r.at("c"), 2u);
  EXPECT_EQ(r.at("d"), 3u);
  EXPECT_EQ(r.at("f"), 4u) << "a newcomer takes the next free rank";
}

TEST_F(RendezvousTest, AssignRanksIsAPermutation) {
  std::vector<NodeInfo> nodes;
  std::unordered_map<std::string, std::uint32_t> prev;
  for (int i = 0; i < 50; ++i) {
    nodes.push_back(node("n" + std::to_string(i)));
    if (i % 3 == 0) prev["n" + std::to_string(i)] = static_cast<std::uint32_t>((i * 7) % 80);
  }
  const auto members = Rendezvous::assignRanks(nodes, prev);
  std::set<std::uint32_t> seen;
  for (std::size_t i = 0; i < members.size(); ++i) {
    EXPECT_EQ(members[i].node_rank, i);
    seen.insert(members[i].node_rank);
    auto p = prev.find(members[i].node_id);
    if (p != prev.end() && p->second < 50) {
      EXPECT_EQ(members[i].node_rank, p->second);
    }
  }
  EXPECT_EQ(seen.size(), 50u);
}

TEST_F(RendezvousTest, JoinTimeoutFailsTheJobWithAClearReason) {
  make(3, 3, milliseconds(500), seconds(10));
  ASSERT_TRUE(join("a").ok());
  rdzv_->tick(now_ + seconds(9), &events_);
  EXPECT_TRUE(take<DismissEvent>().empty());
  rdzv_->tick(now_ + seconds(10), &events_);
  auto dismissed = take<DismissEvent>();
  ASSERT_EQ(dismissed.size(), 1u);
  EXPECT_TRUE(dismissed[0].job_failed);
  EXPECT_NE(dismissed[0].reason.find("1 of the 3"), std::string::npos) << dismissed[0].reason;
  EXPECT_EQ(rdzv_->state(), RoundState::kClosed);
  EXPECT_EQ(join("b").status().code(), StatusCode::kFailedPrecondition);
}

TEST_F(RendezvousTest, CloseRefusesLaterJoinsAndDismissesHeldNodes) {
  make(1, 1);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());  // held
  events_.clear();
  ASSERT_TRUE(rdzv_->close("a", "training done", &events_).ok());
  auto dismissed = take<DismissEvent>();
  ASSERT_EQ(dismissed.size(), 1u);
  EXPECT_EQ(dismissed[0].node_id, "b");
  EXPECT_FALSE(dismissed[0].job_failed);
  auto late = join("c");
  EXPECT_EQ(late.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(late.status().message().find("closed"), std::string::npos);
  EXPECT_EQ(rdzv_->close("zzz", "x", &events_).code(), StatusCode::kOk) << "closing twice is fine";
}

TEST_F(RendezvousTest, OnlyMembersMayRequestReformOrClose) {
  make(1, 1);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());  // held
  EXPECT_EQ(rdzv_->requestReform("b", "x", now_, &events_).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(rdzv_->close("b", "x", &events_).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(rdzv_->requestReform("nobody", "x", now_, &events_).code(),
            StatusCode::kFailedPrecondition);
}

TEST_F(RendezvousTest, BadJoinsAreRefusedWithReasons) {
  make(2, 4);
  NodeInfo n = node("");
  auto r = rdzv_->join(n, now_, &events_);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("empty node id"), std::string::npos);

  n = node("x", 0);
  EXPECT_NE(rdzv_->join(n, now_, &events_).status().message().find("local_world_size 0"),
            std::string::npos);

  n = node("x");
  n.job_id = "other";
  r = rdzv_->join(n, now_, &events_);
  EXPECT_NE(r.status().message().find("--rdzv-id"), std::string::npos) << r.status().message();

  n = node("x");
  n.min_nodes = 1;
  n.max_nodes = 8;
  r = rdzv_->join(n, now_, &events_);
  EXPECT_NE(r.status().message().find("1:8"), std::string::npos);
  EXPECT_NE(r.status().message().find("2:4"), std::string::npos);

  n = node("x");
  n.min_nodes = 3;
  n.max_nodes = 2;
  EXPECT_EQ(rdzv_->join(n, now_, &events_).status().code(), StatusCode::kInvalidArgument);

  n = node(std::string(300, 'x'));
  EXPECT_EQ(rdzv_->join(n, now_, &events_).status().code(), StatusCode::kInvalidArgument);
  n = node("bad\nid");
  EXPECT_EQ(rdzv_->join(n, now_, &events_).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rdzv_->snapshot().gathering, 0u) << "no refused join left a trace";
}

TEST_F(RendezvousTest, CountsAndJobIdComeFromFirstJoinWhenUnset) {
  rdzv_ = std::make_unique<Rendezvous>(RendezvousOptions{});
  NodeInfo n = node("a");
  auto r = rdzv_->join(n, now_, &events_);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << "no counts anywhere";
  n.min_nodes = 2;
  n.max_nodes = 2;
  n.job_id = "j1";
  ASSERT_TRUE(rdzv_->join(n, now_, &events_).ok());
  NodeInfo m = node("b");
  m.job_id = "j2";
  EXPECT_EQ(rdzv_->join(m, now_, &events_).status().code(), StatusCode::kInvalidArgument);
  m.job_id = "j1";  // counts omitted: the job's are used
  ASSERT_TRUE(rdzv_->join(m, now_, &events_).ok());
  EXPECT_EQ(rdzv_->state(), RoundState::kFormed);
}

// Spares: nodes held while the round is at MAX are not "waiting to join" (a member that re-formed
// for them would form the same full round again, and again for ever); they come in when a member
// goes.
TEST_F(RendezvousTest, WaitingCountsOnlyTheHeldNodesThatFit) {
  make(1, 3);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  rdzv_->tick(now_ + seconds(3), &events_);
  ASSERT_EQ(formed().size(), 1u);
  events_.clear();
  ASSERT_TRUE(join("c").ok());
  ASSERT_TRUE(join("d").ok());
  auto waiting = take<NodesWaitingEvent>();
  ASSERT_EQ(waiting.size(), 2u);
  EXPECT_EQ(waiting[0].count, 1u);
  EXPECT_EQ(waiting[1].count, 1u) << "one place left under MAX 3, two held";
  events_.clear();
  ASSERT_TRUE(rdzv_->requestReform("a", "admit waiting nodes", now_, &events_).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].members.size(), 3u);
  waiting = take<NodesWaitingEvent>();
  ASSERT_EQ(waiting.size(), 1u);
  EXPECT_EQ(waiting[0].count, 0u) << "the round is full: 'd' is a spare, not a reason to re-form";
  ASSERT_TRUE(join("e").ok());
  waiting = take<NodesWaitingEvent>();
  ASSERT_FALSE(waiting.empty());
  EXPECT_EQ(waiting.back().count, 0u);
  // A member goes: a spare takes its place.
  events_.clear();
  rdzv_->leave(f[0].members[1].node_id, "lost: stream broken", true, now_, &events_);
  rdzv_->tick(now_ + seconds(3), &events_);
  f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].members.size(), 3u);
}

TEST_F(RendezvousTest, HeldNodeLeavingUpdatesWaitingCount) {
  make(1, 1);
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  events_.clear();
  rdzv_->leave("b", "left", false, now_, &events_);
  auto waiting = take<NodesWaitingEvent>();
  ASSERT_EQ(waiting.size(), 1u);
  EXPECT_EQ(waiting[0].count, 0u);
  EXPECT_EQ(rdzv_->generation(), 1u) << "a held node leaving changes no membership";
}

TEST_F(RendezvousTest, AllMembersLostThenJoinTimeoutCloses) {
  make(1, 2, milliseconds(100), seconds(5));
  ASSERT_TRUE(join("a").ok());
  ASSERT_TRUE(join("b").ok());
  rdzv_->leave("a", "lost", true, now_, &events_);
  rdzv_->leave("b", "lost", true, now_, &events_);
  EXPECT_EQ(rdzv_->state(), RoundState::kReforming);
  rdzv_->tick(now_ + seconds(5), &events_);
  EXPECT_EQ(rdzv_->state(), RoundState::kClosed);
}

}  // namespace
}  // namespace rally::coordinator

namespace rally::coordinator {
namespace {

// A successor's coordinator: generation 7 ended with the lost host 'h'; 'a', 'b', 'c' were node
// ranks 1, 2, 3 under it.
class TakeoverTest : public RendezvousTest {
 protected:
  void makeTakeover(std::uint32_t min, std::uint32_t max, std::uint32_t expected) {
    RendezvousOptions o{"job", min, max, milliseconds(2000), seconds(600)};
    o.takeover = Takeover{7, expected, "the coordinator's host, node 'h', was lost", {"h"}};
    rdzv_ = std::make_unique<Rendezvous>(o);
  }
  Result<JoinOutcome> rejoin(const std::string& id, std::uint64_t gen, std::uint32_t rank) {
    NodeInfo n = node(id);
    n.last_generation = gen;
    n.last_node_rank = rank;
    return rdzv_->join(n, now_, &events_);
  }
};

TEST_F(TakeoverTest, GoesOnFromTheLostGenerationAndFormsAtOnceWhenEveryoneIsBack) {
  makeTakeover(1, 4, 3);
  // Before anyone is back: re-forming the generation after the lost one.
  EXPECT_EQ(rdzv_->generation(), 8u);
  EXPECT_EQ(rdzv_->state(), RoundState::kReforming);
  ASSERT_TRUE(rejoin("c", 7, 3).ok());
  ASSERT_TRUE(rejoin("a", 7, 1).ok());
  EXPECT_TRUE(formed().empty()) << "two of the three expected: no round yet";
  ASSERT_TRUE(rejoin("b", 7, 2).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u) << "all three back: no last call";
  EXPECT_EQ(f[0].generation, 8u);
  EXPECT_EQ(f[0].cause, "the coordinator's host, node 'h', was lost");
  EXPECT_EQ(f[0].failed_nodes, std::vector<std::string>{"h"});
  // Ranks 1 and 2 are kept; 3 is past the end and fills the lost host's 0.
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"a", 1}, {"b", 2}, {"c", 0}}));
  // From here it is an ordinary coordinator: a failure moves the generation on from 8.
  events_.clear();
  rdzv_->leave("b", "lost", true, now_, &events_);
  ASSERT_EQ(formed().size(), 1u);
  EXPECT_EQ(rdzv_->generation(), 9u);
}

TEST_F(TakeoverTest, ANodeThatDoesNotComeBackCostsOnlyTheLastCall) {
  makeTakeover(2, 4, 3);
  ASSERT_TRUE(rejoin("a", 7, 1).ok());
  ASSERT_TRUE(rejoin("b", 7, 2).ok());
  rdzv_->tick(now_ + milliseconds(1999), &events_);
  EXPECT_TRUE(formed().empty());
  rdzv_->tick(now_ + milliseconds(2000), &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 8u);
  EXPECT_EQ(f[0].members.size(), 2u);
}

TEST_F(TakeoverTest, ANodeThatSawANewerRoundMovesTheGenerationPastIt) {
  makeTakeover(1, 4, 2);
  ASSERT_TRUE(rejoin("a", 9, 1).ok());  // the successor missed rounds 8 and 9
  EXPECT_EQ(rdzv_->generation(), 10u);
  auto moved = take<GenerationEvent>();
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(moved[0].generation, 10u);
  EXPECT_EQ(moved[0].state, RoundState::kReforming);
  ASSERT_TRUE(rejoin("b", 7, 2).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 10u);
}

TEST_F(TakeoverTest, AnOldMemberBackAfterTheRoundFormedWithoutItReFormsAtOnce) {
  makeTakeover(2, 4, 3);
  ASSERT_TRUE(rejoin("a", 7, 1).ok());
  ASSERT_TRUE(join("new").ok());                     // a spare of the lost coordinator, in no round
  rdzv_->tick(now_ + milliseconds(2000), &events_);  // 'b' and 'c' missed the last call
  ASSERT_EQ(formed().size(), 1u);
  EXPECT_EQ(rdzv_->generation(), 8u);
  events_.clear();
  // 'b' was only slow: its workers are re-forming in place. It is not held as a newcomer (they
  // would give up): the job re-forms with it at once.
  auto back = rejoin("b", 7, 2);
  ASSERT_TRUE(back.ok());
  EXPECT_FALSE(back->waiting);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 9u);
  EXPECT_EQ(f[0].members.size(), 3u);
  events_.clear();
  // A newcomer is held as ever, for the members to admit at a commit point.
  auto later = join("later");
  ASSERT_TRUE(later.ok());
  EXPECT_TRUE(later->waiting);
  EXPECT_TRUE(formed().empty());
}

TEST_F(TakeoverTest, NewNodesJoinTheTakenOverRoundAfterTheOldMembers) {
  makeTakeover(1, 4, 2);
  ASSERT_TRUE(join("new").ok());  // a node that was in no round
  ASSERT_TRUE(rejoin("b", 7, 2).ok());
  EXPECT_TRUE(formed().empty()) << "one old member of two is back";
  ASSERT_TRUE(rejoin("a", 7, 1).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u) << "both old members back (MAX is 4: not why it formed)";
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"a", 1}, {"b", 2}, {"new", 0}}));
}

// Newcomers that make up MAX while an old member is still on its way back (the lost host
// restarted and a spare found the successor first, 100 ms before the slower old member): the round
// waits for it, within the last call, and takes it before the newcomers. Before, it formed at once
// with the newcomers, and the old member was held with its live workers until they gave up.
TEST_F(TakeoverTest, NewcomersFillingMaxWaitForTheOldMembersStillComingBack) {
  makeTakeover(2, 3, 2);  // 'c' (the successor's own node) and 'b' are expected back
  ASSERT_TRUE(rejoin("c", 7, 2).ok());
  ASSERT_TRUE(join("spare").ok());
  ASSERT_TRUE(join("restarted").ok());
  EXPECT_TRUE(formed().empty()) << "MAX is there, but 'b' is not back yet";
  ASSERT_TRUE(rdzv_->nextDeadline().has_value()) << "the server's timer must wake it";
  EXPECT_EQ(*rdzv_->nextDeadline(), now_ + milliseconds(2000)) << "the last call, from MIN";
  now_ += milliseconds(100);
  auto b = rejoin("b", 7, 1);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->waiting);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u) << "every old member back: at once";
  EXPECT_EQ(f[0].generation, 8u);
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"b", 1}, {"c", 2}, {"spare", 0}}));
  EXPECT_EQ(rdzv_->snapshot().waiting, 1u) << "the later newcomer waits for a place";
}

TEST_F(TakeoverTest, NewcomersFillingMaxFormWithoutAnOldMemberAfterTheLastCall) {
  makeTakeover(2, 3, 2);
  ASSERT_TRUE(rejoin("c", 7, 2).ok());
  ASSERT_TRUE(join("spare").ok());  // MIN: the last call starts
  ASSERT_TRUE(join("restarted").ok());
  rdzv_->tick(now_ + milliseconds(1999), &events_);
  EXPECT_TRUE(formed().empty());
  rdzv_->tick(now_ + milliseconds(2000), &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u) << "'b' missed the last call";
  EXPECT_EQ(f[0].members.size(), 3u);
  EXPECT_EQ(ranks().count("b"), 0u);
}

}  // namespace
}  // namespace rally::coordinator

namespace rally::coordinator {
namespace {

// A restarted coordinator: no round formed here yet when the members of generation 5 ('a', 'b',
// 'c' at node ranks 2, 0, 1) come back.
class ResumeTest : public RendezvousTest {
 protected:
  Result<JoinOutcome> rejoin(const std::string& id, std::uint64_t gen, std::uint32_t rank,
                             std::uint32_t num = 3) {
    NodeInfo n = node(id);
    n.last_generation = gen;
    n.last_node_rank = rank;
    n.last_num_nodes = num;
    return rdzv_->join(n, now_, &events_);
  }
};

TEST_F(ResumeTest, TheRoundResumesUnchangedOnceAllItsMembersAreBack) {
  make(2, 4);
  ASSERT_TRUE(rejoin("a", 5, 2).ok());
  EXPECT_EQ(rdzv_->generation(), 5u) << "watchers see the job's generation, not 0";
  EXPECT_EQ(rdzv_->state(), RoundState::kWaiting);
  ASSERT_TRUE(join("new").ok());  // a node that was in no round
  ASSERT_TRUE(rejoin("b", 5, 0).ok());
  rdzv_->tick(now_ + milliseconds(2000) + kResumeGrace - milliseconds(1), &events_);
  EXPECT_TRUE(formed().empty()) << "MIN is there, but the resumed round waits for 'c'";
  ASSERT_TRUE(rejoin("c", 5, 1).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 5u) << "nothing moved: the same generation";
  EXPECT_NE(f[0].cause.find("coordinator restarted"), std::string::npos) << f[0].cause;
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"a", 2}, {"b", 0}, {"c", 1}}));
  EXPECT_EQ(rdzv_->snapshot().waiting, 1u) << "the newcomer waits for the next round";
  auto waiting = take<NodesWaitingEvent>();
  ASSERT_FALSE(waiting.empty());
  EXPECT_EQ(waiting.back().count, 1u);
  // From here on an ordinary coordinator: the next round is generation 6.
  events_.clear();
  ASSERT_TRUE(rdzv_->requestReform("a", "admit", now_, &events_).ok());
  f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 6u);
  EXPECT_EQ(f[0].members.size(), 4u);
}

TEST_F(ResumeTest, AMemberThatDoesNotComeBackMeansANewRoundAfterTheLastCallAndGrace) {
  make(2, 4);
  ASSERT_TRUE(rejoin("a", 5, 2).ok());
  ASSERT_TRUE(rejoin("b", 5, 0).ok());
  const TimePoint deadline = now_ + milliseconds(2000) + kResumeGrace;
  ASSERT_TRUE(rdzv_->nextDeadline().has_value());
  EXPECT_EQ(*rdzv_->nextDeadline(), deadline);
  rdzv_->tick(deadline, &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 6u) << "a new membership: a new generation";
  EXPECT_NE(f[0].cause.find("2 of the 3 node(s) of generation 5 came back"), std::string::npos)
      << f[0].cause;
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"a", 1}, {"b", 0}}));
}

TEST_F(ResumeTest, TheNewestRoundAnyoneReportsIsTheOneResumed) {
  make(1, 4);
  ASSERT_TRUE(rejoin("old", 4, 0, 2).ok());  // was left behind in generation 4
  ASSERT_TRUE(rejoin("a", 5, 0, 2).ok());
  EXPECT_EQ(rdzv_->generation(), 5u);
  EXPECT_TRUE(formed().empty());
  ASSERT_TRUE(rejoin("b", 5, 1, 2).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 5u);
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"a", 0}, {"b", 1}}));
  EXPECT_EQ(rdzv_->snapshot().waiting, 1u) << "'old' was not in generation 5";
}

TEST_F(ResumeTest, NewcomersFillingMaxDoNotEndTheRoundBeforeItsMembersAreBack) {
  make(2, 3);
  ASSERT_TRUE(rejoin("a", 5, 2).ok());
  ASSERT_TRUE(join("new1").ok());
  ASSERT_TRUE(join("new2").ok());
  EXPECT_TRUE(formed().empty()) << "MAX is there, but 'b' and 'c' are not back yet";
  ASSERT_TRUE(rejoin("b", 5, 0).ok());
  ASSERT_TRUE(rejoin("c", 5, 1).ok());
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 5u) << "resumed, unchanged";
  EXPECT_EQ(ranks(), (std::map<std::string, std::uint32_t>{{"a", 2}, {"b", 0}, {"c", 1}}));
  EXPECT_EQ(rdzv_->snapshot().waiting, 2u);
}

TEST_F(ResumeTest, NewcomersFillingMaxFormANewRoundAfterTheLastCallAndGrace) {
  make(2, 3);
  ASSERT_TRUE(rejoin("a", 5, 2).ok());
  ASSERT_TRUE(join("new1").ok());
  ASSERT_TRUE(join("new2").ok());
  const TimePoint deadline = now_ + milliseconds(2000) + kResumeGrace;
  ASSERT_TRUE(rdzv_->nextDeadline().has_value());
  EXPECT_EQ(*rdzv_->nextDeadline(), deadline);
  rdzv_->tick(deadline - milliseconds(1), &events_);
  EXPECT_TRUE(formed().empty());
  rdzv_->tick(deadline, &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u) << "'b' and 'c' missed the last call and the grace";
  EXPECT_EQ(f[0].generation, 6u);
  EXPECT_EQ(f[0].members.size(), 3u);
}

TEST_F(ResumeTest, AMemberLeavingWhileOthersComeBackIsNotCountedBack) {
  make(1, 4);
  ASSERT_TRUE(rejoin("a", 5, 0, 2).ok());
  rdzv_->leave("a", "lost", true, now_, &events_);
  ASSERT_TRUE(rejoin("b", 5, 1, 2).ok());
  EXPECT_TRUE(formed().empty()) << "'a' left again: one of two is back";
}

}  // namespace
}  // namespace rally::coordinator

namespace rally::coordinator {
namespace {

TEST_F(ResumeTest, AMemberOfANewerRoundMovesTheGenerationPastOneFormedWithoutIt) {
  make(1, 4);
  ASSERT_TRUE(rejoin("old", 4, 0, 2).ok());  // left behind in generation 4; MIN is 1
  rdzv_->tick(now_ + milliseconds(2000) + kResumeGrace, &events_);
  auto f = formed();
  ASSERT_EQ(f.size(), 1u);
  ASSERT_EQ(f[0].generation, 5u) << "a new round from generation 4's members";
  // A member of the real generation 5 comes back: 5 must not name two memberships.
  events_.clear();
  auto late = rejoin("a", 5, 0, 2);
  ASSERT_TRUE(late.ok());
  EXPECT_FALSE(late->waiting);
  f = formed();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].generation, 6u);
  EXPECT_EQ(f[0].members.size(), 2u);
  EXPECT_NE(f[0].cause.find("came back from generation 5"), std::string::npos) << f[0].cause;
}

}  // namespace
}  // namespace rally::coordinator
