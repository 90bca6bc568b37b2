// A Work that some thread completes (a backend's worker, or the caller at once for an operation
// that failed before it started): the host backends' (Gloo, MPI) Work.
//
//   auto w = std::make_shared<CompletableWork>("allreduce(4 x f32, sum)");
//   worker.post([w] { w->complete(doIt()); });
//   return w;  // the caller's wait() returns doIt()'s status
//
// Thread-safety: markStarted() and complete() once each, from any thread; wait(), done() and
// observe() from any.
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
  // One observer: a second is refused. Completion is told to it before wait() returns.
  bool observe(Observer observer) override {
    bool started, completed;
    {
      std::lock_guard lock(mu_);
      if (observed_) return false;
      observed_ = true;
      observer_ = std::move(observer);
      started = started_;
      completed = completing_;  // status_ is final once completing_ is set
    }
    if (started && observer_.started) observer_.started();
    if (completed && observer_.completed) observer_.completed(status_);
    return true;
  }
  // The backend's worker began the operation (optional: for observers' timing).
  void markStarted() {
    std::function<void()> notify;
    {
      std::lock_guard lock(mu_);
      if (started_ || completing_) return;
      started_ = true;
      notify = observer_.started;
    }
    if (notify) notify();
  }
  void complete(Status s) {
    std::function<void(const Status&)> notify;
    {
      std::lock_guard lock(mu_);
      status_ = std::move(s);
      completing_ = true;
      notify = observer_.completed;
    }
    // The observer first, so that whoever wait() wakes finds the operation's end recorded.
    if (notify) notify(status_);
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
  }
  const std::string& what() const { return what_; }

 private:
  const std::string what_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false;
  bool completing_ = false;  // complete() was called: status_ is final (done_ follows)
  bool done_ = false;
  bool observed_ = false;
  Status status_;
  Observer observer_;
};

}  // namespace rally::collectives::internal
