#include "runtime/faults/fault_injector.h"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

namespace rally {
namespace {

void announce(const Fault& f) {
  // Straight to stderr, unbuffered: the process may die right after.
  const std::string line =
      fmt::format("rally: fault plan: {} (pid {})\n", f.describe(), ::getpid());
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace

FaultActions FaultActions::onThisProcess() {
  return {
      .kill = [](const Fault& f) { announce(f), ::raise(SIGKILL); },
      .kill_node =
          [](const Fault& f) {
            announce(f);
            if (const pid_t agent = ::getppid(); agent > 1) ::kill(agent, SIGKILL);
            ::raise(SIGKILL);
          },
      .hang = [](const Fault& f) { announce(f), ::raise(SIGSTOP); },
      .delay = [](const Fault& f) { announce(f), std::this_thread::sleep_for(f.delay); },
      .fail = [](const Fault& f) { announce(f), std::fflush(nullptr), ::_exit(f.exit_code); },
      .stall =
          [](const Fault& f) {
            announce(f);
            for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
          },
  };
}

FaultInjector::FaultInjector(FaultPlan plan, std::shared_ptr<FiredFaults> fired,
                             FaultActions actions)
    : plan_(std::move(plan)), fired_(std::move(fired)), actions_(std::move(actions)) {}

Status FaultInjector::atStep(int rank, std::int64_t step) {
  const auto& faults = plan_.faults();
  for (size_t i = 0; i < faults.size(); ++i) {
    const Fault& f = faults[i];
    if (f.target == Fault::Target::kRank && f.index == rank && f.step && *f.step <= step) {
      RALLY_RETURN_IF_ERROR(fire(i));
    }
  }
  return okStatus();
}

Status FaultInjector::atRecovery(int rank, std::int64_t recovery) {
  const auto& faults = plan_.faults();
  for (size_t i = 0; i < faults.size(); ++i) {
    const Fault& f = faults[i];
    if (f.target == Fault::Target::kRank && f.index == rank && f.recovery &&
        *f.recovery == recovery) {
      RALLY_RETURN_IF_ERROR(fire(i));
    }
  }
  return okStatus();
}

Status FaultInjector::beforeCommit(int rank, std::int64_t commit,
                                   const std::function<bool()>& moved) {
  const auto& faults = plan_.faults();
  for (size_t i = 0; i < faults.size(); ++i) {
    const Fault& f = faults[i];
    if (f.target != Fault::Target::kRank || f.index != rank || !f.commit || *f.commit != commit ||
        f.action != Fault::Action::kDelay || done_here_.count(i) != 0) {
      continue;
    }
    auto mine = fired_->claim(i);
    RALLY_RETURN_IF_ERROR(mine.status()) << "claiming fault '" << f.describe() << "'";
    done_here_.insert(i);
    if (!*mine) continue;
    announce(f);
    const auto until = std::chrono::steady_clock::now() + f.delay;
    while (std::chrono::steady_clock::now() < until) {
      if (moved()) {
        return aborted(fmt::format("the job moved on while '{}' held this rank before commit {}",
                                   f.describe(), commit));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  return okStatus();
}

Status FaultInjector::afterCommit(int rank, int node, int local_rank, std::int64_t commit) {
  const auto& faults = plan_.faults();
  for (size_t i = 0; i < faults.size(); ++i) {
    const Fault& f = faults[i];
    if (!f.commit || *f.commit != commit || f.action == Fault::Action::kDelay) continue;
    if (f.target == Fault::Target::kRank && f.index == rank) {
      RALLY_RETURN_IF_ERROR(fire(i));
    } else if (f.target == Fault::Target::kNode && f.index == node && local_rank == 0) {
      if (done_here_.count(i) != 0) continue;
      auto mine = fired_->claim(i);
      RALLY_RETURN_IF_ERROR(mine.status()) << "claiming fault '" << f.describe() << "'";
      done_here_.insert(i);
      if (*mine) actions_.kill_node(f);
    }
  }
  return okStatus();
}

Status FaultInjector::fire(size_t i) {
  if (done_here_.count(i) != 0) return okStatus();
  const Fault& f = plan_.faults()[i];
  auto mine = fired_->claim(i);
  RALLY_RETURN_IF_ERROR(mine.status()) << "claiming fault '" << f.describe() << "'";
  done_here_.insert(i);
  if (!*mine) return okStatus();  // fired before, by an earlier incarnation of this rank
  switch (f.action) {
    case Fault::Action::kKill:
      actions_.kill(f);
      break;
    case Fault::Action::kHang:
      actions_.hang(f);
      break;
    case Fault::Action::kDelay:
      actions_.delay(f);
      break;
    case Fault::Action::kFail:
      actions_.fail(f);
      break;
    case Fault::Action::kStall:
      actions_.stall(f);
      break;
  }
  return okStatus();
}

}  // namespace rally
