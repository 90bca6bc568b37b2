// An agent's session with the coordinator: one stream for the node's life. It joins, heartbeats,
// and receives the coordinator's pushes (Welcome, RoundFormed, generation changes, nodes waiting,
// Shutdown) in order. A broken stream is how the coordinator learns at once that a node died.
//
//   RALLY_ASSIGN_OR_RETURN(auto session, AgentSession::open(conn, {.node_id = "n0", .job_id = "j",
//       .min_nodes = 2, .max_nodes = 4, .local_world_size = 8, .address = "10.0.0.5"}));
//   RALLY_ASSIGN_OR_RETURN(auto msg, session->waitFor(
//       [](const auto& m) { return m.has_round_formed(); }, 60s));
//   int node_rank = msg.round_formed().node_rank();
//
// Heartbeats are sent by a thread of the session at the interval the coordinator asks for, unless
// AgentSessionOptions::auto_heartbeat is false (then the owner calls heartbeat(), as the benchmark
// does for thousands of simulated agents).
//
// Thread-safety: all methods are thread-safe. on_message runs on a gRPC thread and must not block.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "runtime/rendezvous/coordinator_client.h"
#include "runtime/rendezvous/internal/inbox.h"
#include "runtime/rendezvous/job_scope_replica.h"

namespace rally::rendezvous {

struct JoinInfo {
  std::string node_id;
  std::string job_id;
  std::uint32_t min_nodes = 0;  // 0 with max 0: the coordinator's --nnodes
  std::uint32_t max_nodes = 0;
  std::uint32_t local_world_size = 1;
  std::string address;
  // After the job's coordinator was lost: the round this node was in (a successor goes on from it;
  // a restarted coordinator resumes it).
  std::uint64_t last_generation = 0;
  std::uint32_t last_node_rank = 0;
  std::uint32_t last_num_nodes = 0;
  // HOST:PORT where this node serves the coordinator if it takes it over (a standby address of
  // --rdzv-endpoint that names it); empty: none.
  std::string standby_endpoint;
};

struct AgentSessionOptions {
  bool auto_heartbeat = true;
  // If set, messages go here instead of the inbox that next()/waitFor() read.
  std::function<void(const rally::v1::CoordinatorMessage&)> on_message;
  // Called once when the stream ends, with its status and whether the coordinator is presumed
  // lost (lostCoordinator()).
  std::function<void(const Status&, bool lost_coordinator)> on_end;
  // The node's copy of the job scope, kept across sessions (the agent's); with one, the Join says
  // the node keeps a copy and the coordinator may name it a holder. The session applies the
  // coordinator's JobScope messages to it (they do not reach on_message or the inbox) and
  // acknowledges each. A Join with last_generation set sends the copy after it, if the node held
  // one; a Join without drops it, as does a RoundFormed on a session that sent no snapshot (the
  // node is no holder there).
  std::shared_ptr<JobScopeReplica> replica;
};

class AgentSession {
 public:
  static Result<std::unique_ptr<AgentSession>> open(std::shared_ptr<CoordinatorConnection> conn,
                                                    JoinInfo join,
                                                    AgentSessionOptions options = {});
  // Cancels the stream if it is still open and waits for it to end.
  ~AgentSession();
  AgentSession(const AgentSession&) = delete;
  AgentSession& operator=(const AgentSession&) = delete;

  Result<rally::v1::CoordinatorMessage> next(Milliseconds timeout);
  Result<rally::v1::CoordinatorMessage> waitFor(
      const std::function<bool(const rally::v1::CoordinatorMessage&)>& pred, Milliseconds timeout);

  void heartbeat();
  // Leaves the job gracefully and half-closes the stream.
  void leave(const std::string& reason);
  void requestReform(const std::string& reason);
  void close(const std::string& reason);
  // Ends the stream abruptly, as a crash would.
  void cancel();

  bool ended() const { return inbox_.ended(); }
  // True once the stream broke without the coordinator ending it (killed, its host down, the
  // network cut), or ended after a Shutdown that hands the coordinator over: the coordinator is
  // lost. False while open, or when the coordinator ended it otherwise (shutdown, dismissal,
  // refusal, a node declared failed).
  bool lostCoordinator() const { return lost_coordinator_.load(); }
  // The stream's final status once it has ended (waits at most `timeout`).
  std::optional<Status> endStatus(Milliseconds timeout = Milliseconds(0)) const;
  const JoinInfo& joinInfo() const { return join_; }

 private:
  class Reactor;
  AgentSession(std::shared_ptr<CoordinatorConnection> conn, JoinInfo join,
               AgentSessionOptions options);
  void send(rally::v1::AgentMessage message);
  void heartbeatLoop();
  void setInterval(std::uint64_t ms);

  std::shared_ptr<CoordinatorConnection> conn_;
  JoinInfo join_;
  AgentSessionOptions options_;
  internal::Inbox<rally::v1::CoordinatorMessage> inbox_;
  internal::DoneLatch done_;
  std::atomic<bool> lost_coordinator_{false};
  std::unique_ptr<Reactor> reactor_;
  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  bool stopping_ = false;
  Milliseconds heartbeat_interval_{1000};
  std::thread heartbeat_thread_;
};

}  // namespace rally::rendezvous
