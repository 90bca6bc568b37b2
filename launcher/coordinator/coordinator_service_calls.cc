// The coordinator's unary calls and the generation watch: the key-value store and GetRound.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "launcher/coordinator/coordinator_service.h"
#include "launcher/coordinator/internal/reactors.h"
#include "runtime/rendezvous/grpc_status.h"

namespace rally::coordinator {

namespace v1 = rally::v1;
using rendezvous::toGrpcStatus;

// Runs one store operation under the service's lock and finishes the call with its status (once
// the holders have what it changed in the job scope). A job-scope call that comes while the scope
// waits for the holders' copies runs when they are in: `fn` captures the request and response by
// pointer, which gRPC keeps until the call is finished.
grpc::ServerUnaryReactor* CoordinatorService::unaryCall(grpc::CallbackServerContext* ctx,
                                                        bool job_scope,
                                                        std::function<Status()> fn) {
  auto* reactor = ctx->DefaultReactor();
  const grpc::Status admitted = admit(ctx);
  if (!admitted.ok()) {
    reactor->Finish(admitted);
    return reactor;
  }
  const auto caller_deadline = ctx->deadline();
  runLocked([&] {
    if (job_scope && !job_scope_open_) {
      gated_calls_.push_back([this, ctx, reactor, caller_deadline, fn = std::move(fn)] {
        // Its caller gave up meanwhile (its deadline passed, or it exited): not made, as it was
        // not answered (a fault claimed that way would never fire).
        if (ctx->IsCancelled()) {
          deferred_.push_back([reactor] {
            reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                                         "the caller gave up while the call waited for the "
                                         "holders' copies of the job scope"));
          });
          return;
        }
        callLocked(reactor, caller_deadline, fn);
      });
      return;
    }
    callLocked(reactor, caller_deadline, fn);
  });
  return reactor;
}

void CoordinatorService::callLocked(grpc::ServerUnaryReactor* reactor,
                                    std::chrono::system_clock::time_point caller_deadline,
                                    const std::function<Status()>& fn) {
  grpc::Status status;
  if (shutting_down_) {
    // It came in before the shutdown (a handover, maybe): not made here, where no holder would
    // have it.
    status = shuttingDownStatusLocked();
  } else {
    status = toGrpcStatus(fn());
    // A change of the job scope is answered once the holders have it, waiting one heartbeat
    // interval at most, and at most half of what is left of the caller's deadline (so that it is
    // answered, rather than timed out after it was made). Counted from now: a call held for the
    // holders' copies runs later than it came.
    TimePoint ack_by = Clock::now() + options_.heartbeat_interval;
    if (caller_deadline != std::chrono::system_clock::time_point::max()) {
      const auto left = caller_deadline - std::chrono::system_clock::now();
      if (left / 2 < options_.heartbeat_interval) {
        ack_by = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::max(left / 2, decltype(left)::zero()));
      }
    }
    if (replicateLocked(reactor, status, ack_by)) return;
  }
  deferred_.push_back([reactor, status] { reactor->Finish(status); });
}

grpc::Status CoordinatorService::shuttingDownStatusLocked() const {
  const std::string why = fmt::format("the coordinator is shutting down: {}", shutdown_reason_);
  // Handing over: the job goes on at a successor, where the caller may send the call again (a
  // retarget); otherwise the coordinator said it is going, and the call is not to be retried here.
  return shutdown_handover_ ? grpc::Status(grpc::StatusCode::UNAVAILABLE, why)
                            : rendezvous::finalStatus(grpc::StatusCode::UNAVAILABLE, why);
}

