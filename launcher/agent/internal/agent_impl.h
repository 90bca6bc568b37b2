// The agent's internals, shared by its source files (agent.cc: the loop, workers, failures;
// agent_connect.cc: finding, hosting and joining the job's coordinator; agent_checks.cc: the
// periodic checks of its loop; agent_takeover.cc: a lost or restarted coordinator). Not part of
// any public API.
#pragma once

#include <signal.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "launcher/agent/agent.h"
#include "launcher/agent/coordinator_memory.h"
#include "launcher/agent/event_log.h"
#include "launcher/agent/failure_report.h"
#include "launcher/agent/progress_watchdog.h"
#include "launcher/agent/worker_group.h"
#include "launcher/coordinator/coordinator_server.h"
#include "runtime/faults/fault_plan.h"
#include "runtime/rendezvous/agent_session.h"
#include "runtime/rendezvous/coordinator_client.h"

namespace rally::agent {

namespace v1 = rally::v1;
using Clock = std::chrono::steady_clock;

// Tagged with the session they came from: after a takeover, a superseded session's end and its
// last messages are ignored.
struct SessionEnded {
  Status status;
  std::uint64_t session = 0;
};
struct CoordinatorPush {
  v1::CoordinatorMessage message;
  std::uint64_t session = 0;
};
struct WorkerExited {
  std::uint64_t epoch;
  WorkerExit exit;
};
struct SignalReceived {
  int sig;
};
using AgentEvent = std::variant<CoordinatorPush, SessionEnded, WorkerExited, SignalReceived>;

class EventQueue {
 public:
  void push(AgentEvent e) {
    {
      std::lock_guard lock(mu_);
      q_.push_back(std::move(e));
    }
    cv_.notify_one();
  }
  bool empty() {
    std::lock_guard lock(mu_);
    return q_.empty();
  }
  bool hasSignal() {
    std::lock_guard lock(mu_);
    for (const AgentEvent& e : q_) {
      if (std::holds_alternative<SignalReceived>(e)) return true;
    }
    return false;
  }
  // Takes the first signal queued, if any (leaving the other events).
  std::optional<int> takeSignal() {
    std::lock_guard lock(mu_);
    for (auto it = q_.begin(); it != q_.end(); ++it) {
      if (auto* s = std::get_if<SignalReceived>(&*it)) {
        const int sig = s->sig;
        q_.erase(it);
        return sig;
      }
    }
    return std::nullopt;
  }
  std::optional<AgentEvent> pop(Milliseconds timeout) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return !q_.empty(); })) return std::nullopt;
    AgentEvent e = std::move(q_.front());
    q_.pop_front();
    return e;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<AgentEvent> q_;
};

// Where a coordinator for `host` (a node's address, or the rendezvous endpoint's host) listens:
// that loopback address itself (127.x or ::1: tests and one-machine demos), 127.0.0.1 for
// localhost, every IPv6 interface for another IPv6 address, else every IPv4 interface.
std::string listenAddressFor(const std::string& host);
// True if `host` names this machine: loopback, its host name, or one of its interface addresses.
bool isLocalHost(const std::string& host);

// This machine's host name.
std::string hostName();
// `bytes` random bytes in hex.
std::string randomHex(int bytes);

// The state letter of /proc/PID/stat ('R', 'S', 'T' stopped, ...); 0 if the process is gone.
char processState(pid_t pid);

class Agent::Impl {
 public:
  explicit Impl(cli::RunOptions o) : o_(std::move(o)) {}
  int run();

