// Applies a fault plan's step-triggered faults inside a worker: the training loop calls atStep()
// at every step boundary, and a fault whose rank and step have come fires once (killing, hanging,
// stalling or failing this process). Time- and node-triggered faults are the agent's.
//
//   FaultInjector faults(plan, std::make_shared<LocalFiredFaults>());
//   for (;; ++step) { faults.atStep(world.rank(), step); train_one_step(); }
//
// "Once per job" is decided by FiredFaults: LocalFiredFaults remembers in this process (enough
// without a launcher, where a process that dies is not replaced); under `rally run` the runtime
// claims firings in the coordinator's store, so a replacement worker does not fire them again.
//
// The actions are a seam: tests pass recording ones; the defaults raise SIGKILL or SIGSTOP on this
// process, sleep, or exit with the fault's code (after a line on stderr saying which fault fired).
//
// Thread-safety: atStep() from one thread.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <set>

#include "runtime/faults/fault_plan.h"

namespace rally {

class FiredFaults {
 public:
  virtual ~FiredFaults() = default;
  // True if the caller is the first to fire fault `index` of the plan (and must fire it now).
  virtual Result<bool> claim(size_t index) = 0;
};

class LocalFiredFaults final : public FiredFaults {
 public:
  Result<bool> claim(size_t index) override {
    std::lock_guard lock(mu_);
    return fired_.insert(index).second;
  }

 private:
  std::mutex mu_;
  std::set<size_t> fired_;
};

struct FaultActions {
  std::function<void(const Fault&)> kill;
  std::function<void(const Fault&)> kill_node;  // this process's agent (its parent), then itself
  std::function<void(const Fault&)> hang;
  std::function<void(const Fault&)> delay;
  std::function<void(const Fault&)> fail;
  std::function<void(const Fault&)> stall;  // never returns
  // SIGKILL, SIGSTOP, sleep, exit(code), sleep forever (the thread blocks, as in a deadlock; the
  // process keeps running): on this process; kill_node: SIGKILL to the parent (the
  // node's agent; its other workers follow by their parent-death signal), then to this process.
  static FaultActions onThisProcess();
};

class FaultInjector {
 public:
  FaultInjector(FaultPlan plan, std::shared_ptr<FiredFaults> fired,
                FaultActions actions = FaultActions::onThisProcess());
  // Fires the plan's step faults for `rank` whose step is at most `step` and that have not fired
  // in this job. Returns what claiming said if the store could not be reached (the fault is then
  // not fired: a drill must not turn into a real failure of another kind).
  Status atStep(int rank, std::int64_t step);
  // Fires the plan's recovery faults for `rank` whose recovery number is `recovery` (1 = the job's
  // first in-place recovery).
  Status atRecovery(int rank, std::int64_t recovery);
  // Before the rank takes commit `commit`: its delay faults. A delay waits for the fault's
  // duration, or until `moved()` says the job's generation moved: then Aborted (the rank must not
  // take the commit). `moved` is polled every few milliseconds.
  Status beforeCommit(int rank, std::int64_t commit, const std::function<bool()>& moved);
  // After it took commit `commit`: kill, hang and fail faults of the rank, and kill faults of its
  // node when it is the node's local rank 0.
  Status afterCommit(int rank, int node, int local_rank, std::int64_t commit);
  bool empty() const { return plan_.empty(); }

 private:
  // Fires fault i if it has not fired in this job.
  Status fire(size_t i);

  FaultPlan plan_;
  std::shared_ptr<FiredFaults> fired_;
  FaultActions actions_;
  std::set<size_t> done_here_;  // fired or claimed elsewhere: not asked again
};

}  // namespace rally
