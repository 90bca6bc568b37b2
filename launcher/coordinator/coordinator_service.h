// The coordinator's gRPC service (rally.v1.Coordinator, proto/rally/v1/coordinator.proto): the
// rendezvous state machine, liveness by stream and heartbeat, the generation pushed to watchers,
// and the key-value store, behind one lock. Built on gRPC's callback API, so 10,000 agent streams
// cost no threads; one timer thread fires last calls, join timeouts, missed heartbeats and wait
// timeouts.
//
//   CoordinatorService service(options);
//   grpc::ServerBuilder builder;  builder.RegisterService(&service);  ...
//   service.start();
//   ...
//   service.shutdown("SIGTERM");  // tells every client, then stop the server
//
// Every call must carry the job token (metadata "x-rally-token"); otherwise UNAUTHENTICATED and
// nothing changes.
//
// Thread-safety: all public methods are thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <queue>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "kernels/base/logging.h"
#include "launcher/coordinator/kv_store.h"
#include "launcher/coordinator/liveness.h"
#include "launcher/coordinator/rendezvous.h"
#include "rally/v1/coordinator.grpc.pb.h"

namespace rally::coordinator {

struct CoordinatorOptions {
  std::string token;  // the job token every call must carry; must not be empty
  RendezvousOptions rendezvous;
  Milliseconds heartbeat_interval{1000};
  Milliseconds default_wait_timeout{30'000};  // Wait with timeout_ms = 0
  KvLimits kv;
  // The node whose agent runs this coordinator (empty: a standalone `rally coordinator`). When set,
  // each RoundFormed names the members that take the coordinator over if that node is lost.
  std::string host_node_id;
  // The job scope's copies (docs/design/coordinator.md, "The job scope survives"). A coordinator
  // that takes over starts with its own agent's copy (`job_scope_seed`). Any other may be
  // resuming a job: it holds job-scope calls until a rejoining holder's copy is in, or a round
  // forms that no node rejoined (a new job), for at most `job_scope_grace` from its start (from
  // the first rejoin, if one comes); 0: never held.
  std::vector<rally::v1::JobScope> job_scope_seed;
  Milliseconds job_scope_grace{2000};
  // The most a snapshot's message carries (keys and values; one entry larger than this goes alone).
  // CoordinatorServer sets it from its message limit (rendezvous::jobScopeChunkBytes).
  size_t job_scope_chunk_bytes = 1 << 20;
};

// How many successors each RoundFormed names: the coordinator survives the loss of its host
// together with up to kSuccessors - 1 of them.
inline constexpr size_t kSuccessors = 3;

struct CoordinatorStats {
  std::uint64_t generation = 0;
  RoundState state = RoundState::kWaiting;
  size_t sessions = 0;
  size_t watchers = 0;
  std::int64_t keys = 0;
  size_t waiters = 0;
  std::uint64_t job_scope_revision = 0;  // raised by every change of the job scope
  size_t holders = 0;                    // sessions holding a copy of the job scope
  size_t holders_lagging = 0;            // of them, those writes do not wait for
  size_t held_calls = 0;                 // job-scope calls waiting for the holders' copies
};

class CoordinatorService final : public rally::v1::Coordinator::CallbackService {
 public:
  explicit CoordinatorService(CoordinatorOptions options);
  ~CoordinatorService() override;
  CoordinatorService(const CoordinatorService&) = delete;
  CoordinatorService& operator=(const CoordinatorService&) = delete;

  // Starts the timer thread. Call once, after the server is built.
  void start();
  // Tells every session (Shutdown message) and watcher, fails pending waits with UNAVAILABLE, and
  // refuses later calls. Idempotent. The owner then shuts the gRPC server down. `handover`: the
  // job goes on without this coordinator's host; the Shutdown message tells agents to take over.
  void shutdown(const std::string& reason, bool handover = false);

  CoordinatorStats stats();

