// An ordered inbox of messages from a client stream, with blocking reads that have deadlines, and
// the stream's end status once it ends. Shared by AgentSession and GenerationWatcher.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally::rendezvous::internal {

// Set once by a gRPC reactor's OnDone as the very last thing it does; the owner's destructor waits
// for it before freeing the reactor. The signal happens under the lock, so once wait() returns the
// reactor touches nothing of the owner's again.
class DoneLatch {
 public:
  void signal() {
    std::lock_guard lock(mu_);
    done_ = true;
    cv_.notify_all();
  }
  bool waitFor(Milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return done_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
};

template <typename Msg>
class Inbox {
 public:
  void push(Msg m) {
    {
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(m));
    }
    cv_.notify_all();
  }

  void end(Status status) {
    {
      std::lock_guard lock(mu_);
      if (end_) return;
      end_ = std::move(status);
    }
    cv_.notify_all();
  }

  bool ended() const {
    std::lock_guard lock(mu_);
    return end_.has_value();
  }
  std::optional<Status> endStatus() const {
    std::lock_guard lock(mu_);
    return end_;
  }
  // Waits until the stream has ended, at most `timeout`; true if it has.
  bool waitEnded(Milliseconds timeout) const {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return end_.has_value(); });
  }

  // The next message; after the stream ended and every message was read, its end (an OK end is
  // reported as Unavailable "stream ended"); Timeout if nothing arrives within `timeout`.
  Result<Msg> next(Milliseconds timeout, std::string_view what) {
    return waitFor([](const Msg&) { return true; }, timeout, what);
  }

  // Reads and drops messages until one satisfies `pred`.
  Result<Msg> waitFor(const std::function<bool(const Msg&)>& pred, Milliseconds timeout,
                      std::string_view what) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::unique_lock lock(mu_);
    for (;;) {
      while (!queue_.empty()) {
        Msg m = std::move(queue_.front());
        queue_.pop_front();
        if (pred(m)) return m;
      }
      if (end_) {
        if (!end_->ok()) return *end_;
        return unavailable(fmt::format("{}: the stream ended", what));
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && queue_.empty() && !end_) {
        return timeoutError(
            fmt::format("{}: nothing arrived within {}", what, formatDuration(timeout)));
      }
    }
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::deque<Msg> queue_;
  std::optional<Status> end_;
};

}  // namespace rally::rendezvous::internal
