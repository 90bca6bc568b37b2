// The agent's part in keeping a job whose coordinator is lost (docs/design/coordinator.md,
// "Takeover" and "Resume"): trying the round's successors (and starting the coordinator when this
// node is the one), waiting for a restarted standalone coordinator, telling the workers where it
// is, and picking up a resumed round.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <future>
#include <random>
#include <thread>

#include "kernels/base/logging.h"
#include "kernels/base/telemetry_files.h"
#include "launcher/agent/internal/agent_impl.h"

namespace rally::agent {
namespace {

std::string joinHostPort(const std::string& host, int port) {
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port)
                                             : fmt::format("{}:{}", host, port);
}

// Whether a takeover coordinator for the loss of generation `lost`, now at `generation` in
// `formed_now` or not, has formed a round since it started: it is formed, or past the first
// generation it gathers (it formed that one and re-forms now).
bool formedSinceTakeover(std::uint64_t lost, std::uint64_t generation, bool formed_now) {
  return (formed_now && generation > lost) || generation > lost + 1;
}

}  // namespace

std::string listenAddressFor(const std::string& host) {
  if (host.rfind("127.", 0) == 0) return host;  // exactly it: tests and one-machine demos
  if (host == "::1") return host;
  if (host == "localhost") return "127.0.0.1";
  if (host.find(':') != std::string::npos) return "::";  // an IPv6 address: every v6 interface
  return "0.0.0.0";
}

void Agent::Impl::writeCoordinatorFile() {
  if (coordinator_file_.empty() || !conn_) return;
  if (Status s = writeFileReplacing(coordinator_file_, conn_->endpoint() + "\n"); !s.ok()) {
    log_->warn("the workers cannot learn where the coordinator is: {}", s.message());
  }
}

Agent::Impl::Probe Agent::Impl::probeCoordinator(const std::string& endpoint,
                                                 Milliseconds timeout) {
  rendezvous::ClientOptions o = conn_ ? conn_->options() : client_options_;
  o.endpoint = endpoint;
  return probeOf(rendezvous::probeRound(std::move(o), timeout), o_.rdzv_id);
}

Agent::Impl::Probe Agent::Impl::probeOf(const Result<v1::RoundInfo>& round,
                                        const std::string& job_id) {
  if (!round.ok()) {
    return {round.status().code() == StatusCode::kUnauthenticated ? Probe::kRefuses : Probe::kNone,
            0, round.status().message()};
  }
  const v1::RoundInfo& info = *round;
  if (!info.job_id().empty() && info.job_id() != job_id) {
    return {Probe::kOtherJob, info.generation(), fmt::format("serves job '{}'", info.job_id())};
  }
  if (info.state() == v1::GenerationEvent::CLOSED) {
    return {Probe::kClosed, info.generation(), "its job has ended"};
  }
  return {Probe::kServes, info.generation(), "", info.state() == v1::GenerationEvent::FORMED};
}

std::string Agent::Impl::successorEndpoint(const v1::RoundMember& m) const {
  return !m.standby_endpoint().empty() ? m.standby_endpoint()
                                       : joinHostPort(m.address(), rdzv_port_);
}

std::vector<Agent::Impl::Probe> Agent::Impl::probeAll(const std::vector<std::string>& endpoints,
                                                      Milliseconds timeout) {
  // Each on its own thread: a host that is gone costs the timeout once, not once per address.
  std::vector<std::future<Probe>> probes;
  for (const std::string& e : endpoints) {
    probes.push_back(std::async(std::launch::async,
                                [this, e, timeout] { return probeCoordinator(e, timeout); }));
  }
  std::vector<Probe> out;
  for (auto& p : probes) out.push_back(p.get());
  return out;
}

