// rally::init(): this process's place in the job (rank, size, local rank, node, generation) and a
// communicator over the whole world, from the environment the process was started in:
//   - under `rally run` (RALLY_COORDINATOR set by the agent): the communicator bootstraps through
//     the coordinator's store in this generation's scope, and a generation watch aborts it the
//     moment the job's generation moves (a worker exit seen by its agent, a lost node, a node
//     waiting to join): a collective blocked on a dead peer returns Aborted in milliseconds;
//   - under mpirun or srun with MPI (static: the world never changes): an MPI communicator;
//   - with no launcher at all: a world of one.
//
//   RALLY_ASSIGN_OR_RETURN(std::unique_ptr<rally::World> world, rally::init());
//   RALLY_RETURN_IF_ERROR(world->comm().allreduce(g, n, DataType::kF32, ReduceOp::kAvg)
//                             ->wait(10s));
//
// Telemetry: every collective of the world's communicators (and of those split from them) is kept
// in a flight recorder (collectives/recorder.h; RALLY_TRACE_BUFFER records, default 2000). Where
// RALLY_TRACE_DIR is set (`rally run --trace-dir`), each process writes its records there as a
// Chrome trace (collectives-<place>-pid<P>.json under rally run, collectives-rank<R>.json
// otherwise; `rally trace DIR` merges them and finds the rank a job waits for); where
// RALLY_METRICS_DIR is set (`rally run --metrics-dir`), its metrics in the Prometheus text format
// (rally-<place>.prom, for node_exporter's textfile collector; a replacement takes over the file
// of the worker it replaced). <place>: "<node id>-local<L>" under rally run, "rank<R>" otherwise.
// Both are rewritten every RALLY_TELEMETRY_INTERVAL (default 10s), at once when the job moves past
// this world's generation (by a background thread), and when the World is destroyed.
//
// Thread-safety: one training thread uses a World (recover() changes rank, size and comm());
// generation(), latestGeneration() and generationChanged() may be read from any thread. The
// communicator follows its own contract; the generation watch runs on a gRPC thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "collectives/communicator.h"
#include "collectives/recorder.h"
#include "kernels/base/status.h"
#include "runtime/faults/fault_injector.h"

