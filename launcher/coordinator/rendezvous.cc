#include "launcher/coordinator/rendezvous.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>

namespace rally::coordinator {
namespace {

constexpr std::uint32_t kMaxNodesLimit = 1'000'000;
constexpr size_t kMaxNodeIdBytes = 256;

}  // namespace

const char* roundStateName(RoundState state) {
  switch (state) {
    case RoundState::kWaiting:
      return "waiting";
    case RoundState::kFormed:
      return "formed";
    case RoundState::kReforming:
      return "reforming";
    case RoundState::kClosed:
      return "closed";
  }
  return "unknown";
}

Rendezvous::Rendezvous(RendezvousOptions options) : options_(std::move(options)) {
  if (options_.takeover) {
    // The lost coordinator's round ended with its host: its generation is over.
    generation_ = options_.takeover->generation + 1;
    state_ = RoundState::kReforming;
    reform_cause_ = options_.takeover->cause;
    reform_failed_ = options_.takeover->failed_nodes;
    takeover_expected_ = options_.takeover->expected_nodes;
  }
}

Status Rendezvous::validate(const NodeInfo& node) const {
  if (node.node_id.empty()) {
    return invalidArgument("join has an empty node id: every agent needs an id unique in the job");
  }
  if (node.node_id.size() > kMaxNodeIdBytes) {
    return invalidArgument(fmt::format("node id of {} bytes is too long: at most {} bytes",
                                       node.node_id.size(), kMaxNodeIdBytes));
  }
  for (unsigned char c : node.node_id) {
    if (c < 0x20 || c == 0x7f) {
      return invalidArgument("node id has control characters: use printable characters only");
    }
  }
  if (node.local_world_size == 0) {
    return invalidArgument(fmt::format(
        "node '{}' joined with local_world_size 0: a node runs at least one worker", node.node_id));
  }
  if (!options_.job_id.empty() && node.job_id != options_.job_id) {
    return invalidArgument(
        fmt::format("node '{}' is for job '{}' but this coordinator runs job '{}': check --rdzv-id",
                    node.node_id, node.job_id, options_.job_id));
  }
  const bool node_has_counts = node.min_nodes != 0 || node.max_nodes != 0;
  if (node_has_counts) {
    if (node.min_nodes == 0 || node.max_nodes < node.min_nodes || node.max_nodes > kMaxNodesLimit) {
      return invalidArgument(
          fmt::format("node '{}' asked for --nnodes {}:{}: need 1 <= MIN <= MAX <= {}",
                      node.node_id, node.min_nodes, node.max_nodes, kMaxNodesLimit));
    }
    if (options_.min_nodes != 0 &&
        (node.min_nodes != options_.min_nodes || node.max_nodes != options_.max_nodes)) {
      return invalidArgument(fmt::format(
          "node '{}' asked for --nnodes {}:{} but job '{}' runs with --nnodes {}:{}", node.node_id,
          node.min_nodes, node.max_nodes, options_.job_id, options_.min_nodes, options_.max_nodes));
    }
  } else if (options_.min_nodes == 0) {
    return invalidArgument(fmt::format(
        "node '{}' gave no node counts and the coordinator has none: pass --nnodes MIN:MAX to "
        "the agent or the coordinator",
        node.node_id));
  }
  return okStatus();
}

Result<JoinOutcome> Rendezvous::join(const NodeInfo& node, TimePoint now, Events* events) {
  if (state_ == RoundState::kClosed) {
    return failedPrecondition(fmt::format(
        "the rendezvous of job '{}' is closed (the job finished or failed): use a new --rdzv-id "
        "to run again",
        options_.job_id));
  }
  RALLY_RETURN_IF_ERROR(validate(node));
  if (nodes_.count(node.node_id) != 0) {
    return alreadyExists(
        fmt::format("node id '{}' is already joined by a live agent: give every node a distinct id",
                    node.node_id));
  }
  if (options_.job_id.empty()) options_.job_id = node.job_id;
  if (options_.min_nodes == 0) {
    options_.min_nodes = node.min_nodes;
    options_.max_nodes = node.max_nodes;
  }

  Node entry{node, Role::kGathering, next_arrival_++};
  if (takeover_expected_ && node.last_generation > 0) {
    // A member of the lost coordinator's round: it keeps its rank where it can. One that saw a
    // newer round than the successor did moves the generation past it.
    previous_ranks_.emplace(node.node_id, node.last_node_rank);
    ++takeover_back_;
    if (node.last_generation >= generation_) {
      generation_ = node.last_generation + 1;
      events->push_back(GenerationEvent{generation_, RoundState::kReforming, gathering_count_ + 1,
                                        reform_cause_, reform_failed_});
    }
  }
  if (!takeover_expected_ && state_ == RoundState::kWaiting && node.last_generation > 0) {
    // This coordinator was restarted under a running job: its members come back with their round.
    // The newest round anyone reports is the one to resume.
    if (!resume_ || node.last_generation > resume_->generation) {
      resume_ = Resume{node.last_generation, node.last_num_nodes, {}};
      previous_ranks_.clear();
      generation_ = node.last_generation;
    }
    if (node.last_generation == resume_->generation) {
      resume_->back.insert(node.node_id);
      previous_ranks_[node.node_id] = node.last_node_rank;
    }
  }
  if (state_ == RoundState::kFormed && node.last_generation >= generation_) {
    // A member of a round at least as new as this one's: this coordinator (restarted) formed its
    // generation without it, from older members. A generation names one membership: move past
    // it, with this node in the next round.
    entry.role = Role::kHeld;
    nodes_.emplace(node.node_id, std::move(entry));
    held_.push_back(node.node_id);
    generation_ = std::max(generation_, node.last_generation);
    startReform(fmt::format("node '{}' came back from generation {}, as new as this round's",
                            node.node_id, node.last_generation),
                {}, now, events);
    return JoinOutcome{.waiting = false};
  }
  if (state_ == RoundState::kFormed) {
    entry.role = Role::kHeld;
    nodes_.emplace(node.node_id, std::move(entry));
    held_.push_back(node.node_id);
    if (options_.takeover && node.last_generation >= options_.takeover->generation &&
        admissible() > 0) {
      // A member of the round this coordinator took over, back after the taken-over round
      // formed without it (slower than the last call): its workers are alive and re-forming in
      // place. Held for the next round at a commit point, they would give up first: re-form now.
      startReform(fmt::format("node '{}' came back from generation {} after the round had formed "
                              "without it",
                              node.node_id, node.last_generation),
                  {}, now, events);
      return JoinOutcome{.waiting = false};
    }
    events->push_back(NodesWaitingEvent{admissible()});
    return JoinOutcome{.waiting = true};
  }
  nodes_.emplace(node.node_id, std::move(entry));
  ++gathering_count_;
  if (!gathering_since_) gathering_since_ = now;
  maybeForm(now, /*at_once_if_min=*/false, events);
  return JoinOutcome{.waiting = false};
}

void Rendezvous::leave(const std::string& node_id, const std::string& cause, bool failed,
                       TimePoint now, Events* events) {
  leave(std::vector<Departure>{{node_id, cause, failed}}, now, events);
}

void Rendezvous::leave(const std::vector<Departure>& departures, TimePoint now, Events* events) {
  std::vector<std::string> causes;
  std::vector<std::string> failed_members;
  bool held_changed = false;
  for (const Departure& d : departures) {
    const auto it = nodes_.find(d.node_id);
    if (it == nodes_.end()) continue;
    const Role role = it->second.role;
    nodes_.erase(it);
    switch (role) {
      case Role::kHeld:
        held_.erase(std::find(held_.begin(), held_.end(), d.node_id));
        held_changed = true;
        break;
      case Role::kGathering:
        --gathering_count_;
        if (takeover_expected_ && previous_ranks_.count(d.node_id) != 0) --takeover_back_;
        if (resume_) resume_->back.erase(d.node_id);
        if (gathering_count_ == 0 && state_ == RoundState::kWaiting) gathering_since_.reset();
        if (gathering_count_ < options_.min_nodes) min_reached_at_.reset();
        break;
      case Role::kMember:
        if (state_ == RoundState::kFormed) {
          if (causes.size() < 3) causes.push_back(fmt::format("node '{}' {}", d.node_id, d.cause));
          if (d.failed) failed_members.push_back(d.node_id);
        }
        break;
    }
  }
  if (!causes.empty() || !failed_members.empty()) {
    std::string cause = causes.empty() ? std::string("members left") : causes[0];
    for (size_t i = 1; i < causes.size(); ++i) cause += "; " + causes[i];
    const size_t total = std::max(causes.size(), failed_members.size());
    if (total > causes.size()) cause += fmt::format(" (and {} more)", total - causes.size());
    startReform(cause, std::move(failed_members), now, events);
  } else if (held_changed) {
    events->push_back(NodesWaitingEvent{admissible()});
  }
}

Status Rendezvous::requestReform(const std::string& node_id, const std::string& reason,
                                 TimePoint now, Events* events) {
  const auto it = nodes_.find(node_id);
  if (it == nodes_.end() || it->second.role != Role::kMember || state_ != RoundState::kFormed) {
    return failedPrecondition(fmt::format(
        "node '{}' cannot ask for a new round: only a member of a formed round can (state is {})",
        node_id, roundStateName(state_)));
  }
  startReform(fmt::format("node '{}' asked for a new round: {}", node_id, reason), {}, now, events);
  return okStatus();
}

Status Rendezvous::close(const std::string& node_id, const std::string& reason, Events* events) {
  if (state_ == RoundState::kClosed) return okStatus();
  if (nodes_.count(node_id) == 0 || previous_ranks_.count(node_id) == 0) {
    return failedPrecondition(fmt::format(
        "node '{}' cannot close the rendezvous: only a member of the last round can", node_id));
  }
  state_ = RoundState::kClosed;
  const std::string why = fmt::format("job finished: {}", reason);
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    if (it->second.role != Role::kMember) {
      events->push_back(DismissEvent{it->first, why, false});
      it = nodes_.erase(it);
    } else {
      ++it;
    }
  }
  held_.clear();
  gathering_count_ = 0;
  events->push_back(GenerationEvent{
      generation_, RoundState::kClosed, static_cast<std::uint32_t>(members_.size()), why, {}});
  return okStatus();
}