grpc::Status CoordinatorService::admit(grpc::CallbackServerContext* ctx) {
  grpc::Status s = checkCall(ctx);
  if (!s.ok()) return s;
  std::lock_guard lock(mu_);
  if (shutting_down_) return shuttingDownStatusLocked();
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* CoordinatorService::Set(grpc::CallbackServerContext* ctx,
                                                  const v1::SetRequest* req, v1::SetResponse*) {
  return unaryCall(ctx, req->generation() == 0,
                   [this, req] { return kv_.set(req->generation(), req->key(), req->value()); });
}

grpc::ServerUnaryReactor* CoordinatorService::Get(grpc::CallbackServerContext* ctx,
                                                  const v1::GetRequest* req,
                                                  v1::GetResponse* resp) {
  return unaryCall(ctx, req->generation() == 0, [this, req, resp]() -> Status {
    RALLY_ASSIGN_OR_RETURN(auto value, kv_.get(req->generation(), req->key()));
    resp->set_found(value.has_value());
    if (value) resp->set_value(std::move(*value));
    return okStatus();
  });
}

grpc::ServerUnaryReactor* CoordinatorService::Add(grpc::CallbackServerContext* ctx,
                                                  const v1::AddRequest* req,
                                                  v1::AddResponse* resp) {
  return unaryCall(ctx, req->generation() == 0, [this, req, resp]() -> Status {
    RALLY_ASSIGN_OR_RETURN(const std::int64_t value,
                           kv_.add(req->generation(), req->key(), req->delta()));
    resp->set_value(value);
    return okStatus();
  });
}

grpc::ServerUnaryReactor* CoordinatorService::CompareAndSet(grpc::CallbackServerContext* ctx,
                                                            const v1::CompareAndSetRequest* req,
                                                            v1::CompareAndSetResponse* resp) {
  return unaryCall(ctx, req->generation() == 0, [this, req, resp]() -> Status {
    RALLY_ASSIGN_OR_RETURN(CasResult r,
                           kv_.compareAndSet(req->generation(), req->key(), req->expect_present(),
                                             req->expected(), req->desired()));
    resp->set_swapped(r.swapped);
    resp->set_present(r.present);
    resp->set_value(std::move(r.value));
    return okStatus();
  });
}

grpc::ServerUnaryReactor* CoordinatorService::Delete(grpc::CallbackServerContext* ctx,
                                                     const v1::DeleteRequest* req,
                                                     v1::DeleteResponse* resp) {
  return unaryCall(ctx, req->generation() == 0, [this, req, resp]() -> Status {
    RALLY_ASSIGN_OR_RETURN(const bool existed, kv_.remove(req->generation(), req->key()));
    resp->set_existed(existed);
    return okStatus();
  });
}

grpc::ServerUnaryReactor* CoordinatorService::List(grpc::CallbackServerContext* ctx,
                                                   const v1::ListRequest* req,
                                                   v1::ListResponse* resp) {
  return unaryCall(ctx, req->generation() == 0, [this, req, resp]() -> Status {
    RALLY_ASSIGN_OR_RETURN(
        ListResult r, kv_.list(req->generation(), req->prefix(), req->start_after(), req->limit()));
    for (auto& k : r.keys) resp->add_keys(std::move(k));
    resp->set_more(r.more);
    return okStatus();
  });
}

grpc::ServerUnaryReactor* CoordinatorService::GetRound(grpc::CallbackServerContext* ctx,
                                                       const v1::GetRoundRequest*,
                                                       v1::RoundInfo* resp) {
  return unaryCall(ctx, false, [this, resp]() -> Status {
    const RoundSnapshot snap = rendezvous_.snapshot();
    resp->set_generation(snap.generation);
    resp->set_state(currentGenerationLocked().state());
    resp->set_waiting(snap.waiting);
    resp->set_job_id(snap.job_id);
    for (const Member& m : snap.members) fillMember(m, resp->add_members());
    return okStatus();
  });
}

grpc::ServerUnaryReactor* CoordinatorService::Wait(grpc::CallbackServerContext* ctx,
                                                   const v1::WaitRequest* req, v1::WaitResponse*) {
  auto* reactor = new WaitReactor(this);
  const grpc::Status admitted = admit(ctx);
  if (!admitted.ok()) {
    reactor->Finish(admitted);
    return reactor;
  }
  const Milliseconds timeout =
      req->timeout_ms() != 0 ? Milliseconds(req->timeout_ms()) : options_.default_wait_timeout;
  std::vector<std::string> keys(req->keys().begin(), req->keys().end());
  const std::string what =
      fmt::format("keys [{}] in generation {}", fmt::join(keys, ", "), req->generation());
  runLocked([&] {
    auto id = kv_.addWaiter(req->generation(), std::move(keys), [this, reactor](Status s) {
      // Runs under the lock: the store calls back from inside the operation that decided.
      grpc::Status g = shutting_down_
                           ? rendezvous::finalStatus(grpc::StatusCode::UNAVAILABLE, s.message())
                           : toGrpcStatus(s);
      deferred_.push_back([reactor, g] { reactor->Finish(g); });
    });
    if (!id.ok()) {
      deferred_.push_back([reactor, g = toGrpcStatus(id.status())] { reactor->Finish(g); });
      return;
    }
    if (*id == 0) return;  // every key was there
    reactor->waiter_ = *id;
    wait_deadlines_.push(WaitDeadline{Clock::now() + timeout, *id, timeout, what});
    timer_cv_.notify_one();
  });
  return reactor;
}

grpc::ServerWriteReactor<v1::GenerationEvent>* CoordinatorService::WatchGeneration(
    grpc::CallbackServerContext* ctx, const v1::WatchGenerationRequest*) {
  auto watch = std::make_shared<WatchReactor>(this);
  watch->begin();
  const grpc::Status admitted = admit(ctx);
  if (!admitted.ok()) {
    watch->finishAfterQueued(admitted);
    return watch.get();
  }
  runLocked([&] {
    watchers_.insert(watch);
    watch->enqueue(currentGenerationLocked());
    deferred_.push_back([watch] { watch->kick(); });
  });
  return watch.get();
}

void CoordinatorService::onWatchEnded(WatchReactor* watch) {
  runLocked([&] {
    for (auto it = watchers_.begin(); it != watchers_.end(); ++it) {
      if (it->get() == watch) {
        watchers_.erase(it);
        break;
      }
    }
  });
}

}  // namespace rally::coordinator
