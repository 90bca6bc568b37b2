// Rendezvous in rounds: the coordinator's membership state machine, as pure logic with no network
// and no clock of its own (the caller passes `now`), so every transition is unit-testable.
//
//   Rendezvous rdzv(RendezvousOptions{.job_id = "j", .min_nodes = 2, .max_nodes = 4});
//   Events ev;
//   auto admitted = rdzv.join({.node_id = "n0", .job_id = "j", .local_world_size = 8}, now, &ev);
//   rdzv.tick(now + 3s, &ev);  // the last call expired: the round forms
//   for (const Event& e : ev) { ...deliver... }
//
// States (docs/design/coordinator.md has the diagram):
//   kWaiting   no round has formed yet; nodes gather until MAX joined (forms at once), or MIN
//   joined
//              and the last-call window passed.
//   kFormed    a round is running with generation G; later joiners are held for the next round.
//   kReforming a member left, failed or asked for a re-form: the generation moved to G+1 at once
//   and
//              the survivors (plus held nodes) gather; if at least MIN are there the round forms at
//              once.
//   kClosed    the job finished (or could not gather MIN in time); joins are refused.
//
// Takeover and resume (docs/design/coordinator.md): a successor's coordinator starts re-forming
// after the lost coordinator's generation (RendezvousOptions::takeover); a restarted one that
// members of a running round rejoin resumes that round, unchanged, once they are all back.
//
// The generation moves exactly when a formed membership ends (and once for the first round), so
// every communicator of generation G is built from one fixed membership.
//
// Thread-safety: none; the owner serialises calls.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally::coordinator {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;

// A coordinator that takes over a running job whose coordinator was lost with its host (the
// first surviving successor's agent starts it; docs/design/coordinator.md, "Takeover").
struct Takeover {
  std::uint64_t generation = 0;      // the last generation the successor saw formed
  std::uint32_t expected_nodes = 0;  // the round's other members: formed at once when all are back
  std::string cause;                 // "the coordinator's host, node 'n0', was lost: ..."
  std::vector<std::string> failed_nodes;  // the lost host's node, if it was a member
};

struct RendezvousOptions {
  std::string job_id;           // empty: taken from the first join
  std::uint32_t min_nodes = 0;  // 0: taken from the first join
  std::uint32_t max_nodes = 0;
  Milliseconds last_call{2000};
  Milliseconds join_timeout{600'000};
  // Set: start re-forming generation `takeover->generation + 1` at once, instead of waiting for a
  // first round. Members of the lost coordinator's round rejoin with their last generation and
  // node rank; the round forms as soon as `expected_nodes` are back (or, with MIN nodes, after
  // the last call: newcomers making up MAX do not form it before then without them).
  std::optional<Takeover> takeover;
};

struct NodeInfo {
  std::string node_id;
  std::string job_id;
  std::uint32_t min_nodes = 0;
  std::uint32_t max_nodes = 0;
  std::uint32_t local_world_size = 1;
  std::string address;
  std::uint64_t last_generation = 0;  // the agent's round under a lost coordinator, if any
  std::uint32_t last_node_rank = 0;
  std::uint32_t last_num_nodes = 0;
};

struct Member {
  std::string node_id;
  std::uint32_t node_rank = 0;
  std::uint32_t local_world_size = 1;
  std::string address;
};

enum class RoundState { kWaiting, kFormed, kReforming, kClosed };
const char* roundStateName(RoundState state);

// A round formed: tell each member its rank. Members are ordered by node rank.
struct RoundFormedEvent {
  std::uint64_t generation = 0;
  std::vector<Member> members;
  std::string cause;                      // "first round", or what ended the previous round
  std::vector<std::string> failed_nodes;  // nodes whose failure ended the previous round
};
// The generation or its state changed: tell every session and watcher.
struct GenerationEvent {
  std::uint64_t generation = 0;
  RoundState state = RoundState::kWaiting;
  std::uint32_t num_nodes = 0;
  std::string cause;
  std::vector<std::string> failed_nodes;
};
// The held nodes changed (or a round formed with some held): tell the members how many a new
// round could admit: as many as fit under MAX (0 when the round is full,
// its spares waiting for a member to go; members must not re-form for them).
struct NodesWaitingEvent {
  std::uint32_t count = 0;
};
// A node is dismissed (its session ends with this reason).
struct DismissEvent {
  std::string node_id;
  std::string reason;
  bool job_failed = false;
};
using Event = std::variant<RoundFormedEvent, GenerationEvent, NodesWaitingEvent, DismissEvent>;
using Events = std::vector<Event>;

struct JoinOutcome {
  bool waiting = false;  // held for the next round
};

struct RoundSnapshot {
  std::uint64_t generation = 0;
  RoundState state = RoundState::kWaiting;
  std::vector<Member> members;  // of the last formed round
  std::uint32_t gathering = 0;  // nodes enrolled in the round being gathered
  std::uint32_t waiting = 0;    // nodes held for the next round
  std::uint32_t min_nodes = 0;
  std::uint32_t max_nodes = 0;
  std::string job_id;  // empty until the coordinator's flags or the first join give it
};

class Rendezvous {
 public:
  explicit Rendezvous(RendezvousOptions options);