void Rendezvous::tick(TimePoint now, Events* events) {
  if (!gathering()) return;
  if (gathering_count_ >= options_.min_nodes && options_.min_nodes != 0) {
    maybeForm(now, /*at_once_if_min=*/false, events);
  } else if (gathering_since_ && now >= *gathering_since_ + options_.join_timeout) {
    failGathering(now, events);
  }
}

std::optional<TimePoint> Rendezvous::nextDeadline() const {
  if (!gathering()) return std::nullopt;
  if (min_reached_at_) {
    return *min_reached_at_ + options_.last_call + (resume_ ? kResumeGrace : Milliseconds(0));
  }
  if (gathering_since_) return *gathering_since_ + options_.join_timeout;
  return std::nullopt;
}

RoundSnapshot Rendezvous::snapshot() const {
  return RoundSnapshot{generation_,
                       state_,
                       members_,
                       gathering_count_,
                       static_cast<std::uint32_t>(held_.size()),
                       options_.min_nodes,
                       options_.max_nodes,
                       options_.job_id};
}

void Rendezvous::startReform(const std::string& cause, std::vector<std::string> failed_nodes,
                             TimePoint now, Events* events) {
  ++generation_;
  state_ = RoundState::kReforming;
  reform_cause_ = cause;
  reform_failed_ = failed_nodes;
  gathering_count_ = 0;
  for (const Member& m : members_) {
    if (auto it = nodes_.find(m.node_id); it != nodes_.end()) {
      it->second.role = Role::kGathering;
      ++gathering_count_;
    }
  }
  for (const std::string& id : held_) {
    nodes_.at(id).role = Role::kGathering;
    ++gathering_count_;
  }
  held_.clear();
  gathering_since_ = now;
  min_reached_at_.reset();
  events->push_back(GenerationEvent{generation_, RoundState::kReforming, gathering_count_, cause,
                                    std::move(failed_nodes)});
  // Everyone who can come is already here (survivors and held nodes): no last call.
  maybeForm(now, /*at_once_if_min=*/true, events);
}

