// The worker's side of the progress watchdog (`rally run --progress-timeout`): the training
// thread's step (ElasticRun::atStep) and whether it is waiting in a collective, reported to the
// node's agent over its local channel, a Unix datagram socket (RALLY_PROGRESS_SOCKET, an abstract
// name) every RALLY_PROGRESS_INTERVAL. The agent kills a worker whose step stands still while it
// is not waiting: a rank waiting for a stuck peer is not the one to blame.
//
// Thread-safety: ProgressTracker is atomics; the reporter runs its own thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "collectives/communicator.h"
#include "kernels/base/status.h"

namespace rally::internal {

struct ProgressTracker {
  std::atomic<std::int64_t> step{-1};  // -1: no step begun yet
  std::atomic<int> waiting{0};         // threads inside Work::wait() of a tracked communicator
};

// A communicator that counts the callers blocked in its operations' wait() (and its
// sub-communicators' too); everything else is forwarded.
std::unique_ptr<collectives::Communicator> trackWaits(
    std::unique_ptr<collectives::Communicator> inner, std::shared_ptr<ProgressTracker> tracker);

// Sends "STEP WAITING\n" datagrams to the agent's socket until destroyed. The agent learns the
// sender's pid from the kernel (SCM_CREDENTIALS), not from the message.
class ProgressReporter {
 public:
  static Result<std::unique_ptr<ProgressReporter>> start(const std::string& socket_name,
                                                         Milliseconds interval,
                                                         std::shared_ptr<ProgressTracker> tracker);
  ~ProgressReporter();

 private:
  ProgressReporter() = default;
  void loop();
  int fd_ = -1;
  Milliseconds interval_{1000};
  std::shared_ptr<ProgressTracker> tracker_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace rally::internal