  grpc::ServerBidiReactor<rally::v1::AgentMessage, rally::v1::CoordinatorMessage>* Session(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerWriteReactor<rally::v1::GenerationEvent>* WatchGeneration(
      grpc::CallbackServerContext* ctx, const rally::v1::WatchGenerationRequest* request) override;
  grpc::ServerUnaryReactor* GetRound(grpc::CallbackServerContext* ctx,
                                     const rally::v1::GetRoundRequest* request,
                                     rally::v1::RoundInfo* response) override;
  grpc::ServerUnaryReactor* Set(grpc::CallbackServerContext* ctx,
                                const rally::v1::SetRequest* request,
                                rally::v1::SetResponse* response) override;
  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* ctx,
                                const rally::v1::GetRequest* request,
                                rally::v1::GetResponse* response) override;
  grpc::ServerUnaryReactor* Wait(grpc::CallbackServerContext* ctx,
                                 const rally::v1::WaitRequest* request,
                                 rally::v1::WaitResponse* response) override;
  grpc::ServerUnaryReactor* Add(grpc::CallbackServerContext* ctx,
                                const rally::v1::AddRequest* request,
                                rally::v1::AddResponse* response) override;
  grpc::ServerUnaryReactor* CompareAndSet(grpc::CallbackServerContext* ctx,
                                          const rally::v1::CompareAndSetRequest* request,
                                          rally::v1::CompareAndSetResponse* response) override;
  grpc::ServerUnaryReactor* Delete(grpc::CallbackServerContext* ctx,
                                   const rally::v1::DeleteRequest* request,
                                   rally::v1::DeleteResponse* response) override;
  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* ctx,
                                 const rally::v1::ListRequest* request,
                                 rally::v1::ListResponse* response) override;

 private:
  class SessionReactor;
  class WatchReactor;
  class WaitReactor;
  friend class SessionReactor;
  friend class WatchReactor;
  friend class WaitReactor;

  // Work to do after the lock is released: start writes, finish streams and RPCs.
  using Deferred = std::vector<std::function<void()>>;

  grpc::Status checkCall(grpc::CallbackServerContext* ctx) const;
  // checkCall, and UNAVAILABLE once shutting down.
  grpc::Status admit(grpc::CallbackServerContext* ctx);
  // Runs `fn` under the lock, then the deferred work it queued.
  void runLocked(const std::function<void()>& fn);
  // A store call (or GetRound): `fn` runs under the lock, now or, for a job-scope call
  // (`job_scope`) while the scope waits for the holders' copies, when they are in.
  grpc::ServerUnaryReactor* unaryCall(grpc::CallbackServerContext* ctx, bool job_scope,
                                      std::function<Status()> fn);
  void callLocked(grpc::ServerUnaryReactor* reactor,
                  std::chrono::system_clock::time_point caller_deadline,
                  const std::function<Status()>& fn);
  // UNAVAILABLE for a call that comes while shutting down: final, unless handing over (the call
  // may go to the successor).
  grpc::Status shuttingDownStatusLocked() const;
  // Runs the job-scope calls held until now.
  void openJobScopeLocked(const std::string& why);

  // Session events (from reactors).
  void onAgentMessage(const std::shared_ptr<SessionReactor>& session,
                      const rally::v1::AgentMessage& message);
  void onSessionEnded(const std::shared_ptr<SessionReactor>& session, const std::string& cause);
  void onWatchEnded(WatchReactor* watch);

  // Under the lock.
  void handleJoin(const std::shared_ptr<SessionReactor>& session, const rally::v1::Join& join);
  void dropSession(const std::shared_ptr<SessionReactor>& session, grpc::Status status);
  void deliver(Events events);
  // A round's member as the protocol has it (with its standby endpoint, if its Join gave one).
  void fillMember(const Member& m, rally::v1::RoundMember* out) const;
  // `formed_next`: a round formed later in the same batch, whose members skip this event.
  void broadcastGeneration(const GenerationEvent& event, const RoundFormedEvent* formed_next);