void Rendezvous::maybeForm(TimePoint now, bool at_once_if_min, Events* events) {
  if (!gathering() || options_.min_nodes == 0) return;
  if (resume_ && resume_->expected > 0 && resume_->back.size() >= resume_->expected) {
    formResumed(events);
    return;
  }
  // Members of the round being taken over or resumed that are not back yet: their workers are
  // alive and re-forming in place. Newcomers (spares, a restarted host) that make up MAX before
  // them do not form the round without them; the last call still bounds the wait, and form()
  // takes old members first.
  const bool old_members_coming =
      (takeover_expected_ && takeover_back_ < *takeover_expected_) ||
      (resume_ && resume_->expected > 0 && resume_->back.size() < resume_->expected);
  if (gathering_count_ >= options_.max_nodes && !old_members_coming) {
    form(events);
    return;
  }
  if (gathering_count_ < options_.min_nodes) {
    min_reached_at_.reset();
    return;
  }
  if (at_once_if_min || (takeover_expected_ && takeover_back_ >= *takeover_expected_)) {
    form(events);
    return;
  }
  if (!min_reached_at_) min_reached_at_ = now;
  const Milliseconds wait = options_.last_call + (resume_ ? kResumeGrace : Milliseconds(0));
  if (now >= *min_reached_at_ + wait) form(events);
}

