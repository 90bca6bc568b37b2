// The agent's joining of its job: finding the job's coordinator (at the first --rdzv-endpoint
// address, or where it moved, at a standby address), hosting it when this node is the first
// address's, and the session with it.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <thread>

#include "kernels/base/logging.h"
#include "launcher/agent/internal/agent_impl.h"

namespace rally::agent {
// True if `host` names this machine: loopback, its host name, or one of its interface addresses.
bool isLocalHost(const std::string& host) {
  if (host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1" || host == hostName()) {
    return true;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0) return false;
  std::vector<std::string> wanted;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char ip[INET6_ADDRSTRLEN] = {};
    const void* src =
        a->ai_family == AF_INET
            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr)
            : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr);
    inet_ntop(a->ai_family, src, ip, sizeof(ip));
    wanted.emplace_back(ip);
  }
  freeaddrinfo(res);
  ifaddrs* ifs = nullptr;
  if (getifaddrs(&ifs) != 0) return false;
  bool local = false;
  for (ifaddrs* i = ifs; i != nullptr && !local; i = i->ifa_next) {
    if (i->ifa_addr == nullptr) continue;
    const int family = i->ifa_addr->sa_family;
    if (family != AF_INET && family != AF_INET6) continue;
    char ip[INET6_ADDRSTRLEN] = {};
    const void* src =
        family == AF_INET
            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr)
            : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(i->ifa_addr)->sin6_addr);
    inet_ntop(family, src, ip, sizeof(ip));
    for (const auto& w : wanted) local = local || w == ip;
  }
  freeifaddrs(ifs);
  return local;
}

Status Agent::Impl::hostOrJoin(const coordinator::CoordinatorOptions& copt, const cli::HostPort& at,
                               bool forced) {
  const std::string bind = listenAddressFor(at.host);
  const auto deadline = Clock::now() + tunable("connect_timeout");
  std::minstd_rand jitter(static_cast<unsigned>(getpid()));
  bool said = false;
  for (;;) {
    auto server = coordinator::CoordinatorServer::start(
        copt, {.host = bind, .port = at.port, .max_message_bytes = maxMessageBytes()});
    if (server.ok()) {
      embedded_ = std::move(*server);
      log_->info("hosting the job's coordinator on {}", embedded_->address());
      return okStatus();
    }
    if (forced) return server.status();
    // Taken: another agent on this host serves it (or is starting to). Or two agents raced and
    // both lost: sockets bound together with SO_REUSEADDR make each other's listen() fail. Join
    // the one that answers; if none does, try again after a random pause (which breaks the tie).
    // One that refuses this node's token, or serves another job, holds the port too: joining it
    // reports that clearly. One of this job that has ended (a run before this one, still going
    // away) is waited out.
    const Probe probe = probeCoordinator(at.toString());
    if (probe.kind == Probe::kServes || probe.kind == Probe::kRefuses ||
        probe.kind == Probe::kOtherJob) {
      log_->info("another agent on this host serves {} ({}): joining it", at.toString(),
                 server.status().message());
      return okStatus();
    }
    const std::string there = probe.kind == Probe::kNone
                                  ? "no rally coordinator answers there"
                                  : fmt::format("the coordinator there {}", probe.detail);
    if (!said) {
      log_->info("cannot listen on {} ({}), and {}: trying again for up to {} (--connect-timeout)",
                 at.toString(), server.status().message(), there,
                 formatDuration(tunable("connect_timeout")));
      said = true;
    }
    if (Clock::now() > deadline) {
      return Status(
          StatusCode::kUnavailable,
          fmt::format("{}, and {}; tried for {} (--connect-timeout)", server.status().message(),
                      there, formatDuration(tunable("connect_timeout"))));
    }
    if (queue_.hasSignal()) return Status(StatusCode::kAborted, "a signal came");
    std::this_thread::sleep_for(Milliseconds(20 + jitter() % 200));
  }
}

