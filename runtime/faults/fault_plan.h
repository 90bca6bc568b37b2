// Fault plans: what to break, where and when, for tests and for users' own fault drills. A plan is
// text, one fault per line (or separated by ';' in the RALLY_FAULTS environment variable); `#`
// starts a comment:
//
//   kill  rank=1 step=20          # SIGKILL worker rank 1 when it reaches step 20
//   stall rank=1 step=20          # it stops making progress but keeps running (a deadlock)
//   hang  rank=2 step=30          # SIGSTOP it (a hung rank: alive, but silent)
//   delay rank=0 step=10 for=500ms  # stall it for 500 ms at that step
//   fail  rank=3 time=5s code=3   # make it exit with code 3, 5 s after it started
//   kill  node=1 time=3s          # kill node 1's agent and workers, 3 s after the job started
//   kill  rank=2 recovery=1       # kill rank 2 during its first in-place recovery
//   kill  node=0 commit=6         # node 0 lost right after it took commit 6
//   delay rank=2 commit=6 for=2s  # rank 2 slow to take commit 6
//
// Targets: rank=R (a worker, by global rank) or node=N (a whole node, by node rank; kill only).
// Triggers: step=S (at the first step boundary at or after S, applied by the worker's runtime);
// recovery=N (during the N-th in-place recovery that the worker holding rank R goes through, once
// the new round has formed and before the state is restored: a failure during recovery); commit=K
// (at ElasticRun's commit that takes commit number K: kill, hang and fail strike right after the
// rank took it, so it dies holding commit K; delay holds the rank before it takes it, for `for=` or
// until the job's generation moves, and then the rank does not take it, as a rank whose step had
// not finished when a peer died; for node=N, the node's local rank 0 kills its agent and itself);
// or time=T (T after the job's workers first started; applied by the agent, to any program:
// SIGKILL, SIGSTOP, SIGSTOP + SIGCONT, SIGTERM). Each fault fires once per job: the firing is
// claimed (in the coordinator's store under `rally run`), so a replacement worker that passes step
// S again does not fire it again.
//
//   RALLY_ASSIGN_OR_RETURN(FaultPlan plan, FaultPlan::parse(text, "faults.txt"));
//   RALLY_ASSIGN_OR_RETURN(FaultPlan plan, FaultPlan::fromEnvironment());  // RALLY_FAULTS
//
// Thread-safety: a FaultPlan is an immutable value once parsed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally {

struct Fault {
  enum class Action { kKill, kHang, kDelay, kFail, kStall };
  enum class Target { kRank, kNode };
  Action action = Action::kKill;
  Target target = Target::kRank;
  int index = 0;                         // the rank or the node rank
  std::optional<std::int64_t> step;      // step trigger, or
  std::optional<Milliseconds> time;      // time trigger, or
  std::optional<std::int64_t> recovery;  // during the N-th in-place recovery, or
  std::optional<std::int64_t> commit;    // at the commit point that takes commit number K
  Milliseconds delay{0};                 // delay: how long
  int exit_code = 1;                     // fail: the exit code
  int line = 0;                          // where it was written (1-based), for messages
  // The fault as a plan line: "kill rank=1 step=20".
  std::string describe() const;
};

class FaultPlan {
 public:
  // `source` names the text in error messages ("faults.txt", "RALLY_FAULTS").
  static Result<FaultPlan> parse(const std::string& text, const std::string& source);
  static Result<FaultPlan> fromFile(const std::string& path);
  // The plan in RALLY_FAULTS (faults separated by ';' or newlines); empty when it is unset.
  static Result<FaultPlan> fromEnvironment();

  const std::vector<Fault>& faults() const { return faults_; }
  bool empty() const { return faults_.empty(); }
  // The whole plan in its text form, one fault per line (what parse() reads back).
  std::string toText() const;

 private:
  std::vector<Fault> faults_;
};

std::string_view faultActionName(Fault::Action a);

}  // namespace rally
