// A Work that some thread completes (a backend's worker, or the caller at once for an operation
// that failed before it started): the host backends' (Gloo, MPI) Work.
//
//   auto w = std::make_shared<CompletableWork>("allreduce(4 x f32, sum)");
//   worker.post([w] { w->complete(doIt()); });
//   return w;  // the caller's wait() returns doIt()'s status
//
// Thread-safety: complete() once, from any thread; wait() and done() from any.
#pragma once

#include <fmt/format.h>

#include <condition_variable>
#include <mutex>
#include <string>

#include "collectives/communicator.h"
#include "kernels/base/units.h"

namespace rally::collectives::internal {

class CompletableWork final : public Work {
 public:
  // `what` names the operation in a timeout's message.
  explicit CompletableWork(std::string what = "") : what_(std::move(what)) {}

  Status wait(Milliseconds timeout) override {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return done_; })) {
      return timeoutError(fmt::format("{} still running after {}", what_, formatDuration(timeout)));
    }
    return status_;
  }
  bool done() const override {
    std::lock_guard lock(mu_);
    return done_;
  }
  void complete(Status s) {
    {
      std::lock_guard lock(mu_);
      status_ = std::move(s);
      done_ = true;
    }
    cv_.notify_all();
  }
  const std::string& what() const { return what_; }

 private:
  const std::string what_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  Status status_;
};

}  // namespace rally::collectives::internal
