// Watches the job's generation: the coordinator pushes every change (round formed, re-forming after
// a failure, closed) the moment it happens. Workers use it to abort their collectives at once.
//
//   RALLY_ASSIGN_OR_RETURN(auto watcher, GenerationWatcher::start(conn));
//   RALLY_ASSIGN_OR_RETURN(auto ev, watcher->waitFor(
//       [&](const auto& e) { return e.generation() > my_generation; }, 30s));
//
// Thread-safety: all methods are thread-safe; on_event runs on a gRPC thread and must not block.
#pragma once

#include <atomic>
#include <functional>
#include <memory>

#include "runtime/rendezvous/coordinator_client.h"
#include "runtime/rendezvous/internal/inbox.h"

namespace rally::rendezvous {

class GenerationWatcher {
 public:
  using OnEvent = std::function<void(const rally::v1::GenerationEvent&)>;
  using OnEnd = std::function<void(const Status&)>;
  // The first event is the current state. If `on_event` is set, events go there instead of the
  // inbox that next()/waitFor() read. `on_end` is told once when the stream ends (the coordinator
  // unreachable, or this watcher destroyed: then Aborted/Cancelled); it runs on a gRPC thread.
  static Result<std::unique_ptr<GenerationWatcher>> start(
      std::shared_ptr<CoordinatorConnection> conn, OnEvent on_event = {}, OnEnd on_end = {});
  ~GenerationWatcher();
  GenerationWatcher(const GenerationWatcher&) = delete;
  GenerationWatcher& operator=(const GenerationWatcher&) = delete;

  // The newest generation seen so far.
  std::uint64_t generation() const { return latest_.load(); }
  Result<rally::v1::GenerationEvent> next(Milliseconds timeout);
  Result<rally::v1::GenerationEvent> waitFor(
      const std::function<bool(const rally::v1::GenerationEvent&)>& pred, Milliseconds timeout);
  std::optional<Status> endStatus() const { return inbox_.endStatus(); }

 private:
  class Reactor;
  GenerationWatcher(std::shared_ptr<CoordinatorConnection> conn, OnEvent on_event, OnEnd on_end);

  std::shared_ptr<CoordinatorConnection> conn_;
  OnEvent on_event_;
  OnEnd on_end_;
  std::atomic<std::uint64_t> latest_{0};
  internal::Inbox<rally::v1::GenerationEvent> inbox_;
  internal::DoneLatch done_;
  std::unique_ptr<Reactor> reactor_;
};

}  // namespace rally::rendezvous
