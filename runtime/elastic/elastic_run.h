// Runs a training function and recovers it in place when a peer fails, in the manner of Horovod's
// `hvd.elastic.run`: the function runs; when it returns PeerLost, Aborted or Timeout (a peer died,
// the job's generation moved, a peer hung), the world re-forms without restarting this process,
// every rank is brought to the newest commit held by any survivor, and the function is called
// again. A replacement worker or a new node goes through the same sync at its start.
//
//   rally::ElasticRun run(*world, state);
//   RALLY_RETURN_IF_ERROR(run.run([&]() -> Status {
//     while (step < steps) {
//       RALLY_RETURN_IF_ERROR(run.atStep(step));           // fault plan; recovery timing
//       RALLY_RETURN_IF_ERROR(train_one_step(world->comm()));  // fetch comm() each time
//       ++step;
//       if (step % 10 == 0) RALLY_RETURN_IF_ERROR(run.commit());
//       ...
//     }
//     return okStatus();
//   }));
//
// Each recovery is logged, and written as a "recovery" event to the job's event log (RALLY_EVENTS,
// set by `rally run --events FILE`) by the lowest rank that recovered in place (a replacement
// knows nothing of the failure), with its phases in milliseconds:
//   detect      the failed worker's exit (as its agent recorded it) -> this worker told by the
//   watch abort       told -> the training function returned its error rendezvous  -> the new round
//   read rebuild     -> the new generation's communicator built restore     -> the state synced
//   from the newest commit first_step  -> the first step after recovery done (atStep() of the step
//   after it)
// with "steps_redone": steps begun before the failure that run again (the newest one begun minus
// the one resumed at: at most the commit interval when the newest commit was restored), and
// "fell_back_from": the job's newest commit when no survivor held it (its holders all died right
// after taking it; each node's local rank 0 records commits in the coordinator's store), else 0.
// "Told" is the earlier of the watch's news and the training function's error (a peer's abort can
// arrive first); detect is missing when the failure's time is not known (a node lost, not a
// worker's exit).
//
// With a checkpoint directory (ElasticRunOptions::checkpoint_dir or RALLY_CHECKPOINT_DIR), commit()
// also saves every N-th commit to storage in the background, and a whole-job restart resumes from
// the newest complete checkpoint (logged: "resumed from checkpoint step S").
//
// Thread-safety: one training thread.
#pragma once

#include <chrono>
#include <functional>
#include <optional>

#include "kernels/base/status.h"
#include "runtime/checkpoint/checkpointer.h"
#include "runtime/elastic/elastic_state.h"
#include "runtime/faults/fault_injector.h"
#include "runtime/world/world.h"

namespace rally {

struct ElasticRunOptions {
  int max_recoveries = 1000;
  Milliseconds recover_timeout{120'000};  // waiting for the next round to form
  SyncOptions sync;
  // Checkpoints on storage as well as commits in memory: every `checkpoint_every`-th commit (by
  // commit number, the same on every rank) is also saved to `checkpoint_dir` in the background,
  // and a job whose ranks all start without a commit in memory (a whole-job restart) resumes from
  // the newest complete checkpoint there. Empty: RALLY_CHECKPOINT_DIR, RALLY_CHECKPOINT_EVERY and
  // RALLY_CHECKPOINT_KEEP (off when that is empty too).
  std::string checkpoint_dir;
  int checkpoint_every = 10;
  checkpoint::CheckpointOptions checkpoint;
  // Tensor parallelism: groups of tp_size consecutive ranks share a model's slices (tp()); ranks
  // with the same place in their group are data-parallel replicas (dp()). The state is synced over
  // dp() (replicas hold the same slices), checkpoints cover the world. The world's size must stay
  // a multiple of tp_size.
  int tp_size = 1;
};

// PeerLost, Aborted and Timeout: what a failure elsewhere in the job looks like from here.
bool isRecoverable(const Status& s);

class ElasticRun {
 public:
  ElasticRun(World& world, ElasticState& state, ElasticRunOptions options = {});
  ~ElasticRun();

  // Syncs the state (every rank starts from the same commit), then calls `train` until it returns
  // OK (then OK) or an error that is not recoverable here (a collectives::CollectiveError thrown
  // by `train`, e.g. from inside autograd, counts as its Status) (then that error): a
  // non-recoverable code, a world that cannot re-form in place, or more than max_recoveries.
  Status run(const std::function<Status()>& train);

  // Call at the start of every step: applies the fault plan (RALLY_FAULTS) for this rank, and
  // times the first step after a recovery.
  Status atStep(std::int64_t step);
  // The state's commit(), and a commit point at which waiting nodes are admitted
  // (World::atCommitPoint). Every rank calls it at the same steps.
  Status commit();

  int recoveries() const { return recoveries_; }
  // This generation's data-parallel and tensor-parallel communicators (the world and a group of
  // one when tp_size is 1). Rebuilt by every recovery: fetch them again in the training function.
  collectives::Communicator& dp();
  collectives::Communicator& tp();
  // The checkpoint the job resumed from at its start (0: none), and the checkpointer (null when
  // checkpoints are off).
  std::uint64_t resumedFromStep() const { return resumed_from_; }
  checkpoint::Checkpointer* checkpointer() { return checkpointer_.get(); }

 private:
  using Clock = std::chrono::steady_clock;
  Status recoverOnce(const Status& cause);
  bool followable(const Status& s) const;
  // state_.sync(), then the newest step begun on any rank into *last_step and, for a rank that
  // recovered in place (writer set), the lowest such rank into *writer (collective).
  Result<SyncResult> syncState(std::int64_t* last_step, int* writer);
  void writeRecoveryEvent();
  void dropGrid();
  // Attaches the checkpointer to this generation's world and, when no rank holds a commit, loads
  // the newest checkpoint (collective; part of syncState).
  Status attachCheckpoints();

  World& world_;
  ElasticState& state_;
  ElasticRunOptions options_;
  std::optional<FaultInjector> faults_;
  int recoveries_ = 0;
  std::unique_ptr<checkpoint::Checkpointer> checkpointer_;
  std::optional<collectives::Grid> grid_;                    // tp_size > 1
  std::unique_ptr<collectives::BootstrapStore> self_store_;  // tp_size == 1: a group of one
  std::unique_ptr<collectives::Communicator> self_tp_;
  std::uint64_t resumed_from_ = 0;
  std::int64_t last_step_ = -1;  // the newest step atStep() was called for
  // The recovery whose first step is still running, if any.
  struct Pending {
    std::uint64_t from_generation = 0;
    std::uint64_t generation = 0;
    std::uint64_t commit = 0;
    std::uint64_t fell_back_from = 0;  // the newest commit, lost with its holders; 0: not lost
    int world_size = 0;
    std::string cause;
    double detect_ms = -1, abort_ms = 0, rendezvous_ms = 0, rebuild_ms = 0, restore_ms = 0;
    Clock::time_point restored;
    std::optional<std::int64_t> first_step;  // the step atStep() saw first after recovery
    std::int64_t last_step = -1;             // the newest step begun before the failure
    int writer = 0;                          // the rank that writes the event
  };
  std::optional<Pending> pending_;
};

}  // namespace rally