namespace rally {

namespace rendezvous {
class CoordinatorConnection;
class GenerationWatcher;
}  // namespace rendezvous
namespace internal {
struct ProgressTracker;
class ProgressReporter;
}  // namespace internal

enum class Launcher { kNone, kMpi, kRally };
std::string_view launcherName(Launcher l);

struct InitOptions {
  // A backend name for collectives::createCommunicator ("auto", "gloo", "mpi", "nccl"); empty:
  // RALLY_BACKEND if set, else "auto" ("mpi" under an MPI launcher).
  std::string backend;
  bool device_memory = false;  // the collectives will be on CUDA buffers
  Milliseconds connect_timeout{60'000};
  Milliseconds op_timeout{600'000};
  // glibc malloc settings that keep a training step's working set instead of faulting it in
  // again every step (see runtime/world/internal/malloc_tuning.h). Off also with
  // RALLY_MALLOC_TUNING=0, and left alone when GLIBC_TUNABLES sets malloc tunables.
  bool tune_malloc = true;
};

class World {
 public:
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int localRank() const { return local_rank_; }
  int localSize() const { return local_size_; }
  int nodeRank() const { return node_rank_; }
  int numNodes() const { return num_nodes_; }
  std::uint64_t generation() const { return generation_.load(); }
  Launcher launcher() const { return launcher_; }
  // The current generation's communicator. After a failed recover() there is none: a call is a
  // programming error and throws std::logic_error.
  collectives::Communicator& comm();
  // Communicators made from this generation's (sub-groups: a DP x TP grid) are aborted with it
  // when the job moves on. Stop before destroying one. Any thread.
  void abortWithGeneration(collectives::Communicator* c);
  void stopAborting(collectives::Communicator* c);
  // The job was closed (finished or failed): nothing to recover into.
  bool closed() const { return closed_.load(); }
  // The newest generation the job has announced (the watch's view; this world's otherwise).
  std::uint64_t latestGeneration() const { return latest_.load(); }
  // The job moved past this world's generation, or was closed: its communicator has been aborted.
  bool generationChanged() const { return latestGeneration() > generation() || closed_.load(); }
  // Where fault firings are recorded for "once per job": the coordinator's store under rally run,
  // this process otherwise.
  std::shared_ptr<FiredFaults> firedFaults() const { return fired_; }
  // "rank 1 of 4 (local 1 of 2, node 0 of 2), generation 3, rally run, backend gloo".
  std::string describe() const;

  // Under `rally run --recovery in-place` (RALLY_RECOVERY=in-place): the job can re-form around a
  // failure without restarting this process.
  bool canRecoverInPlace() const { return in_place_; }
  // Re-forms this process's world in place: waits (up to `timeout`) for a round of a newer
  // generation than this world's to form, takes this worker's rank in it (nodes in node-rank
  // order, each contributing its local workers), and builds that generation's communicator
  // (the old one is destroyed first, so comm() must be fetched again afterwards). If the
  // generation moves again meanwhile, it follows to the newest. Errors: FailedPrecondition when
  // in-place recovery is not possible here (another launcher, restart mode) or this node is not in
  // the new round; Timeout; Aborted when the job was closed.
  Status recover(Milliseconds timeout = Milliseconds(120'000));
  // Call at every commit point (ElasticRun::commit does). Under `rally run --recovery in-place`,
  // when nodes wait to join, rank 0 tells the agents that the job is at a commit point and waits
  // (up to `wait`) for the job to re-form, so the newcomers join without anyone rolling back more
  // than the step the others have begun. Costs rank 0 one store read per call; OK elsewhere.
  Status atCommitPoint(Milliseconds wait = Milliseconds(10'000));
  // Under `rally run`: records that this worker took commit number `commit`, as the job's newest
  // commit if it is newer than the recorded one (a compare-and-set in the coordinator's store; the
  // node's local rank 0 writes, the others return at once). newestCommit(): the record (0: none,
  // or not under rally run). A recovery compares it with what the survivors hold, to say when the
  // newest commit was lost with its holders.
  Status publishCommit(std::uint64_t commit);
  // The training thread began step `step` (ElasticRun::atStep calls it). Under `rally run
  // --progress-timeout`, reported to the agent, whose watchdog kills a worker whose step stands
  // still while it is not waiting in a collective; also the rally_step metric. Cheap (atomic
  // stores).
  void reportProgress(std::int64_t step);
  std::uint64_t newestCommit();

  // This process's collectives (see Telemetry above).
  collectives::CollectiveRecorder& recorder() { return *recorder_; }
  // Writes the trace and metrics files now (where their directories are set; OK otherwise).
  Status writeTelemetry();
  // ElasticRun reports each in-place recovery it finished: its time from the failure (or from
  // when this rank learnt of it) to the first step after it, and how many steps were done again
  // (for the metrics).
  void noteRecovery(double seconds, std::int64_t steps_redone);
  // The newest `n` collectives of this process, one per line (for a failure's log).
  std::string recentCollectives(size_t n = 4) const { return recorder_->describeRecent(n); }

  // When the watch first told this process that the job moved past this world's generation (the
  // epoch: it has not); after recover(), when it was told that the generation it left ended.
  // failureTime(g): when the earliest worker failure of generation g happened, as its agent
  // recorded it (nullopt: none recorded, or not under rally run). For recovery timing.
  std::chrono::system_clock::time_point movedAt() const;
  std::chrono::system_clock::time_point lastMovedAt() const { return last_moved_at_; }
  // When the last recover() read the round it re-formed into (its communicator was built after).
  std::chrono::steady_clock::time_point roundReadAt() const { return round_read_at_; }
  std::optional<std::chrono::system_clock::time_point> failureTime(std::uint64_t from);

 private:
  friend Result<std::unique_ptr<World>> initFrom(const std::map<std::string, std::string>&,
                                                 const InitOptions&);
  World() = default;
  // From the watch: a newer generation, or the job closed, aborts the communicator.
  void onGeneration(std::uint64_t generation, const std::string& cause, bool closed);
  // Starts (again) the generation watch. If its stream ends (the coordinator unreachable), the
  // rewatch thread starts a new one with backoff; when none delivers an event within
  // connect_timeout, the job is treated as closed: the communicator is aborted, naming the cause,
  // and nothing is recovered into (the coordinator holds the job's membership).
  Status startWatch();
  void rewatchLoop();
  // rally run writes where the job's coordinator is (RALLY_COORDINATOR_FILE); when it has moved to
  // a successor (its host was lost), points conn_ there. True if it moved.
  bool followCoordinator();

  Status buildCommunicator();
  // What every communicator of this world is wrapped in: the recorder, then the progress tracker.
  std::unique_ptr<collectives::Communicator> decorate(std::unique_ptr<collectives::Communicator> c);
  void telemetryLoop();
  // Has the telemetry thread write the files now, off the caller's thread (slow storage must not
  // hold up a recovery). No-op without telemetry files.
  void requestTelemetryWrite();
  Status writeTelemetryFiles();  // with telemetry_write_mu_
  std::string metricsText();
  // The job is past this world's generation (the watch said so, or the coordinator does).
  bool jobMovedOn();

  bool in_place_ = false;
  std::string node_id_;
  std::string backend_choice_;
  bool device_memory_ = false;
  Milliseconds connect_timeout_{60'000}, op_timeout_{600'000};
  std::condition_variable gen_cv_;  // with comm_mu_: the watch saw a new generation
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1, node_rank_ = 0, num_nodes_ = 1;
  std::atomic<std::uint64_t> generation_{0};
  Launcher launcher_ = Launcher::kNone;
  std::string backend_;
  std::atomic<std::uint64_t> latest_{0};
  std::atomic<bool> closed_{false};
  std::atomic<std::int64_t> moved_at_us_{0};
  std::chrono::steady_clock::time_point round_read_at_{};
  std::chrono::system_clock::time_point
      last_moved_at_{};  // system clock, when the watch saw a newer generation
  std::shared_ptr<FiredFaults> fired_;
  std::unique_ptr<collectives::BootstrapStore> bootstrap_;
  std::shared_ptr<rendezvous::CoordinatorConnection> conn_;
  std::string coordinator_file_;  // RALLY_COORDINATOR_FILE
  std::mutex comm_mu_;            // guards comm_ against the watch while it is being set
  std::unique_ptr<collectives::Communicator> comm_;
  std::vector<collectives::Communicator*> derived_;  // with comm_mu_: aborted with comm_
  std::mutex watch_mu_;                              // guards watcher_ and the rewatch state
  std::condition_variable watch_cv_;
  std::unique_ptr<rendezvous::GenerationWatcher> watcher_;
  bool watch_ended_ = false, stopping_ = false;
  Status watch_end_;
  std::atomic<std::uint64_t> watch_events_{0};
  std::uint64_t watch_seq_ = 0;             // with watch_mu_: the current watch's number
  std::atomic<bool> coordinator_up_{true};  // false from a watch's end to the next event
  std::thread rewatch_;
  std::shared_ptr<internal::ProgressTracker> progress_;  // set under the progress watchdog
  std::unique_ptr<internal::ProgressReporter> reporter_;
  std::shared_ptr<collectives::CollectiveRecorder> recorder_;
  std::string trace_path_, metrics_path_;  // empty: not written
  std::string run_id_;
  std::atomic<std::int64_t> step_{-1};
  std::atomic<std::uint64_t> recoveries_{0};
  std::atomic<double> last_recovery_seconds_{-1};  // -1: none finished
  std::atomic<std::int64_t> steps_redone_{0};
  Milliseconds telemetry_interval_{10'000};
  std::mutex telemetry_write_mu_;  // serialises writes
  std::mutex telemetry_mu_;        // with telemetry_cv_: the loop's stop and wake-up
  std::condition_variable telemetry_cv_;
  bool telemetry_stop_ = false;
  bool telemetry_now_ = false;  // write at once (a generation ended)
  std::thread telemetry_;
};

// From this process's environment.
Result<std::unique_ptr<World>> init(const InitOptions& options = {});
// From `env` instead (tests; embedding with an explicit environment).
Result<std::unique_ptr<World>> initFrom(const std::map<std::string, std::string>& env,
                                        const InitOptions& options = {});

}  // namespace rally