std::optional<size_t> Agent::Impl::successorServing(const Takeover& t) {
  std::vector<std::string> endpoints;
  std::vector<size_t> index;
  for (size_t i = 0; i < t.successors.size(); ++i) {
    if (t.successors[i].node_id() == node_id_) continue;
    endpoints.push_back(successorEndpoint(t.successors[i]));
    index.push_back(i);
  }
  const std::vector<Probe> probes = probeAll(endpoints, Milliseconds(500));
  std::optional<size_t> serving;
  std::uint64_t newest = 0;
  for (size_t k = 0; k < probes.size(); ++k) {
    const Probe& p = probes[k];
    // An older generation is a coordinator cut off before this loss, not the job's.
    if (p.kind != Probe::kServes || p.generation < generation_) continue;
    if (!serving || p.generation > newest) serving = index[k], newest = p.generation;
  }
  return serving;
}

bool Agent::Impl::coordinatorAnswers() {
  const Probe p = probeCoordinator(conn_->endpoint());
  return p.kind == Probe::kServes || p.kind == Probe::kClosed;
}

Result<std::string> Agent::Impl::locateCoordinator(Clock::time_point deadline, bool accept_refusal,
                                                   const std::vector<std::string>& remembered) {
  std::vector<std::string> endpoints;
  for (const cli::HostPort& e : o_.rdzv_endpoints) endpoints.push_back(e.toString());
  const size_t listed = endpoints.size();
  for (const std::string& e : remembered) {
    if (std::find(endpoints.begin(), endpoints.end(), e) == endpoints.end()) endpoints.push_back(e);
  }
  std::vector<std::string> answers;
  std::minstd_rand jitter(static_cast<unsigned>(getpid()));
  Milliseconds pause(250);
  for (;;) {
    std::optional<std::pair<std::string, std::uint64_t>> best;
    std::optional<std::string> refused;  // answers, but not to this node's token
    answers.clear();
    const std::vector<Probe> probes = probeAll(endpoints, Milliseconds(1000));
    for (size_t i = 0; i < endpoints.size(); ++i) {
      const std::string& endpoint = endpoints[i];
      const Probe& p = probes[i];
      if (p.kind == Probe::kServes && (i < listed || p.generation > 0)) {
        // Two answer only if an old coordinator was cut off rather than lost: the newer round
        // is the job's (ties: the first in list order).
        if (!best || p.generation > best->second) best.emplace(endpoint, p.generation);
        continue;
      }
      if (i >= listed) continue;  // a remembered address: no news unless it serves the job
      if (p.kind == Probe::kRefuses && !refused) refused = endpoint;
      answers.push_back(fmt::format("{} ({})", endpoint, p.detail));
    }
    if (best) return best->first;
    if (refused && accept_refusal) return *refused;  // joining it tells the node about its token
    if (queue_.hasSignal()) return Status(StatusCode::kAborted, "a signal came");
    if (Clock::now() + pause > deadline) break;
    // Backing off (250 ms to 2 s, with jitter), so that many agents starting together do not
    // storm the listed hosts while the coordinator starts.
    std::this_thread::sleep_for(pause * (75 + static_cast<int>(jitter() % 50)) / 100);
    pause = std::min<Milliseconds>(Milliseconds(2000), pause * 3 / 2);
  }
  return Status(
      StatusCode::kUnavailable,
      fmt::format("no coordinator of job '{}' answers at any address of --rdzv-endpoint within "
                  "{} (--connect-timeout): {}. Are the hosts up, the ports right, and RALLY_TOKEN "
                  "the job's?",
                  o_.rdzv_id, formatDuration(tunable("connect_timeout")),
                  fmt::join(answers, "; ")));
}