  // Admits a node into the gathering round, or holds it for the next one while a round runs.
  // Errors: InvalidArgument (bad fields, job or node counts that differ from the job's),
  // AlreadyExists (a live node has this id), FailedPrecondition (the rendezvous is closed).
  Result<JoinOutcome> join(const NodeInfo& node, TimePoint now, Events* events);

  // A node is gone: its stream broke, it missed heartbeats, or it left. Unknown ids are ignored.
  void leave(const std::string& node_id, const std::string& cause, bool failed, TimePoint now,
             Events* events);

  struct Departure {
    std::string node_id;
    std::string cause;  // "lost: its stream broke", "left: done"
    bool failed = true;
  };
  // Several nodes gone at once (e.g. found silent by one liveness check): one re-form for all.
  void leave(const std::vector<Departure>& departures, TimePoint now, Events* events);

  // A member asks for a new round (to admit held nodes, or to restart after a worker failure).
  Status requestReform(const std::string& node_id, const std::string& reason, TimePoint now,
                       Events* events);

  // The job is done: close the rendezvous; held nodes are dismissed.
  Status close(const std::string& node_id, const std::string& reason, Events* events);

  // Fires the last-call and join-timeout deadlines that have passed.
  void tick(TimePoint now, Events* events);
  // The earliest time tick() has something to do, if any.
  std::optional<TimePoint> nextDeadline() const;

  std::uint64_t generation() const { return generation_; }
  std::uint32_t minNodes() const { return options_.min_nodes; }
  std::uint32_t maxNodes() const { return options_.max_nodes; }
  RoundState state() const { return state_; }
  RoundSnapshot snapshot() const;
  bool isLive(const std::string& node_id) const { return nodes_.count(node_id) != 0; }

  // Rank assignment, exposed for tests: `ordered` nodes (survivors by old rank, then newcomers by
  // arrival) get ranks 0..n-1; a node keeps its previous rank when that rank still exists.
  static std::vector<Member> assignRanks(
      const std::vector<NodeInfo>& ordered,
      const std::unordered_map<std::string, std::uint32_t>& previous_ranks);

 private:
  enum class Role { kGathering, kMember, kHeld };
  struct Node {
    NodeInfo info;
    Role role = Role::kGathering;
    std::uint64_t arrival = 0;
  };

  Status validate(const NodeInfo& node) const;
  // Held nodes that fit in the formed round's free places (NodesWaitingEvent).
  std::uint32_t admissible() const {
    const size_t room =
        options_.max_nodes > members_.size() ? options_.max_nodes - members_.size() : 0;
    return static_cast<std::uint32_t>(std::min(held_.size(), room));
  }
  bool gathering() const {
    return state_ == RoundState::kWaiting || state_ == RoundState::kReforming;
  }
  void startReform(const std::string& cause, std::vector<std::string> failed_nodes, TimePoint now,
                   Events* events);
  void maybeForm(TimePoint now, bool at_once_if_min, Events* events);
  void form(Events* events);
  void failGathering(TimePoint now, Events* events);
  std::vector<std::string> gatheringOrder() const;

  RendezvousOptions options_;
  RoundState state_ = RoundState::kWaiting;
  std::uint64_t generation_ = 0;
  std::uint64_t next_arrival_ = 0;
  std::uint32_t gathering_count_ = 0;            // nodes with Role::kGathering
  std::unordered_map<std::string, Node> nodes_;  // every live node, whatever its role
  std::vector<Member> members_;                  // the last formed round, by rank
  std::deque<std::string> held_;                 // joined while a round ran, by arrival
  std::unordered_map<std::string, std::uint32_t> previous_ranks_;
  std::optional<TimePoint> min_reached_at_;   // when the gathering round reached MIN
  std::optional<TimePoint> gathering_since_;  // when the gathering round started waiting
  std::string reform_cause_;                  // what ended the last formed round
  std::vector<std::string> reform_failed_;
  std::optional<std::uint32_t> takeover_expected_;  // until the taken-over round forms
  std::uint32_t takeover_back_ = 0;                 // old members gathering again
  // A restarted coordinator (no round formed here yet) that members of a running round rejoin:
  // that round resumes, generation and ranks unchanged, once all of its members are back.
  struct Resume {
    std::uint64_t generation = 0;
    std::uint32_t expected = 0;
    std::set<std::string> back;
  };
  std::optional<Resume> resume_;
  void formResumed(Events* events);
};

// How much longer than the last call a restarted coordinator waits for a resumed round's members
// before it forms a new round without the missing ones: their agents retry with a backoff of up to
// 2 s.
inline constexpr Milliseconds kResumeGrace{2000};

}  // namespace rally::coordinator