 private:
  Status setup();
  Status connect();
  // Starts the job's coordinator at `at` (this agent's host is its first --rdzv-endpoint
  // address), or finds that another agent on this host serves it there. `forced`: is_host=true,
  // so a failure to listen is the error.
  Status hostOrJoin(const coordinator::CoordinatorOptions& copt, const cli::HostPort& at,
                    bool forced);
  // A session with the coordinator conn_ points at; `last`: the round this node was in under a
  // coordinator that was lost.
  Status openSession(const v1::RoundFormed* last);
  // The coordinator was lost (or handed over): starts trying the round's successors in order.
  // False if there is nothing to take over to (no round yet, no successors, --failover-timeout 0).
  // `handover`: the coordinator said it is going (no need to check that it no longer answers).
  bool beginTakeover(const std::string& why, bool handover);
  // True if the coordinator at the current endpoint still answers a call on a new connection
  // (the stream broke, but the coordinator did not go: a reset connection, a restarted proxy).
  bool coordinatorAnswers();
  // What asking `endpoint` for its round (on a new connection, within `timeout`) found.
  struct Probe {
    enum Kind {
      kServes,    // this job's coordinator, serving
      kRefuses,   // a coordinator that refuses this node's token
      kOtherJob,  // a coordinator of another job
      kClosed,    // this job's coordinator, but the job has ended
      kNone,      // none serves a call there (refused, unreachable, shutting down)
    } kind = kNone;
    std::uint64_t generation = 0;
    std::string detail;   // what it said, for messages
    bool formed = false;  // kServes: its generation's round has formed
  };
  Probe probeCoordinator(const std::string& endpoint, Milliseconds timeout = Milliseconds(1000));
  // What a probe's answer says (probeCoordinator's classification), for job `job_id`.
  static Probe probeOf(const Result<v1::RoundInfo>& round, const std::string& job_id);
  // The endpoint of --rdzv-endpoint's list where the job's coordinator serves (the newest
  // generation if several do; with `accept_refusal`, else one that refuses this node's token, so
  // that joining it reports that), asked with growing pauses (250 ms to 2 s) until `deadline`
  // (one pass if it has passed). Unavailable naming every address and its answer if none does;
  // Aborted if a signal came.
  // `remembered`: endpoints this host's memory names (CoordinatorMemory), asked in the same passes
  // but counted only with a formed round (generation > 0): an old address of the job's that serves
  // its coordinator took it over, while a listed one may still be gathering.
  Result<std::string> locateCoordinator(Clock::time_point deadline, bool accept_refusal,
                                        const std::vector<std::string>& remembered = {});
  // Asks every endpoint at once (each on its own thread), within `timeout`.
  std::vector<Probe> probeAll(const std::vector<std::string>& endpoints, Milliseconds timeout);
  // Where a round member serves the coordinator when it takes it over: its standby address of
  // --rdzv-endpoint, else its own address at the rendezvous port.
  std::string successorEndpoint(const v1::RoundMember& m) const;
  // RALLY_MAX_MESSAGE_BYTES: the limit of the coordinator this agent hosts, as of its clients.
  std::int64_t maxMessageBytes() const { return *o_.tunables.bytes("max_message_bytes"); }
  // Writes this host's memory of the job's coordinator: where it serves now, and round `r`'s
  // successors. Logged once if it fails; the job goes on.
  void rememberCoordinators(const v1::RoundFormed& r);
  // A node in no round yet (held, or gathering: it knows no successors) lost the coordinator, or
  // was told it is handed over: looks for it at --rdzv-endpoint's addresses (or its one address)
  // until --connect-timeout and joins it again. False if it was not found or could not be joined
  // (said why); true also when a signal came (the loop takes it).
  bool relocate(const std::string& why);
  // While relocate()'s search runs: until when its node may rejoin (the coordinator may still
  // hold the node's old session for a moment: AlreadyExists is retried until then).
  std::optional<Clock::time_point> relocate_deadline_;
  // Moves to the next successor: this node starts the coordinator if it is the one. Returns an
  // exit code when none is left.
  std::optional<int> tryNextSuccessor();
  // The coordinator's endpoint, for the workers (RALLY_COORDINATOR_FILE): they follow a takeover.
  void writeCoordinatorFile();
  // The job's restart count lives in the coordinator's store: after a takeover or a restart of
  // the coordinator, raise it to the newest count this node saw.
  void raiseRestarts();
  int loop();
  int runStatic();
  Status startWorkers(const v1::RoundFormed& round);
  void stopWorkers(int sig, const std::string& why);
  std::optional<int> onWorkerFailure(const WorkerExit& e);
  // Counts a failed generation against --max-restarts (once for the job, by whichever node claims
  // it first) and asks for a new round, or, out of restarts, reports the job's failures and fails
  // it (returns the exit code). Without a coordinator, keeps it for accountOutageFailures().
  // `reform`: ask for the new round (not when one is forming anyway).
  std::optional<int> claimRestart(const WorkerFailure& f, const std::string& what,
                                  bool reform = true);
  // Failures seen while the coordinator was away, once one is back (resumed, or taken over).
  std::optional<int> accountOutageFailures(bool reform);
  std::optional<int> onAllWorkersSucceeded();
  // Counts this node in the exit barrier: a key per node, so that it can be counted again at a
  // coordinator that resumed the round.
  void countInBarrier();
  // A restarted coordinator resumed this node's round.
  // An exit code if the job fails (failures while it was away used up the restarts).
  std::optional<int> onRoundResumed(const v1::RoundFormed& r);
  int finish(int code);
  std::map<std::string, std::string> workerEnv(const v1::RoundFormed& r, int local_rank,
                                               int master_port, const std::string& error_file);
  void signalLoop(sigset_t set);
  Milliseconds tunable(const char* name) { return *o_.tunables.duration(name); }
  Status spawn(const v1::RoundFormed& r, int master_port);
  WorkerSpec specFor(const v1::RoundFormed& r, int local_rank, int master_port);
  // In-place recovery: a failed worker is replaced at the next round, the others keep running.
  Status spawnReplacements(const v1::RoundFormed& r);
  bool allLocalWorkersSucceeded() const;
  // Kills workers that have been stopped (SIGSTOP) longer than --hang-timeout, and (with
  // --progress-timeout) workers whose step stands still while they are not waiting.
  void checkHungWorkers();
  std::vector<pid_t> runningWorkers() const;
  // The fault plan's time-triggered faults for this node's ranks or this node.
  void applyTimedFaults();
  // In place: re-forms to admit waiting nodes once the workers reached a commit point.
  void checkAdmission();
  // This agent started the job's coordinator at the first --rdzv-endpoint address, but no round
  // has formed there yet: if a standby address, or one this host remembers (CoordinatorMemory),
  // already serves the job (it moved there while this node was away: the restarted first host),
  // join it and hand the one started here over, so that the job does not split. Checked every 2 s.
  // An exit code if it cannot join it.
  std::optional<int> deferToMovedCoordinator();
  // After this node took the job's coordinator over as successor `index` (of the lost round
  // `lost`'s `successors`), until a round forms at it: the other successors are asked every
  // second, off the agent's loop, whether one of them serves the job too (two successors that
  // each checked just before the other started, or one that did not answer the check in time:
  // its host stalled). The rule both sides apply, so that exactly one goes on: a formed round
  // wins over one still gathering, and between two gathering the one earlier in the list wins.
  // The loser hands its coordinator over (its nodes look for the job's coordinator again, among
  // the lost round's successors) and joins the winner as an old member of the lost round.
  struct RivalWatch {
    std::vector<v1::RoundMember> successors;
    size_t index = 0;
    v1::RoundFormed lost;  // the round whose coordinator was lost
    Clock::time_point next_check{};
    std::vector<size_t> asked;                // successors' indices, as probed
    std::future<std::vector<Probe>> answers;  // in flight
  };
  std::optional<RivalWatch> rival_watch_;
  // An exit code if it stepped aside and cannot join the winner.
  std::optional<int> watchForRivals();
  // True if `endpoint` reaches the coordinator this agent hosts (its exact address; any local one
  // at its port when it listens on every interface).
  bool isOwnCoordinator(const std::string& endpoint) const;
  Clock::time_point next_defer_check_{};