bool Agent::Impl::relocate(const std::string& why) {
  const std::string lost = conn_->endpoint();
  log_->warn(
      "lost the coordinator at {} ({}) before this node was in a round: looking for it at {} for "
      "up to {} (--connect-timeout)",
      lost, why, o_.rdzv_endpoints.size() > 1 ? "the addresses of --rdzv-endpoint" : "its address",
      formatDuration(tunable("connect_timeout")));
  ++session_serial_;  // the lost session's last events are stale from here on
  relocate_deadline_ = Clock::now() + tunable("connect_timeout");
  auto found = locateCoordinator(*relocate_deadline_, /*accept_refusal=*/true);
  if (!found.ok()) {
    if (found.status().code() == StatusCode::kAborted) return true;  // the loop takes the signal
    log_->error("{}; this node stops{}", found.status().message(),
                o_.rdzv_endpoints.size() > 1
                    ? ""
                    : " (list standby addresses in --rdzv-endpoint to find a coordinator that "
                      "moved to another node)");
    return false;
  }
  if (Status s = conn_->retarget(*found, client_options_.keepalive); !s.ok()) {
    log_->error("cannot reach the coordinator at {}: {}", *found, s.message());
    return false;
  }
  if (Status s = openSession(nullptr); !s.ok()) {
    log_->error("cannot join the coordinator at {}: {}", *found, s.message());
    return false;
  }
  if (*found != lost) {
    log_->warn("the job's coordinator is now at {}: joining it again", *found);
    events_->write("coordinator_moved", {{"endpoint", *found}, {"from", lost}, {"here", false}});
    writeCoordinatorFile();
  } else {
    log_->warn("the job's coordinator still answers at {}: joining it again", *found);
  }
  return true;
}

bool Agent::Impl::beginTakeover(const std::string& why, bool handover) {
  // Not for a coordinator of this agent's own (a session to it that ends is not its loss), nor
  // before this node was in a round (no successors known).
  if (!round_ || embedded_ || tunable("failover_timeout").count() == 0) return false;
  bool standalone = round_->coordinator_node().empty();
  if (!standalone && round_->successors().empty()) return false;  // a one-node job's own
  Takeover t;
  t.lost_at = Clock::now();
  t.lost_endpoint = conn_->endpoint();
  t.why = why;
  ++session_serial_;  // the lost session's last events are stale from here on
  if (!standalone && !handover && coordinatorAnswers()) {
    // Only this node's stream broke: a second coordinator would split the job. Rejoin this one.
    log_->warn(
        "the session with the coordinator at {} broke ({}), but it still answers: rejoining it",
        t.lost_endpoint, why);
    standalone = true;
  }
  if (standalone) {
    // No node was lost: the workers go on, and the agent waits for the coordinator to be
    // restarted where it was (a Kubernetes Deployment, a systemd unit).
    t.same_endpoint = true;
    t.patience = tunable("connect_timeout");
    t.successors.emplace_back();
    if (round_->coordinator_node().empty()) {
      log_->warn(
          "lost the coordinator at {} ({}); it runs on its own (rally coordinator): waiting up to "
          "{} (--connect-timeout) for it to come back, while the workers go on",
          t.lost_endpoint, why, formatDuration(t.patience));
    }
  } else {
    t.patience = tunable("failover_timeout");
    t.successors.assign(round_->successors().begin(), round_->successors().end());
    std::vector<std::string> names;
    for (const auto& m : t.successors) names.push_back(fmt::format("'{}'", m.node_id()));
    log_->warn(
        "lost the coordinator at {} (node '{}': {}); the job goes on with the first of {} that "
        "answers as its coordinator",
        t.lost_endpoint, round_->coordinator_node(), why, fmt::join(names, ", "));
  }
  events_->write("coordinator_lost", {{"endpoint", t.lost_endpoint},
                                      {"node", round_->coordinator_node()},
                                      {"generation", generation_},
                                      {"cause", why}});
  takeover_ = std::move(t);
  // The generation ended with the coordinator's host. Under restarts, as for any lost node, the
  // workers stop now (their collectives with the lost node fail anyway; such a failure is not the
  // job's) and start again in the takeover's round. In place, they re-form by themselves.
  if (!standalone && !o_.inPlace()) {
    stopWorkers(SIGTERM, "the job's coordinator was lost; the job re-forms");
  }
  return true;
}

