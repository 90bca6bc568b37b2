// The agent's side of the progress watchdog (`rally run --progress-timeout T`): workers that use
// librally report their step, and whether they are waiting in a collective, over the node's local
// channel (a Unix datagram socket with an abstract name, passed to them as RALLY_PROGRESS_SOCKET).
// A worker that has, for T, neither begun a new step nor waited for others (in a collective, or
// re-forming the world) is hung (a deadlock, an endless loop: the process runs, so
// --hang-timeout's stopped-process check does not see it); the ranks blocked in a collective on
// it are waiting and are not blamed. Programs without librally send
// nothing and are never judged.
//
//   RALLY_ASSIGN_OR_RETURN(auto dog, ProgressWatchdog::open(Milliseconds(60'000)));
//   env["RALLY_PROGRESS_SOCKET"] = dog->socketName();
//   for (const auto& v : dog->check(running_pids)) kill(v.pid, SIGKILL);
//
// The sender of a report is known from the kernel (SCM_CREDENTIALS), and only the pids the agent
// passes to check() are judged. Thread-safety: one thread (the agent's loop).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally::agent {

class ProgressWatchdog {
 public:
  static Result<std::unique_ptr<ProgressWatchdog>> open(Milliseconds timeout);
  ~ProgressWatchdog();

  std::string socketName() const { return "@" + name_; }
  // How often workers report: a quarter of the timeout, between 50 ms and 1 s.
  Milliseconds reportInterval() const;

  struct Verdict {
    pid_t pid = 0;
    std::int64_t step = -1;
    Milliseconds still{0};  // how long its step stood still
  };
  // Reads the reports that arrived, then judges the `running` workers: each one hung is returned
  // once.
  std::vector<Verdict> check(const std::vector<pid_t>& running);

 private:
  using Clock = std::chrono::steady_clock;
  ProgressWatchdog() = default;
  void drain();

  struct Seen {
    std::int64_t step = -1;
    bool waiting = false;
    Clock::time_point changed, reported;
    bool judged = false;
  };
  Milliseconds timeout_{0};
  int fd_ = -1;
  std::string name_;
  std::map<pid_t, Seen> seen_;
};

}  // namespace rally::agent