void Rendezvous::formResumed(Events* events) {
  // The members of the resumed round, by their ranks there (a permutation: they are all back);
  // anyone else who joined meanwhile waits for the next round.
  std::vector<NodeInfo> chosen;
  for (const std::string& id : resume_->back) chosen.push_back(nodes_.at(id).info);
  std::sort(chosen.begin(), chosen.end(), [&](const NodeInfo& a, const NodeInfo& b) {
    return previous_ranks_.at(a.node_id) < previous_ranks_.at(b.node_id);
  });
  std::vector<std::pair<std::uint64_t, std::string>> others;
  for (const auto& [id, node] : nodes_) {
    if (node.role == Role::kGathering && resume_->back.count(id) == 0) {
      others.emplace_back(node.arrival, id);
    }
  }
  std::sort(others.begin(), others.end());
  for (const auto& [arrival, id] : others) {
    nodes_.at(id).role = Role::kHeld;
    held_.push_back(id);
  }
  members_ = assignRanks(chosen, previous_ranks_);
  previous_ranks_.clear();
  for (const Member& m : members_) {
    nodes_.at(m.node_id).role = Role::kMember;
    previous_ranks_[m.node_id] = m.node_rank;
  }
  state_ = RoundState::kFormed;
  gathering_count_ = 0;
  min_reached_at_.reset();
  gathering_since_.reset();
  const auto num = static_cast<std::uint32_t>(members_.size());
  const std::string cause =
      fmt::format("the job's coordinator restarted; all {} node(s) of generation {} are back", num,
                  generation_);
  resume_.reset();
  events->push_back(RoundFormedEvent{generation_, members_, cause, {}});
  events->push_back(GenerationEvent{generation_,
                                    RoundState::kFormed,
                                    num,
                                    fmt::format("round resumed with {} node(s) ({})", num, cause),
                                    {}});
  if (!held_.empty()) {
    events->push_back(NodesWaitingEvent{admissible()});
  }
}

std::vector<std::string> Rendezvous::gatheringOrder() const {
  // Survivors of the last round first, by their old rank; then newcomers by arrival.
  struct Key {
    std::uint64_t old_rank;
    std::uint64_t arrival;
    const std::string* id;
  };
  std::vector<Key> keys;
  keys.reserve(gathering_count_);
  for (const auto& [id, node] : nodes_) {
    if (node.role != Role::kGathering) continue;
    const auto prev = previous_ranks_.find(id);
    keys.push_back(
        {prev != previous_ranks_.end() ? prev->second : std::numeric_limits<std::uint64_t>::max(),
         node.arrival, &id});
  }
  std::sort(keys.begin(), keys.end(), [](const Key& a, const Key& b) {
    return a.old_rank != b.old_rank ? a.old_rank < b.old_rank : a.arrival < b.arrival;
  });
  std::vector<std::string> order;
  order.reserve(keys.size());
  for (const Key& k : keys) order.push_back(*k.id);
  return order;
}