void Agent::Impl::raiseRestarts() {
  for (int attempt = 0; attempt < 8; ++attempt) {
    auto now = store_->get("restarts");
    if (!now.ok()) return;
    const std::int64_t have = now->has_value() ? std::strtoll((*now)->c_str(), nullptr, 10) : 0;
    if (have >= job_restarts_) return;
    auto swapped = store_->compareAndSet("restarts", *now, std::to_string(job_restarts_));
    if (!swapped.ok() || swapped->swapped) return;
  }
}

std::optional<int> Agent::Impl::tryNextSuccessor() {
  Takeover& t = *takeover_;
  if (t.started_here && embedded_) {
    // The coordinator this node started for the takeover did not take it (it cannot happen
    // unless this node's own session to it failed): it must not go on beside the next one.
    embedded_->shutdown("this node gave up its takeover");
    embedded_.reset();
    t.started_here = false;
  }
  while (t.next < t.successors.size()) {
    const v1::RoundMember* target = &t.successors[t.next++];
    // Absolute: the k-th successor is waited for until k patiences after the loss, so that one
    // that starts late because it waited for those before it is still found.
    t.deadline = t.lost_at + static_cast<int>(t.next) * t.patience;
    if (t.same_endpoint) {
      // A fresh channel to the same place (which also clears the lost mark); the session waits
      // for the coordinator to listen again.
      if (Status s = conn_->retarget(t.lost_endpoint); !s.ok()) break;
      conn_->markLost(conn_->targetSerial());  // store calls fail at once until welcomed
      if (Status s = openSession(&*round_); !s.ok()) {
        log_->error("cannot rejoin the coordinator at {}: {}", t.lost_endpoint, s.message());
        break;
      }
      return std::nullopt;
    }
    if (target->node_id() == node_id_) {
      if (const auto other = successorServing(t)) {
        // This node was away (stalled) past the others' patience, and one of them took over
        // meanwhile: a second coordinator would split the job in two, each training on its own.
        // Join that one instead; it re-forms with this node, an old member, at once.
        target = &t.successors[*other];
        t.passed_own_turn = true;
        t.next = std::max(t.next, *other + 1);
        t.deadline = t.lost_at + static_cast<int>(t.next) * t.patience;
        log_->warn(
            "the job's coordinator: node '{}' took it over at {} while this node was away; this "
            "node joins it rather than taking over too",
            target->node_id(), successorEndpoint(*target));
      }
    }
    const v1::RoundMember& c = *target;
    std::string endpoint = successorEndpoint(c);
    if (c.node_id() == node_id_) {
      coordinator::CoordinatorOptions copt = coordinator_options_;
      copt.host_node_id = node_id_;
      const std::string lost = round_->coordinator_node();
      copt.rendezvous.takeover = coordinator::Takeover{
          .generation = generation_,
          .expected_nodes = std::max<std::uint32_t>(1, round_->num_nodes() - 1),
          .cause = fmt::format("the coordinator's host, node '{}', was lost ({})", lost, t.why),
          .failed_nodes = {lost}};
      // This node's copy of the job scope: the coordinator has it before anyone's call.
      copt.job_scope_seed = job_scope_->chunks();
      const std::string bind = listenAddressFor(standby_ ? standby_->host : address_);
      const int port = standby_ ? standby_->port : rdzv_port_;
      auto server = coordinator::CoordinatorServer::start(
          copt, {.host = bind, .port = port, .max_message_bytes = maxMessageBytes()});
      if (!server.ok()) {
        log_->error("cannot take over the job's coordinator here: {}; the others try the next node",
                    server.status().message());
        continue;
      }
      embedded_ = std::move(*server);
      t.started_here = true;
      rival_watch_ = RivalWatch{t.successors, t.next - 1, *round_};
      if (bind != "0.0.0.0" && bind != "::") endpoint = joinHostPort(bind, port);
      log_->warn("took over the job's coordinator on {} (generation {} ends with node '{}')",
                 embedded_->address(), generation_, lost);
    }
    // No keepalive pings to a coordinator of this node's own.
    const Milliseconds keepalive =
        c.node_id() == node_id_ ? Milliseconds(0) : client_options_.keepalive;
    if (Status s = conn_->retarget(endpoint, keepalive); !s.ok()) {
      log_->error("successor '{}': {}", c.node_id(), s.message());
      continue;
    }
    conn_->markLost(conn_->targetSerial());  // store calls fail at once until welcomed
    if (Status s = openSession(&*round_); !s.ok()) {
      log_->error("successor '{}' at {}: {}", c.node_id(), endpoint, s.message());
      continue;
    }
    log_->info("trying the job's coordinator at {} (node '{}')", endpoint, c.node_id());
    return std::nullopt;
  }
  if (t.same_endpoint) {
    log_->error(
        "lost the coordinator at {} ({}), and it did not come back within {} (--connect-timeout): "
        "this node stops",
        t.lost_endpoint, t.why, formatDuration(t.patience));
  } else {
    std::vector<std::string> names;
    for (const auto& m : t.successors) names.push_back(fmt::format("'{}'", m.node_id()));
    if (t.passed_own_turn) {
      // It found another successor serving, joined it rather than split the job, and that one
      // was lost too (or did not take it): those after it did not answer.
      log_->error(
          "lost the coordinator at {} ({}); this node joined the successor that had taken it over "
          "rather than start a second one, and neither that one nor any after it of {} answered "
          "within {} each (--failover-timeout): this node stops",
          t.lost_endpoint, t.why, fmt::join(names, ", "), formatDuration(t.patience));
    } else {
      log_->error(
          "lost the coordinator at {} ({}), and none of the nodes that take it over ({}) answered "
          "within {} each (--failover-timeout): this node stops",
          t.lost_endpoint, t.why, fmt::join(names, ", "), formatDuration(t.patience));
    }
  }
  stopWorkers(SIGTERM, "lost the coordinator");
  return 1;
}