Status Agent::Impl::connect() {
  coordinator::CoordinatorOptions copt;
  copt.rendezvous.job_id = o_.rdzv_id;
  copt.rendezvous.min_nodes = o_.min_nodes;
  copt.rendezvous.max_nodes = o_.max_nodes;
  copt.rendezvous.last_call = tunable("last_call");
  copt.rendezvous.join_timeout = tunable("join_timeout");
  if (auto it = o_.rdzv_conf.find("last_call_timeout"); it != o_.rdzv_conf.end()) {
    RALLY_ASSIGN_OR_RETURN(copt.rendezvous.last_call, parseDuration(it->second));
  }
  if (auto it = o_.rdzv_conf.find("join_timeout"); it != o_.rdzv_conf.end()) {
    RALLY_ASSIGN_OR_RETURN(copt.rendezvous.join_timeout, parseDuration(it->second));
  }
  copt.heartbeat_interval = tunable("heartbeat_interval");
  copt.default_wait_timeout = tunable("rpc_timeout");

  std::string token;
  if (const char* t = std::getenv("RALLY_TOKEN"); t != nullptr && *t != '\0') token = t;
  std::string endpoint = o_.rdzv_endpoint;
  if (o_.standalone) {
    if (token.empty()) token = randomHex(16);
    copt.token = token;
    RALLY_ASSIGN_OR_RETURN(
        embedded_,
        coordinator::CoordinatorServer::start(
            copt, {.host = "127.0.0.1", .port = 0, .max_message_bytes = maxMessageBytes()}));
    endpoint = fmt::format("127.0.0.1:{}", embedded_->port());
  } else {
    if (token.empty()) {
      token = cli::derivedJobToken(o_.rdzv_id);
      log_->warn(
          "no job token (RALLY_TOKEN): using one derived from --rdzv-id; anyone who knows "
          "the id and reaches {} can join the job",
          endpoint);
    }
    copt.token = token;
    const cli::HostPort& first = o_.rdzv_endpoints.front();
    rdzv_port_ = first.port;
    copt.host_node_id = node_id_;  // so that rounds name its successors
    coordinator_options_ = copt;
    // This node's standby entry: the one that is its --local-addr; else (one agent per host, as
    // on a cluster) one naming its host. A loopback address names every agent of a one-machine
    // job, so only an exact --local-addr match counts for it.
    for (size_t i = 1; i < o_.rdzv_endpoints.size() && !standby_; ++i) {
      if (o_.rdzv_endpoints[i].host == address_) standby_ = o_.rdzv_endpoints[i];
    }
    for (size_t i = 1; i < o_.rdzv_endpoints.size() && !standby_; ++i) {
      const cli::HostPort& e = o_.rdzv_endpoints[i];
      const bool loopback =
          e.host.rfind("127.", 0) == 0 || e.host == "::1" || e.host == "localhost";
      if (!loopback && isLocalHost(e.host)) standby_ = e;
    }
    RALLY_ASSIGN_OR_RETURN(client_options_,
                           rendezvous::ClientOptions::fromTunables(o_.tunables, endpoint, token));
    const bool listed = o_.rdzv_endpoints.size() > 1;
    // Where this host last saw the job's coordinator and its successors (an agent of this job
    // that ran here before: the host was lost and came back, or the agent was restarted).
    // Kept for this job only: the same id with another --rdzv-endpoint or token is another job.
    if (auto memory = CoordinatorMemory::open(*o_.tunables.string("state_dir"), o_.rdzv_id,
                                              CoordinatorMemory::jobKey(o_.rdzv_endpoint, token));
        memory.ok()) {
      memory_ = std::move(*memory);
      remembered_ = memory_->recall();
    } else {
      log_->warn("this host cannot remember where the job's coordinator moves: {}",
                 memory.status().message());
    }
    std::optional<std::string> found;
    if (listed || !remembered_.empty()) {
      // The coordinator may have moved since the job started (its first host was lost): a node
      // that joins now, or comes back, joins it there rather than starting another.
      if (auto at = locateCoordinator(Clock::now(), /*accept_refusal=*/false, remembered_);
          at.ok()) {
        found = *at;
      } else if (at.status().code() == StatusCode::kAborted) {
        return at.status();
      }
    }
    std::optional<bool> forced;
    if (auto it = o_.rdzv_conf.find("is_host"); it != o_.rdzv_conf.end()) {
      forced = it->second == "1" || it->second == "true" || it->second == "True";
    }
    if (!found && forced.value_or(isLocalHost(first.host))) {
      RALLY_RETURN_IF_ERROR(hostOrJoin(copt, first, forced.value_or(false)));
      // Not hosting: a coordinator answers at the first address (another agent's here, or one
      // refusing this node, which joining it reports). Join that one, list or not.
      if (!embedded_) found = first.toString();
    }
    if (found) {
      endpoint = *found;
      const bool listed_there =
          std::any_of(o_.rdzv_endpoints.begin(), o_.rdzv_endpoints.end(),
                      [&](const cli::HostPort& e) { return e.toString() == endpoint; });
      if (!listed_there) {
        log_->info(
            "the job's coordinator is at {}, where this host last saw it or its successors (not "
            "at {}, where it started)",
            endpoint, o_.rdzv_endpoint);
      } else if (endpoint != o_.rdzv_endpoint) {
        log_->info("the job's coordinator is at {} (not at {}, where it started)", endpoint,
                   o_.rdzv_endpoint);
      }
    } else if (listed && !embedded_) {
      RALLY_ASSIGN_OR_RETURN(endpoint, locateCoordinator(Clock::now() + tunable("connect_timeout"),
                                                         /*accept_refusal=*/true, remembered_));
    }
  }
  RALLY_ASSIGN_OR_RETURN(auto client,
                         rendezvous::ClientOptions::fromTunables(o_.tunables, endpoint, token));
  // Its own coordinator cannot go silent on it: no keepalive pings to itself.
  if (embedded_) client.keepalive = Milliseconds(0);
  RALLY_ASSIGN_OR_RETURN(conn_, rendezvous::CoordinatorConnection::open(client));
  store_ = std::make_unique<rendezvous::StoreClient>(
      rendezvous::StoreClient(conn_).scoped("rally/run/", 0));
  RALLY_RETURN_IF_ERROR(openSession(nullptr));
  coordinator_file_ = run_dir_ + "/coordinator";
  writeCoordinatorFile();
  events_->write("joining", {{"endpoint", endpoint},
                             {"nnodes", fmt::format("{}:{}", o_.min_nodes, o_.max_nodes)},
                             {"local_world_size", o_.local_world_size}});
  log_->info("joining job '{}' at {} ({} worker(s) here, {}:{} nodes)", o_.rdzv_id, endpoint,
             o_.local_world_size, o_.min_nodes, o_.max_nodes);
  return okStatus();
}

