// The agent loop's periodic checks: admission of waiting nodes at a commit point, the fault
// plan's time-triggered faults, and hung workers (stopped too long, or no progress).
#include <fmt/format.h>
#include <signal.h>

#include <fstream>

#include "kernels/base/logging.h"
#include "launcher/agent/internal/agent_impl.h"

namespace rally::agent {

char processState(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string stat;
  if (!std::getline(in, stat)) return 0;
  const auto paren = stat.rfind(')');  // the command name may hold spaces and parentheses
  return paren != std::string::npos && paren + 2 < stat.size() ? stat[paren + 2] : 0;
}

void Agent::Impl::checkAdmission() {
  if (!admit_pending_since_) return;
  // Programs that never mark a commit point (no ElasticRun::commit) are admitted after this.
  constexpr Milliseconds kAdmitWait{30'000};
  auto ready = store_->get("admit/ready");
  const bool at_commit = ready.ok() && ready->has_value() && **ready == std::to_string(generation_);
  if (!at_commit && Clock::now() - *admit_pending_since_ < kAdmitWait) return;
  admit_pending_since_.reset();
  session_->requestReform(fmt::format("admit {} waiting node(s){}", admit_waiting_,
                                      at_commit ? " at a commit point" : ""));
}

void Agent::Impl::applyTimedFaults() {
  if (!fault_plan_ || !round_ || !group_ || !workers_started_at_) return;
  const auto elapsed = Clock::now() - *workers_started_at_;
  const auto& faults = fault_plan_->faults();
  for (size_t i = 0; i < faults.size(); ++i) {
    const Fault& f = faults[i];
    if (!f.time || elapsed < *f.time || timed_faults_done_.count(i) != 0) continue;
    const int first = static_cast<int>(round_->rank_offset());
    const bool here = f.target == Fault::Target::kNode
                          ? f.index == static_cast<int>(round_->node_rank())
                          : f.index >= first && f.index < first + o_.local_world_size;
    if (!here) continue;
    // The target: this node, or the newest running process of that local rank.
    const int lr = f.index - first;
    std::optional<pid_t> pid;
    std::vector<pid_t> running;
    for (const auto& [p, l] : group_->localRanks()) {
      running.push_back(p);
      if (l == lr) pid = p;
    }
    for (const auto& g : replacements_) {
      for (const auto& [p, l] : g->localRanks()) {
        running.push_back(p);
        if (l == lr) pid = p;
      }
    }
    if (f.target == Fault::Target::kRank && !pid) continue;  // between processes: try again
    timed_faults_done_.insert(i);
    // Once per job, as the workers' step faults: claimed in the coordinator's store.
    auto claim = rendezvous::StoreClient(conn_)
                     .scoped("rally/faults/fired/", 0)
                     .compareAndSet(std::to_string(i), std::nullopt, node_id_);
    if (!claim.ok()) {
      log_->warn("fault plan: '{}' not applied: {}", f.describe(), claim.status().message());
      continue;
    }
    if (!claim->swapped) continue;
    log_->warn("fault plan: {}", f.describe());
    events_->write("fault_injected", {{"fault", f.describe()}});
    if (f.target == Fault::Target::kNode) {
      // The whole node, as a crash would: every worker's process group, then this agent.
      for (pid_t p : running) ::kill(-p, SIGKILL);
      ::raise(SIGKILL);
    }
    switch (f.action) {
      case Fault::Action::kKill:
        ::kill(*pid, SIGKILL);
        break;
      case Fault::Action::kHang:
        ::kill(*pid, SIGSTOP);
        break;
      case Fault::Action::kDelay:
        ::kill(*pid, SIGSTOP);
        resume_at_[*pid] = Clock::now() + f.delay;
        break;
      case Fault::Action::kFail:
        ::kill(*pid, SIGTERM);  // from outside, a failure is a signal; the program picks its code
        break;
      case Fault::Action::kStall:  // refused with time= when the plan is read: inside workers only
        break;
    }
  }
  for (auto it = resume_at_.begin(); it != resume_at_.end();) {
    if (Clock::now() >= it->second) {
      if (processState(it->first) != 0) ::kill(it->first, SIGCONT);
      it = resume_at_.erase(it);
    } else {
      ++it;
    }
  }
}

std::vector<pid_t> Agent::Impl::runningWorkers() const {
  std::vector<pid_t> pids;  // running workers only: an exited worker's pid may be reused
  if (!group_) return pids;
  for (const auto& [pid, lr] : group_->localRanks()) pids.push_back(pid);
  for (const auto& g : replacements_) {
    for (const auto& [pid, lr] : g->localRanks()) pids.push_back(pid);
  }
  return pids;
}

void Agent::Impl::checkHungWorkers() {
  if (watchdog_ && group_) {
    for (const auto& v : watchdog_->check(runningWorkers())) {
      const std::string why = fmt::format(
          "hung: no progress for {} at step {} while not waiting in a collective "
          "(--progress-timeout {}); killed by its agent",
          formatDuration(v.still), v.step, formatDuration(tunable("progress_timeout")));
      log_->error("worker pid {}: {}", v.pid, why);
      events_->write("worker_hung",
                     {{"pid", v.pid}, {"step", v.step}, {"no_progress_ms", v.still.count()}});
      stalled_killed_[v.pid] = why;
      ::kill(-v.pid, SIGKILL);  // its process group
      ::kill(v.pid, SIGKILL);
    }
  }
  const Milliseconds limit = tunable("hang_timeout");
  if (limit.count() <= 0 || !group_) return;
  const std::vector<pid_t> pids = runningWorkers();
  const auto now = Clock::now();
  std::map<pid_t, Clock::time_point> still;
  for (pid_t pid : pids) {
    if (resume_at_.count(pid) != 0) continue;  // stopped on purpose by a delay fault
    if (processState(pid) != 'T') continue;    // running, sleeping, exited ('t': a debugger's)
    auto it = stopped_since_.find(pid);
    const auto since = it != stopped_since_.end() ? it->second : now;
    still[pid] = since;
    const auto stopped = std::chrono::duration_cast<Milliseconds>(now - since);
    if (stopped >= limit && hung_killed_.count(pid) == 0) {
      hung_killed_[pid] = stopped;
      log_->error(
          "worker pid {} has been stopped for {} (--hang-timeout {}): it is hung; killing "
          "it",
          pid, formatDuration(stopped), formatDuration(limit));
      events_->write("worker_hung", {{"pid", pid}, {"stopped_ms", stopped.count()}});
      ::kill(-pid, SIGKILL);  // its process group
      ::kill(pid, SIGKILL);
    }
  }
  stopped_since_ = std::move(still);
}

}  // namespace rally::agent