bool Agent::Impl::isOwnCoordinator(const std::string& endpoint) const {
  if (!embedded_) return false;
  if (endpoint == embedded_->address()) return true;
  const std::string bind = embedded_->address();
  const bool wildcard = bind.rfind("0.0.0.0:", 0) == 0 || bind.rfind("[::]:", 0) == 0;
  if (!wildcard) return false;
  auto hp = cli::parseHostPort(endpoint, rdzv_port_);
  return hp.ok() && hp->port == embedded_->port() && isLocalHost(hp->host);
}

std::optional<int> Agent::Impl::watchForRivals() {
  if (!rival_watch_) return std::nullopt;
  RivalWatch& w = *rival_watch_;
  // Its round formed (or the coordinator is gone): by the rule it keeps it, whatever another
  // successor's state. Asked of the coordinator itself, whose round may have formed before this
  // loop has read the news.
  const auto ownFormed = [&] {
    const coordinator::CoordinatorStats st = embedded_->service().stats();
    return formedSinceTakeover(w.lost.generation(), st.generation,
                               st.state == coordinator::RoundState::kFormed);
  };
  if (!embedded_ || generation_ > w.lost.generation() || ownFormed()) {
    rival_watch_.reset();
    return std::nullopt;
  }
  if (!w.answers.valid()) {
    if (Clock::now() < w.next_check) return std::nullopt;
    w.next_check = Clock::now() + Milliseconds(1000);
    std::vector<rendezvous::ClientOptions> asks;
    w.asked.clear();
    for (size_t i = 0; i < w.successors.size(); ++i) {
      if (i == w.index || w.successors[i].node_id() == node_id_) continue;
      rendezvous::ClientOptions o = conn_->options();
      o.endpoint = successorEndpoint(w.successors[i]);
      asks.push_back(std::move(o));
      w.asked.push_back(i);
    }
    if (asks.empty()) {
      rival_watch_.reset();
      return std::nullopt;
    }
    // Off the loop: a host that drops connections costs the probe's timeout.
    // Nothing of the agent's: it may be gone (exiting) before the answers are.
    w.answers = std::async(std::launch::async, [job = o_.rdzv_id, asks = std::move(asks)] {
      std::vector<std::future<Result<v1::RoundInfo>>> each;
      for (const auto& o : asks) {
        each.push_back(std::async(std::launch::async,
                                  [o] { return rendezvous::probeRound(o, Milliseconds(500)); }));
      }
      std::vector<Probe> out;
      for (auto& f : each) out.push_back(probeOf(f.get(), job));
      return out;
    });
    return std::nullopt;
  }
  if (w.answers.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return std::nullopt;
  const std::vector<Probe> answers = w.answers.get();
  std::optional<size_t> winner;
  bool formed = false;
  for (size_t k = 0; k < answers.size(); ++k) {
    const Probe& p = answers[k];
    const size_t i = w.asked[k];
    // Another successor's coordinator for this loss (or a later one).
    if (p.kind != Probe::kServes || p.generation < w.lost.generation()) continue;
    const bool its_formed = formedSinceTakeover(w.lost.generation(), p.generation, p.formed);
    if (!its_formed && i > w.index) continue;  // this one wins over it
    // The first that wins over this one: formed ones before gathering ones, then list order.
    if (!winner || (its_formed && !formed) || (its_formed == formed && i < *winner)) {
      winner = i;
      formed = its_formed;
    }
  }
  if (!winner) return std::nullopt;
  if (ownFormed()) {  // formed while the answers came: it keeps it
    rival_watch_.reset();
    return std::nullopt;
  }
  const v1::RoundMember other = w.successors[*winner];
  const std::string endpoint = successorEndpoint(other);
  const std::string here = embedded_->address();
  log_->warn(
      "node '{}' took the job's coordinator over too, at {} ({}): the coordinator this node "
      "started at {} steps aside, and this node joins that one",
      other.node_id(), endpoint,
      formed ? "its round has formed, this one's has not" : "it comes first among the successors",
      here);
  events_->write("coordinator_stepped_aside",
                 {{"endpoint", endpoint}, {"node", other.node_id()}, {"from", here}});
  // Back to the lost round: this node rejoins the winner as one of its old members, and a
  // takeover from there goes on down the list if the winner is lost too.
  round_ = w.lost;
  Takeover t;
  t.lost_at = Clock::now();
  t.lost_endpoint = here;
  t.why = "a second successor's coordinator stepped aside";
  t.patience = tunable("failover_timeout");
  t.successors = w.successors;
  t.next = *winner + 1;
  t.deadline = t.lost_at + t.patience;
  t.passed_own_turn = true;
  rival_watch_.reset();
  ++session_serial_;  // this session's end (the hand-over below) is not news
  // Its nodes look for the job's coordinator again among the lost round's successors.
  embedded_->handOver(
      fmt::format("the job's coordinator serves at {} (node '{}')", endpoint, other.node_id()));
  embedded_.reset();
  takeover_ = std::move(t);
  if (Status s = conn_->retarget(endpoint, client_options_.keepalive); !s.ok()) {
    log_->error("cannot reach the coordinator at {}: {}", endpoint, s.message());
    return tryNextSuccessor();
  }
  conn_->markLost(conn_->targetSerial());  // store calls fail at once until welcomed
  if (Status s = openSession(&*round_); !s.ok()) {
    log_->error("successor '{}' at {}: {}", other.node_id(), endpoint, s.message());
    return tryNextSuccessor();
  }
  return std::nullopt;
}

std::optional<int> Agent::Impl::deferToMovedCoordinator() {
  if (!embedded_ || round_ || takeover_ || o_.rdzv_endpoints.empty()) return std::nullopt;
  // The other listed addresses, and those this host remembers (CoordinatorMemory).
  const std::string first = o_.rdzv_endpoints.front().toString();
  std::vector<std::string> others;
  for (size_t i = 1; i < o_.rdzv_endpoints.size(); ++i) {
    others.push_back(o_.rdzv_endpoints[i].toString());
  }
  for (const std::string& e : remembered_) {
    // Not this agent's own coordinator: a memory left by an earlier run of the job can name an
    // address of this host where it serves now.
    if (e != first && !isOwnCoordinator(e) &&
        std::find(others.begin(), others.end(), e) == others.end()) {
      others.push_back(e);
    }
  }
  if (others.empty() || Clock::now() < next_defer_check_) return std::nullopt;
  next_defer_check_ = Clock::now() + Milliseconds(2000);
  const std::vector<Probe> probes = probeAll(others, Milliseconds(1000));
  for (size_t i = 0; i < others.size(); ++i) {
    const std::string endpoint = others[i];
    const Probe& p = probes[i];
    // A generation: a round of the job formed there (the one started here has none yet).
    if (p.kind != Probe::kServes || p.generation == 0) continue;
    const std::string here = embedded_->address();
    log_->warn(
        "the job's coordinator serves at {} (generation {}): it moved there while this node was "
        "away; this node joins it, and the coordinator it started at {} steps aside",
        endpoint, p.generation, here);
    ++session_serial_;  // this session's end (the hand-over below) is not news
    // Nodes gathering at the one started here look for the coordinator again, as at any
    // hand-over, and find it where this node did.
    embedded_->handOver(fmt::format("the job's coordinator serves at {}", endpoint));
    embedded_.reset();
    if (Status s = conn_->retarget(endpoint, client_options_.keepalive); !s.ok()) {
      log_->error("cannot reach the coordinator at {}: {}", endpoint, s.message());
      return 1;
    }
    if (Status s = openSession(nullptr); !s.ok()) {
      log_->error("cannot join the coordinator at {}: {}", endpoint, s.message());
      return 1;
    }
    events_->write("coordinator_moved", {{"endpoint", endpoint}, {"from", here}, {"here", false}});
    writeCoordinatorFile();
    return std::nullopt;
  }
  return std::nullopt;
}

std::optional<int> Agent::Impl::onRoundResumed(const v1::RoundFormed& r) {
  if (r.node_rank() != round_->node_rank() || r.num_nodes() != round_->num_nodes() ||
      r.world_size() != round_->world_size()) {
    // Never expected (a resumed round is the same membership): move past it rather than run
    // two memberships under one generation.
    log_->error("generation {} came back with another layout (node rank {} of {}); re-forming",
                r.generation(), r.node_rank(), r.num_nodes());
    session_->requestReform("a resumed round did not match its members' layout");
    return std::nullopt;
  }
  round_ = r;
  log_->info("generation {}: the restarted coordinator resumed the round ({})", generation_,
             r.cause());
  // Requests made while it was away were lost with it.
  reform_requested_for_ = 0;
  admit_pending_since_.reset();
  if (in_barrier_) countInBarrier();
  if (!unaccounted_.empty()) {
    // Workers failed while it was away: count them against --max-restarts now; within the
    // budget that asks for the round that replaces them.
    return accountOutageFailures(/*reform=*/true);
  }
  if (!missing_.empty() || (!group_ && !in_barrier_)) {
    // A worker failed while the coordinator was away and could not say so: re-form for it, once
    // for the job however many nodes saw failures.
    auto claim =
        store_->compareAndSet(fmt::format("resume_reform/{}", generation_), std::nullopt, node_id_);
    if (claim.ok() && claim->swapped) {
      session_->requestReform(
          fmt::format("worker(s) on node '{}' failed while the coordinator was away", node_id_));
    }
  }
  return std::nullopt;
}

}  // namespace rally::agent