  cli::RunOptions o_;
  std::string node_id_;
  std::string address_;
  std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<EventLog> events_;
  std::unique_ptr<coordinator::CoordinatorServer> embedded_;
  std::shared_ptr<rendezvous::CoordinatorConnection> conn_;
  std::unique_ptr<rendezvous::StoreClient> store_;
  std::unique_ptr<rendezvous::AgentSession> session_;
  // This node's copy of the job scope while the coordinator names it a holder; given to the
  // coordinator that takes over (or the restarted one) when rejoining.
  std::shared_ptr<rendezvous::JobScopeReplica> job_scope_ =
      std::make_shared<rendezvous::JobScopeReplica>();
  std::atomic<std::uint64_t> session_serial_{0};
  coordinator::CoordinatorOptions coordinator_options_;  // for a takeover
  int rdzv_port_ = 0;                                    // a successor's coordinator listens here
  // The standby address of --rdzv-endpoint that names this node: if it takes the coordinator
  // over, it serves it there instead of at its own address and rdzv_port_.
  std::optional<cli::HostPort> standby_;
  rendezvous::ClientOptions client_options_;  // the first endpoint's, for probes before conn_
  std::string coordinator_file_;
  std::optional<CoordinatorMemory> memory_;  // none: standalone, static, or it cannot be kept
  std::vector<std::string> remembered_;      // what the memory held when this agent started
  bool memory_failed_said_ = false;
  struct Takeover {
    std::vector<v1::RoundMember> successors;
    size_t next = 0;  // the next one to try
    Clock::time_point lost_at;
    Clock::time_point deadline;  // for the current one
    std::string lost_endpoint;
    std::string why;
    // A standalone coordinator (no successors): wait for it to come back at its endpoint,
    // restarted by whatever supervises it; it resumes the job's round.
    bool same_endpoint = false;
    Milliseconds patience{0};      // per successor: the k-th is given up at lost_at + k * patience
    bool started_here = false;     // this node started a coordinator for it
    bool passed_own_turn = false;  // it joined another successor rather than start one here
    std::optional<Clock::time_point> reopen_at;  // same endpoint: rejoin again then
  };
  std::optional<Takeover> takeover_;
  // Before this node starts the coordinator as a successor: the index in `t.successors` of
  // another successor that already serves the job's coordinator for the lost generation or a
  // later one (it took over while this node was away, stalled past --failover-timeout), asked
  // of all of them at once within 500 ms; nullopt if none does.
  std::optional<size_t> successorServing(const Takeover& t);
  struct Unaccounted {
    WorkerFailure failure;
    std::string what;  // "signal SIGKILL"
  };
  std::vector<Unaccounted> unaccounted_;  // failures not yet counted (no coordinator then)
  std::int64_t job_restarts_ = 0;  // the newest count of the job's restarts this node has seen
  EventQueue queue_;
  std::unique_ptr<WorkerGroup> group_;
  std::vector<std::unique_ptr<WorkerGroup>> replacements_;  // in-place: one group per replacement
  std::set<int> missing_;             // in-place: local ranks that failed, not yet replaced
  std::map<int, bool> last_exit_ok_;  // local rank -> its latest process exited with 0
  int master_port_ = 0;
  std::string fault_plan_text_;  // --fault-plan, for the workers' RALLY_FAULTS
  std::optional<FaultPlan> fault_plan_;
  std::optional<Clock::time_point> admit_pending_since_;  // admission asked of the workers
  std::uint32_t admit_waiting_ = 0;
  std::optional<Clock::time_point> workers_started_at_;  // this node's first workers
  std::set<size_t> timed_faults_done_;
  std::map<pid_t, Clock::time_point> resume_at_;      // delay faults: SIGCONT then
  std::map<pid_t, Clock::time_point> stopped_since_;  // workers seen stopped, since when
  std::map<pid_t, Milliseconds> hung_killed_;         // workers killed as hung, stopped how long
  std::unique_ptr<ProgressWatchdog> watchdog_;        // --progress-timeout
  std::map<pid_t, std::string> stalled_killed_;       // workers killed by it, and why
  std::uint64_t epoch_ = 0;  // tags worker exits with the group they came from
  std::optional<v1::RoundFormed> round_;
  std::uint64_t generation_ = 0;
  std::uint64_t reform_requested_for_ = 0;
  int restart_count_ = 0;
  std::string run_dir_;
  bool in_barrier_ = false;
  Clock::time_point barrier_deadline_;
  std::atomic<bool> stop_signals_{false};
  std::thread signal_thread_;
};

}  // namespace rally::agent