  // The job scope's replication to the holders (docs/design/coordinator.md, "The job scope
  // survives"), under the lock. After a store call: sends its job-scope changes to the holders and,
  // if some holder is to acknowledge them first, keeps `reactor` to finish with `status` then
  // (returns true). Otherwise the caller finishes it at once.
  bool replicateLocked(grpc::ServerUnaryReactor* reactor, const grpc::Status& status,
                       TimePoint ack_by);
  void sendToHoldersLocked(const rally::v1::JobScope& message);
  // Makes exactly the sessions of `holders` (node ids) holders: a snapshot to each new one, a
  // release to each former one.
  void setHoldersLocked(const std::vector<std::string>& holders);
  std::vector<rally::v1::JobScope> jobScopeSnapshotLocked() const;
  // A rejoining node's copy: each key whose revision is newer than what this coordinator has
  // (and that no call here has written) is taken.
  void adoptLocked(const std::string& node_id, const rally::v1::JobScope& copy);
  void acknowledgedLocked(SessionReactor* session, std::uint64_t revision);
  // A holder that is gone, or lagging: no write waits for it any more.
  void stopWaitingForLocked(SessionReactor* session);
  rally::v1::GenerationEvent currentGenerationLocked() const;
  void timerLoop();
  void deliveryLoop();

  const CoordinatorOptions options_;
  const std::shared_ptr<spdlog::logger> log_;
  std::mutex mu_;
  std::condition_variable timer_cv_;
  bool shutting_down_ = false;
  bool shutdown_handover_ = false;
  std::string shutdown_reason_;
  Rendezvous rendezvous_;
  LivenessTracker liveness_;
  KvStore kv_;
  Deferred deferred_;
  std::unordered_map<std::string, std::shared_ptr<SessionReactor>> sessions_by_node_;
  std::unordered_set<std::shared_ptr<SessionReactor>> sessions_;
  std::unordered_set<std::shared_ptr<WatchReactor>> watchers_;
  std::unordered_set<std::string> current_members_;  // of the formed round, for delivery
  // Join.standby_endpoint by node id, for the rounds' successors (kept: a few bytes a node).
  std::unordered_map<std::string, std::string> standby_endpoints_;
  GenerationEvent last_generation_event_;
  // The job scope's replication.
  struct KeyRevision {
    std::uint64_t revision = 0;
    bool deleted = false;
    bool local = false;  // written by a call here (adopted copies never replace it)
  };
  std::unordered_map<std::string, KeyRevision> job_revisions_;  // deletions included
  std::uint64_t job_revision_ = 0;
  bool adopting_ = false;
  std::vector<rally::v1::JobScopeEntry> job_changes_;  // by the store call running now
  struct PendingAck {
    std::uint64_t revision;
    grpc::ServerUnaryReactor* reactor;
    grpc::Status status;
    std::unordered_set<SessionReactor*> waiting;
    TimePoint deadline;
  };
  std::deque<PendingAck> pending_acks_;  // in deadline order
  // Job-scope calls held for the holders' copies (a coordinator that may be resuming).
  bool job_scope_open_ = true;
  bool rejoin_seen_ = false;
  TimePoint job_scope_gate_deadline_{};
  std::vector<std::function<void()>> gated_calls_;
  // Resuming: the holders the copies name, and those whose whole copy is in. The gate opens once
  // every named one's is (or at its deadline), so that a lagging holder's copy, in first, does
  // not decide alone.
  std::set<std::string> copies_expected_;
  std::set<std::string> copies_in_;
  std::vector<std::string> holders_named_;               // the list last sent to the holders
  std::vector<std::string> missingCopiesLocked() const;  // named, whose copy is not in
  struct WaitDeadline {
    TimePoint when;
    KvStore::WaiterId id;
    Milliseconds timeout;
    std::string what;  // "keys [a, b] in generation 3"
    bool operator>(const WaitDeadline& o) const { return when > o.when; }
  };
  std::priority_queue<WaitDeadline, std::vector<WaitDeadline>, std::greater<>> wait_deadlines_;
  std::thread timer_;
  // Deferred work produced by the timer (writes after a re-form) runs here, so that the liveness
  // checks keep their cadence while thousands of streams are written to.
  std::mutex delivery_mu_;
  std::condition_variable delivery_cv_;
  std::deque<Deferred> delivery_queue_;
  bool delivery_stop_ = false;
  std::thread delivery_;
};

}  // namespace rally::coordinator