void Agent::Impl::rememberCoordinators(const v1::RoundFormed& r) {
  if (!memory_) return;
  std::vector<std::string> endpoints = {conn_->endpoint()};
  for (const v1::RoundMember& m : r.successors()) endpoints.push_back(successorEndpoint(m));
  if (Status s = memory_->remember(endpoints); !s.ok() && !memory_failed_said_) {
    memory_failed_said_ = true;
    log_->warn(
        "cannot remember where the job's coordinator is ({}): if this host is lost and "
        "comes back, it may not find the job",
        s.message());
  }
}

Status Agent::Impl::openSession(const v1::RoundFormed* last) {
  const std::uint64_t serial = ++session_serial_;
  rendezvous::AgentSessionOptions sopt;
  sopt.on_message = [this, serial](const v1::CoordinatorMessage& m) {
    queue_.push(CoordinatorPush{m, serial});
  };
  // The endpoint this session goes to: its end is evidence about that one only.
  const std::uint64_t target = conn_->targetSerial();
  sopt.on_end = [this, serial, target](const Status& s, bool lost) {
    // Store calls to a lost coordinator (the loop's, maybe blocked in one now) fail at once, so
    // that the loop gets to the takeover. conn_ itself is only replaced before the loop runs.
    if (lost && serial == session_serial_.load()) conn_->markLost(target);
    queue_.push(SessionEnded{s, serial});
  };
  sopt.replica = job_scope_;
  rendezvous::JoinInfo join{.node_id = node_id_,
                            .job_id = o_.rdzv_id,
                            .min_nodes = o_.min_nodes,
                            .max_nodes = o_.max_nodes,
                            .local_world_size = static_cast<std::uint32_t>(o_.local_world_size),
                            .address = address_,
                            .standby_endpoint = standby_ ? standby_->toString() : ""};
  if (last != nullptr) {
    join.last_generation = last->generation();
    join.last_node_rank = last->node_rank();
    join.last_num_nodes = last->num_nodes();
  }
  session_.reset();  // a superseded one: already ended, or cancelled here
  RALLY_ASSIGN_OR_RETURN(session_, rendezvous::AgentSession::open(conn_, join, std::move(sopt)));
  return okStatus();
}

}  // namespace rally::agent