void Rendezvous::form(Events* events) {
  const std::vector<std::string> order = gatheringOrder();
  const size_t n = std::min<size_t>(order.size(), options_.max_nodes);
  std::vector<NodeInfo> chosen;
  chosen.reserve(n);
  for (size_t i = 0; i < n; ++i) chosen.push_back(nodes_.at(order[i]).info);
  // Nodes beyond MAX wait for the next round, ahead of anyone who arrives later.
  for (size_t i = order.size(); i-- > n;) {
    nodes_.at(order[i]).role = Role::kHeld;
    held_.push_front(order[i]);
  }
  members_ = assignRanks(chosen, previous_ranks_);
  previous_ranks_.clear();
  for (const Member& m : members_) {
    nodes_.at(m.node_id).role = Role::kMember;
    previous_ranks_[m.node_id] = m.node_rank;
  }
  const bool first = state_ == RoundState::kWaiting;
  if (first) ++generation_;  // the first round here; later ones moved at the re-form
  takeover_expected_.reset();
  std::string resumed;  // a restarted coordinator's round without some of the old members
  if (resume_) {
    resumed = fmt::format(
        "the job's coordinator restarted; {} of the {} node(s) of generation {} came back",
        resume_->back.size(), resume_->expected, resume_->generation);
    resume_.reset();
  }
  state_ = RoundState::kFormed;
  gathering_count_ = 0;
  min_reached_at_.reset();
  gathering_since_.reset();
  const auto num = static_cast<std::uint32_t>(members_.size());
  const std::string cause = !resumed.empty() ? resumed
                            : first          ? std::string("first round")
                                             : reform_cause_;
  const std::vector<std::string> failed = first ? std::vector<std::string>() : reform_failed_;
  events->push_back(RoundFormedEvent{generation_, members_, cause, failed});
  events->push_back(GenerationEvent{generation_, RoundState::kFormed, num,
                                    fmt::format("round formed with {} node(s) ({})", num, cause),
                                    failed});
  if (!held_.empty()) {
    events->push_back(NodesWaitingEvent{admissible()});
  }
}

void Rendezvous::failGathering(TimePoint now, Events* events) {
  const std::string reason = fmt::format(
      "rendezvous timed out: {} of the {} node(s) needed joined within the join timeout ({})",
      gathering_count_, options_.min_nodes, formatDuration(options_.join_timeout));
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    events->push_back(DismissEvent{it->first, reason, true});
    it = nodes_.erase(it);
  }
  held_.clear();
  gathering_count_ = 0;
  state_ = RoundState::kClosed;
  events->push_back(GenerationEvent{generation_, RoundState::kClosed, 0, reason, {}});
}

std::vector<Member> Rendezvous::assignRanks(
    const std::vector<NodeInfo>& ordered,
    const std::unordered_map<std::string, std::uint32_t>& previous_ranks) {
  const size_t n = ordered.size();
  std::vector<Member> slots(n);
  std::vector<bool> taken(n, false);
  std::vector<size_t> unplaced;
  for (size_t i = 0; i < n; ++i) {
    const auto prev = previous_ranks.find(ordered[i].node_id);
    if (prev != previous_ranks.end() && prev->second < n && !taken[prev->second]) {
      taken[prev->second] = true;
      slots[prev->second] =
          Member{ordered[i].node_id, prev->second, ordered[i].local_world_size, ordered[i].address};
    } else {
      unplaced.push_back(i);
    }
  }
  size_t next_free = 0;
  for (size_t i : unplaced) {
    while (taken[next_free]) ++next_free;
    taken[next_free] = true;
    slots[next_free] = Member{ordered[i].node_id, static_cast<std::uint32_t>(next_free),
                              ordered[i].local_world_size, ordered[i].address};
  }
  return slots;
}

}  // namespace rally::coordinator
