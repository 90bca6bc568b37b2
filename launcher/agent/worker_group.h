// The workers of one node: spawned, watched and stopped as a group.
//
//   RALLY_ASSIGN_OR_RETURN(auto group, WorkerGroup::start(specs, [&](const WorkerExit& e) {...}));
//   ...
//   group->stop(SIGTERM, 30s);  // forward, wait the grace period, then SIGKILL what is left
//
// Guarantees: each worker runs in its own process group and gets SIGKILL if the thread that spawned
// it dies (PR_SET_PDEATHSIG; spawn from a long-lived thread); exits are seen at once through
// pidfds, not by polling; every wait is bounded; every child is reaped and every worker's process
// group is killed before the group is destroyed, so no zombies and no orphans remain.
//
// Output: each worker's stdout and stderr go through the agent, to the console (optionally with a
// "[role0]:" prefix, and only for the ranks a filter allows) and/or to log files; the last lines of
// stderr are kept for failure reports.
//
// Thread-safety: start/stop/signalAll from the owning thread; on_exit runs on the group's I/O
// thread, after the exit is recorded (exits() and running() already reflect it).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally::agent {

struct WorkerSpec {
  int local_rank = 0;
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;  // the worker's whole environment
  bool stdout_to_console = true;
  bool stderr_to_console = true;
  std::string stdout_file;  // empty: none
  std::string stderr_file;
  std::string console_prefix;  // e.g. "[default0]:"
};

struct WorkerExit {
  int local_rank = 0;
  pid_t pid = 0;
  int exit_code = 0;        // when exited normally
  int signal = 0;           // when killed by a signal
  bool oom_killed = false;  // the kernel's OOM killer counted a kill when this worker died
  std::chrono::system_clock::time_point when;
  std::vector<std::string> stderr_tail;
  bool ok() const { return signal == 0 && exit_code == 0; }
  // "exit code 3", "signal SIGKILL (killed by the kernel's OOM killer)".
  std::string describe() const;
};

class WorkerGroup {
 public:
  using OnExit = std::function<void(const WorkerExit&)>;

  // Spawns every worker. A program that cannot be executed fails the start with its name and the
  // reason, and nothing is left running.
  static Result<std::unique_ptr<WorkerGroup>> start(std::vector<WorkerSpec> specs, OnExit on_exit);
  ~WorkerGroup();

  // Sends `sig` to every running worker's process group.
  void signalAll(int sig);
  // Sends `sig`, waits up to `grace` for every worker to exit, then SIGKILLs the process groups and
  // waits (bounded) until all are reaped.
  void stop(int sig, Milliseconds grace);
  // Waits up to `timeout` for every worker to have exited; true if they have.
  bool waitAll(Milliseconds timeout);

  std::vector<pid_t> pids() const;
  // The running workers: (pid, local rank).
  std::vector<std::pair<pid_t, int>> localRanks() const;
  std::vector<WorkerExit> exits() const;
  size_t running() const;

 private:
  struct Worker;
  WorkerGroup() = default;
  void ioLoop();
  void handleOutput(Worker& w, int fd, bool is_err);
  void reap(Worker& w);

  std::vector<std::unique_ptr<Worker>> workers_;
  OnExit on_exit_;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;  // eventfd that ends the I/O loop
  std::thread io_;
  mutable std::mutex mu_;
  std::condition_variable exited_cv_;
  std::vector<WorkerExit> exits_;
  std::optional<long long> oom_kills_at_start_;
};

// The kernel's OOM-kill count for this process's cgroup (v2 memory.events or v1
// memory.oom_control), if readable.
std::optional<long long> oomKillCount();

}  // namespace rally::agent
