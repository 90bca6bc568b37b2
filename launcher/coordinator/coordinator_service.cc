#include "launcher/coordinator/coordinator_service.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "kernels/base/logging.h"
#include "launcher/coordinator/internal/reactors.h"
#include "runtime/rendezvous/grpc_status.h"

namespace rally::coordinator {

namespace v1 = rally::v1;
using internal::OutboundStream;
using rendezvous::toGrpcStatus;

namespace {

// Keys for coalescing queued messages (OutboundStream): a newer one replaces an unsent older one.
constexpr int kRoundKey = 1;    // RoundFormed and GenerationEvent: only the newest state matters
constexpr int kWaitingKey = 2;  // NodesWaiting: only the newest count matters

v1::GenerationEvent::State toProtoState(RoundState s) {
  switch (s) {
    case RoundState::kWaiting:
      return v1::GenerationEvent::WAITING;
    case RoundState::kFormed:
      return v1::GenerationEvent::FORMED;
    case RoundState::kReforming:
      return v1::GenerationEvent::REFORMING;
    case RoundState::kClosed:
      return v1::GenerationEvent::CLOSED;
  }
  return v1::GenerationEvent::STATE_UNSPECIFIED;
}

v1::GenerationEvent toProto(const GenerationEvent& e) {
  v1::GenerationEvent out;
  out.set_generation(e.generation);
  out.set_state(toProtoState(e.state));
  out.set_num_nodes(e.num_nodes);
  out.set_cause(e.cause);
  if (!e.failed_nodes.empty()) out.set_failed_node(e.failed_nodes.front());
  for (const auto& id : e.failed_nodes) out.add_failed_nodes(id);
  return out;
}

// Compares without an early exit, so the time taken does not reveal how much of a token matched
// (its length is not secret).
bool tokensEqual(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

// ---- Service ------------------------------------------------------------------------------------

CoordinatorService::CoordinatorService(CoordinatorOptions options)
    : options_(std::move(options)),
      log_(rally::log::get("rendezvous")),
      rendezvous_(options_.rendezvous),
      liveness_(options_.heartbeat_interval),
      kv_(options_.kv) {
  kv_.observeJobScope([this](const std::string& key, const std::string* value) {
    if (adopting_) return;  // adoptLocked keeps the copy's revision
    // The generation in the high bits: this coordinator's writes rank above those of the one it
    // took over from (whose generations were lower), even before its copies are adopted.
    job_revision_ = std::max(job_revision_ + 1, kv_.currentGeneration() << 32);
    KeyRevision& r = job_revisions_[key];
    r = KeyRevision{job_revision_, value == nullptr, true};
    v1::JobScopeEntry& e = job_changes_.emplace_back();
    e.set_key(key);
    if (value != nullptr) e.set_value(*value);
    e.set_deleted(value == nullptr);
    e.set_revision(r.revision);
  });
  if (const auto& t = options_.rendezvous.takeover) {
    // Generation t->generation ended with the lost coordinator: its keys and calls are refused
    // here, and watchers learn at once that the next one is re-forming.
    kv_.startGeneration(rendezvous_.generation());
    last_generation_event_ = GenerationEvent{rendezvous_.generation(), RoundState::kReforming,
                                             t->expected_nodes, t->cause, t->failed_nodes};
    log_->warn("took over job '{}' after generation {}: generation {} re-forming ({})",
               options_.rendezvous.job_id, t->generation, rendezvous_.generation(), t->cause);
    // The job scope as this node's agent held it: in before any call.
    for (const v1::JobScope& m : options_.job_scope_seed) {
      adoptLocked(options_.host_node_id, m);
    }
  } else if (options_.job_scope_grace > Milliseconds(0)) {
    // Maybe a restarted coordinator: job-scope calls wait for the holders' copies (or for the
    // first Join to show that this is a new job).
    job_scope_open_ = false;
    job_scope_gate_deadline_ = Clock::now() + options_.job_scope_grace;
  }
}

CoordinatorService::~CoordinatorService() {
  shutdown("the coordinator is stopping");
  if (timer_.joinable()) timer_.join();
  {
    std::lock_guard lock(delivery_mu_);
    delivery_stop_ = true;
  }
  delivery_cv_.notify_all();
  if (delivery_.joinable()) delivery_.join();
}

void CoordinatorService::start() {
  delivery_ = std::thread([this] { deliveryLoop(); });
  timer_ = std::thread([this] { timerLoop(); });
}

void CoordinatorService::deliveryLoop() {
  std::unique_lock lock(delivery_mu_);
  for (;;) {
    delivery_cv_.wait(lock, [&] { return delivery_stop_ || !delivery_queue_.empty(); });
    if (delivery_queue_.empty()) return;  // stopping, and everything was delivered
    Deferred work = std::move(delivery_queue_.front());
    delivery_queue_.pop_front();
    lock.unlock();
    for (auto& w : work) w();
    lock.lock();
  }
}

void CoordinatorService::runLocked(const std::function<void()>& fn) {
  Deferred work;
  {
    std::lock_guard lock(mu_);
    fn();
    work.swap(deferred_);
  }
  for (auto& w : work) w();
}

grpc::Status CoordinatorService::checkCall(grpc::CallbackServerContext* ctx) const {
  const auto& md = ctx->client_metadata();
  const auto it = md.find(std::string(rendezvous::kTokenMetadataKey));
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing job token: every call must carry the job's token (metadata "
                        "'x-rally-token'); give the client the coordinator's --token-file");
  }
  if (!tokensEqual(std::string_view(it->second.data(), it->second.size()), options_.token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "wrong job token: this coordinator serves another job, or the token file "
                        "differs from the coordinator's --token-file");
  }
  return grpc::Status::OK;
}

void CoordinatorService::shutdown(const std::string& reason, bool handover) {
  runLocked([&] {
    if (shutting_down_) return;
    shutting_down_ = true;
    shutdown_reason_ = reason;
    shutdown_handover_ = handover;
    if (timer_.joinable()) log_->info("shutting down: {}", reason);  // it was started
    v1::CoordinatorMessage msg;
    msg.mutable_shutdown()->set_reason(reason);
    msg.mutable_shutdown()->set_handover(handover);
    const grpc::Status gone = rendezvous::finalStatus(
        grpc::StatusCode::UNAVAILABLE, fmt::format("the coordinator shut down: {}", reason));
    for (const auto& s : sessions_) {
      s->enqueue(msg);
      deferred_.push_back([s, gone] { s->finishAfterQueued(gone); });
    }
    for (const auto& w : watchers_) deferred_.push_back([w, gone] { w->finishAfterQueued(gone); });
    // Writes waiting for holders: they were made here; the holders may or may not have them.
    for (auto& p : pending_acks_)
      deferred_.push_back([r = p.reactor, st = p.status] { r->Finish(st); });
    pending_acks_.clear();
    openJobScopeLocked("");  // the calls held answer that the coordinator shut down
    sessions_.clear();
    sessions_by_node_.clear();
    watchers_.clear();
    kv_.cancelAllWaiters(unavailable(fmt::format("the coordinator shut down: {}", reason)));
  });
  timer_cv_.notify_all();
}

CoordinatorStats CoordinatorService::stats() {
  std::lock_guard lock(mu_);
  size_t holders = 0, lagging = 0;
  for (const auto& [id, s] : sessions_by_node_) {
    holders += s->holder ? 1 : 0;
    lagging += s->holder && s->lagging ? 1 : 0;
  }
  return CoordinatorStats{rendezvous_.generation(),
                          rendezvous_.state(),
                          sessions_by_node_.size(),
                          watchers_.size(),
                          kv_.keyCount(),
                          kv_.waiterCount(),
                          job_revision_,
                          holders,
                          lagging,
                          gated_calls_.size()};
}

// ---- Sessions -----------------------------------------------------------------------------------

grpc::ServerBidiReactor<v1::AgentMessage, v1::CoordinatorMessage>* CoordinatorService::Session(
    grpc::CallbackServerContext* ctx) {
  auto session = std::make_shared<SessionReactor>(this);
  grpc::Status admitted = checkCall(ctx);
  if (admitted.ok()) {
    std::lock_guard lock(mu_);
    if (shutting_down_) {
      admitted = rendezvous::finalStatus(
          grpc::StatusCode::UNAVAILABLE,
          fmt::format("the coordinator is shutting down: {}", shutdown_reason_));
    } else {
      sessions_.insert(session);
    }
  }
  session->begin(admitted);
  return session.get();
}

void CoordinatorService::onAgentMessage(const std::shared_ptr<SessionReactor>& session,
                                        const v1::AgentMessage& message) {
  runLocked([&] {
    if (sessions_.count(session) == 0) return;  // already dropped
    const TimePoint now = Clock::now();
    const bool joined = !session->node_id.empty();
    if (message.kind_case() != v1::AgentMessage::kJoin && !joined) {
      dropSession(session, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                        "the first message on a session must be a Join"));
      return;
    }
    Events events;
    switch (message.kind_case()) {
      case v1::AgentMessage::kJoin:
        handleJoin(session, message.join());
        return;
      case v1::AgentMessage::kHeartbeat:
        liveness_.beat(session->node_id, now);
        return;
      case v1::AgentMessage::kJobScopeAck:
        acknowledgedLocked(session.get(), message.job_scope_ack().revision());
        return;
      case v1::AgentMessage::kJobScope:
        if (!session->rejoined) {
          log_->warn(
              "job scope: ignored a copy from node '{}', which did not rejoin after a lost "
              "coordinator (only such nodes send one)",
              session->node_id);
          return;
        }
        adoptLocked(session->node_id, message.job_scope());
        copies_expected_.insert(message.job_scope().holders().begin(),
                                message.job_scope().holders().end());
        if (message.job_scope().complete()) copies_in_.insert(session->node_id);
        if (message.job_scope().complete() && !job_scope_open_) {
          const std::vector<std::string> missing = missingCopiesLocked();
          if (missing.empty()) {
            openJobScopeLocked(
                fmt::format("the copy of node '{}' is in{}", session->node_id,
                            copies_in_.size() > 1 ? ", the last of the holders'" : ""));
          } else {
            log_->info(
                "job scope: the copy of node '{}' is in; waiting for those of {} (the holders it "
                "names) until the grace ends",
                session->node_id, fmt::join(missing, ", "));
          }
        }
        return;
      case v1::AgentMessage::kLeave: {
        const std::string id = session->node_id;
        log_->info("node '{}' left: {}", id, message.leave().reason());
        dropSession(session, grpc::Status::OK);
        rendezvous_.leave(id, fmt::format("left: {}", message.leave().reason()), false, now,
                          &events);
        break;
      }
      case v1::AgentMessage::kRequestReform: {
        const Status s = rendezvous_.requestReform(session->node_id,
                                                   message.request_reform().reason(), now, &events);
        if (!s.ok()) log_->debug("re-form ignored: {}", s.message());
        break;
      }
      case v1::AgentMessage::kClose: {
        const Status s = rendezvous_.close(session->node_id, message.close().reason(), &events);
        if (!s.ok()) log_->warn("close ignored: {}", s.message());
        break;
      }
      case v1::AgentMessage::KIND_NOT_SET:
        dropSession(session,
                    grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "agent message of no kind this coordinator knows: it speaks "
                                 "rally.v1 (join, heartbeat, leave, request_reform, close, "
                                 "job_scope, job_scope_ack); "
                                 "are the agent and the coordinator the same rally version?"));
        if (joined) {
          rendezvous_.leave(session->node_id, "lost: it sent an unknown message", true, now,
                            &events);
        }
        break;
    }
    deliver(std::move(events));
    timer_cv_.notify_one();
  });
}

void CoordinatorService::handleJoin(const std::shared_ptr<SessionReactor>& session,
                                    const v1::Join& join) {
  if (!session->node_id.empty()) {
    const std::string id = session->node_id;
    dropSession(session, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                      fmt::format("this stream already joined as node '{}': one "
                                                  "stream carries one node",
                                                  id)));
    Events events;
    rendezvous_.leave(id, "lost: it joined twice on one stream", true, Clock::now(), &events);
    deliver(std::move(events));
    return;
  }
  if (const std::string& e = join.standby_endpoint(); !e.empty()) {
    const auto colon = e.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == e.size() ||
        e.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
      const std::string why = fmt::format(
          "node '{}' gave standby endpoint '{}', which is not HOST:PORT", join.node_id(), e);
      log_->warn("join refused: {}", why);
      dropSession(session, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, why));
      return;
    }
  }
  const TimePoint now = Clock::now();
  NodeInfo info{join.node_id(),         join.job_id(),           join.min_nodes(),
                join.max_nodes(),       join.local_world_size(), join.address(),
                join.last_generation(), join.last_node_rank(),   join.last_num_nodes()};
  Events events;
  auto admitted = rendezvous_.join(info, now, &events);
  if (!admitted.ok()) {
    log_->warn("join refused: {}", admitted.status().message());
    dropSession(session, toGrpcStatus(admitted.status()));
    return;
  }
  session->node_id = info.node_id;
  session->rejoined = join.last_generation() > 0;
  session->keeps = join.keeps_job_scope();
  if (session->rejoined) {
    // A coordinator that resumes (or took over) a job: its writes rank above those of the
    // generations before, whatever copies come later.
    job_revision_ = std::max(job_revision_, (join.last_generation() + 1) << 32);
    if (!job_scope_open_ && !rejoin_seen_) {
      // Resuming: the holders' copies are on their way (each follows its holder's Join).
      rejoin_seen_ = true;
      job_scope_gate_deadline_ = now + options_.job_scope_grace;
      timer_cv_.notify_one();
    }
  }
  sessions_by_node_[info.node_id] = session;
  if (join.standby_endpoint().empty()) {
    standby_endpoints_.erase(info.node_id);
  } else {
    standby_endpoints_[info.node_id] = join.standby_endpoint();
  }
  liveness_.beat(info.node_id, now);
  log_->debug("node '{}' joined ({} worker(s), {})", info.node_id, info.local_world_size,
              admitted->waiting ? "held for the next round" : "gathering");
  v1::CoordinatorMessage welcome;
  auto* w = welcome.mutable_welcome();
  w->set_heartbeat_interval_ms(static_cast<std::uint64_t>(options_.heartbeat_interval.count()));
  w->set_generation(rendezvous_.generation());
  w->set_min_nodes(rendezvous_.minNodes());
  w->set_max_nodes(rendezvous_.maxNodes());
  w->set_waiting(admitted->waiting);
  session->enqueue(std::move(welcome));
  deferred_.push_back([session] { session->kick(); });
  deliver(std::move(events));
}

void CoordinatorService::dropSession(const std::shared_ptr<SessionReactor>& session,
                                     grpc::Status status) {
  stopWaitingForLocked(session.get());
  session->holder = false;
  if (!session->node_id.empty()) {
    auto it = sessions_by_node_.find(session->node_id);
    if (it != sessions_by_node_.end() && it->second == session) sessions_by_node_.erase(it);
    liveness_.remove(session->node_id);
  }
  sessions_.erase(session);
  deferred_.push_back([session, status] { session->finishAfterQueued(status); });
}

void CoordinatorService::onSessionEnded(const std::shared_ptr<SessionReactor>& session,
                                        const std::string& cause) {
  runLocked([&] {
    if (sessions_.count(session) == 0) return;
    sessions_.erase(session);
    stopWaitingForLocked(session.get());
    session->holder = false;
    if (session->node_id.empty()) return;
    auto it = sessions_by_node_.find(session->node_id);
    if (it == sessions_by_node_.end() || it->second != session) return;
    sessions_by_node_.erase(it);
    liveness_.remove(session->node_id);
    if (shutting_down_) return;
    log_->warn("node '{}' {}", session->node_id, cause);
    Events events;
    rendezvous_.leave(session->node_id, cause, true, Clock::now(), &events);
    deliver(std::move(events));
    timer_cv_.notify_one();
  });
}

// ---- Event delivery (under the lock)
// -------------------------------------------------------------

void CoordinatorService::fillMember(const Member& m, v1::RoundMember* out) const {
  out->set_node_id(m.node_id);
  out->set_node_rank(m.node_rank);
  out->set_local_world_size(m.local_world_size);
  out->set_address(m.address);
  if (auto it = standby_endpoints_.find(m.node_id); it != standby_endpoints_.end()) {
    out->set_standby_endpoint(it->second);
  }
}

void CoordinatorService::deliver(Events events) {
  auto& log = log_;
  // Members of a round formed in this batch learn of it (and its cause) from RoundFormed alone.
  std::unordered_map<std::uint64_t, const RoundFormedEvent*> formed_in_batch;
  for (const Event& event : events) {
    if (auto* formed = std::get_if<RoundFormedEvent>(&event)) {
      formed_in_batch[formed->generation] = formed;
    }
  }
  for (Event& event : events) {
    if (auto* formed = std::get_if<RoundFormedEvent>(&event)) {
      std::uint32_t world = 0;
      for (const Member& m : formed->members) world += m.local_world_size;
      const std::string master = formed->members.empty() ? "" : formed->members[0].address;
      kv_.startGeneration(formed->generation);
      current_members_.clear();
      v1::CoordinatorMessage msg;
      auto* r = msg.mutable_round_formed();
      r->set_generation(formed->generation);
      r->set_num_nodes(static_cast<std::uint32_t>(formed->members.size()));
      r->set_world_size(world);
      r->set_master_address(master);
      r->set_cause(formed->cause);
      for (const auto& id : formed->failed_nodes) r->add_failed_nodes(id);
      std::vector<std::string> holders;
      if (!options_.host_node_id.empty()) {
        r->set_coordinator_node(options_.host_node_id);
        // Members with a standby endpoint first (nodes that join later look for the coordinator
        // there), then others, each by node rank: all of the first, at least kSuccessors in all.
        std::vector<const Member*> standby, others;
        for (const Member& m : formed->members) {
          if (m.node_id == options_.host_node_id) continue;
          auto it = standby_endpoints_.find(m.node_id);
          (it != standby_endpoints_.end() ? standby : others).push_back(&m);
        }
        const size_t count = std::max(kSuccessors, standby.size());
        for (const Member* m : standby) fillMember(*m, r->add_successors());
        for (const Member* m : others) {
          if (static_cast<size_t>(r->successors_size()) >= count) break;
          fillMember(*m, r->add_successors());
        }
        for (const auto& m : r->successors()) holders.push_back(m.node_id());
      } else {
        // A standalone coordinator: its first nodes by node rank (that keep copies) hold the job
        // scope, for when it is restarted (it resumes with their copies).
        std::vector<const Member*> by_rank;
        for (const Member& m : formed->members) by_rank.push_back(&m);
        std::sort(by_rank.begin(), by_rank.end(),
                  [](const Member* a, const Member* b) { return a->node_rank < b->node_rank; });
        for (const Member* m : by_rank) {
          if (holders.size() == kSuccessors) break;
          auto it = sessions_by_node_.find(m->node_id);
          if (it != sessions_by_node_.end() && it->second->keeps) holders.push_back(m->node_id);
        }
      }
      // A round that no node rejoined: a new job, with no copies to wait for.
      if (!job_scope_open_ && !rejoin_seen_) openJobScopeLocked("");
      // Before RoundFormed on each stream: a new holder has its snapshot when it learns the round.
      setHoldersLocked(holders);
      std::uint32_t offset = 0;
      for (const Member& m : formed->members) {
        current_members_.insert(m.node_id);
        r->set_node_rank(m.node_rank);
        r->set_rank_offset(offset);
        offset += m.local_world_size;
        if (auto it = sessions_by_node_.find(m.node_id); it != sessions_by_node_.end()) {
          it->second->enqueue(msg, kRoundKey);
          deferred_.push_back([s = it->second] { s->kick(); });
        }
      }
      log->info("generation {}: round formed with {} node(s), {} worker(s) ({})",
                formed->generation, formed->members.size(), world, formed->cause);
    } else if (auto* gen = std::get_if<GenerationEvent>(&event)) {
      kv_.startGeneration(gen->generation);
      const RoundFormedEvent* formed_next = nullptr;
      if (gen->state == RoundState::kReforming) {
        current_members_.clear();
        log->warn("generation {}: re-forming ({})", gen->generation, gen->cause);
        if (auto it = formed_in_batch.find(gen->generation); it != formed_in_batch.end()) {
          formed_next = it->second;
        }
      }
      last_generation_event_ = *gen;
      broadcastGeneration(*gen, formed_next);
    } else if (auto* waiting = std::get_if<NodesWaitingEvent>(&event)) {
      v1::CoordinatorMessage msg;
      msg.mutable_nodes_waiting()->set_count(waiting->count);
      for (const auto& [id, s] : sessions_by_node_) {
        if (current_members_.count(id) == 0) continue;
        s->enqueue(msg, kWaitingKey);
        deferred_.push_back([s = s] { s->kick(); });
      }
    } else if (auto* dismiss = std::get_if<DismissEvent>(&event)) {
      auto it = sessions_by_node_.find(dismiss->node_id);
      if (it == sessions_by_node_.end()) continue;
      const auto session = it->second;
      v1::CoordinatorMessage msg;
      msg.mutable_shutdown()->set_reason(dismiss->reason);
      msg.mutable_shutdown()->set_job_failed(dismiss->job_failed);
      session->enqueue(std::move(msg));
      log->warn("node '{}' dismissed: {}", dismiss->node_id, dismiss->reason);
      dropSession(session, grpc::Status::OK);
    }
  }
}

void CoordinatorService::broadcastGeneration(const GenerationEvent& event,
                                             const RoundFormedEvent* formed_next) {
  v1::CoordinatorMessage msg;
  *msg.mutable_generation() = toProto(event);
  // Watchers first: they are the workers waiting to abort their collectives.
  for (const auto& w : watchers_) {
    w->enqueue(msg.generation(), kRoundKey);
    deferred_.push_back([w] { w->kick(); });
  }
  std::unordered_set<std::string> skip;
  if (formed_next != nullptr) {
    for (const Member& m : formed_next->members) skip.insert(m.node_id);
  }
  for (const auto& [id, s] : sessions_by_node_) {
    // Members of a formed round got RoundFormed; members of the next one will.
    if (event.state == RoundState::kFormed && current_members_.count(id) != 0) continue;
    if (skip.count(id) != 0) continue;
    s->enqueue(msg, kRoundKey);
    deferred_.push_back([s = s] { s->kick(); });
  }
}

v1::GenerationEvent CoordinatorService::currentGenerationLocked() const {
  GenerationEvent e = last_generation_event_;
  e.generation = rendezvous_.generation();
  e.state = rendezvous_.state();
  return toProto(e);
}

// ---- Timer --------------------------------------------------------------------------------------

void CoordinatorService::timerLoop() {
  std::unique_lock lock(mu_);
  while (!shutting_down_) {
    const TimePoint now = Clock::now();
    Events events;
    rendezvous_.tick(now, &events);
    // Every node found silent in this check leaves in one re-form: one broadcast, not one each.
    std::vector<Rendezvous::Departure> silent;
    const std::string silence = formatDuration(liveness_.timeout());
    const auto stalled_before = liveness_.stalled();
    const auto expired = liveness_.expired(now);
    if (const auto stall = liveness_.stalled() - stalled_before; stall > Clock::duration::zero()) {
      log_->info(
          "liveness checker stalled {}ms (a loaded or busy coordinator): not counted against nodes",
          std::chrono::duration_cast<Milliseconds>(stall).count());
    }
    for (const std::string& id : expired) {
      auto it = sessions_by_node_.find(id);
      if (it == sessions_by_node_.end()) continue;
      const auto session = it->second;
      log_->warn("node '{}' lost: no heartbeat for {}", id, silence);
      // Final: the coordinator is alive and said so (the agent must not take it over).
      dropSession(session, rendezvous::finalStatus(grpc::StatusCode::UNAVAILABLE,
                                                   fmt::format("no heartbeat for {}: the "
                                                               "coordinator declared this node "
                                                               "failed",
                                                               silence)));
      silent.push_back({id, fmt::format("lost: no heartbeat for {}", silence), true});
    }
    if (!silent.empty()) rendezvous_.leave(silent, now, &events);
    while (!pending_acks_.empty() && pending_acks_.front().deadline <= now) {
      PendingAck p = std::move(pending_acks_.front());
      pending_acks_.pop_front();
      deferred_.push_back([r = p.reactor, st = p.status] { r->Finish(st); });
      for (SessionReactor* s : p.waiting) {
        s->lagging = true;
        s->lagging_at = p.revision;
        log_->warn(
            "job scope: node '{}' did not acknowledge revision {} within {}; writes go on "
            "without waiting for it until it catches up",
            s->node_id, p.revision, formatDuration(options_.heartbeat_interval));
        stopWaitingForLocked(s);
      }
    }
    if (!job_scope_open_ && job_scope_gate_deadline_ <= now) {
      openJobScopeLocked(
          copies_in_.empty()
              ? fmt::format("no holder's copy came within {}",
                            formatDuration(options_.job_scope_grace))
              : fmt::format("the copies of {} did not come within {}; the newest writes only "
                            "they held are lost",
                            fmt::join(missingCopiesLocked(), ", "),
                            formatDuration(options_.job_scope_grace)));
    }
    while (!wait_deadlines_.empty() && wait_deadlines_.top().when <= now) {
      const WaitDeadline d = wait_deadlines_.top();
      wait_deadlines_.pop();
      kv_.cancelWaiter(d.id, timeoutError(fmt::format("timed out after {} waiting for {}",
                                                      formatDuration(d.timeout), d.what)));
    }
    deliver(std::move(events));
    if (!deferred_.empty()) {
      {
        std::lock_guard delivery_lock(delivery_mu_);
        delivery_queue_.push_back(std::move(deferred_));
      }
      deferred_.clear();
      delivery_cv_.notify_one();
    }

    TimePoint next = Clock::now() + liveness_.checkPeriod();
    if (auto d = rendezvous_.nextDeadline(); d && *d < next) next = *d;
    if (!wait_deadlines_.empty() && wait_deadlines_.top().when < next) {
      next = wait_deadlines_.top().when;
    }
    if (!pending_acks_.empty() && pending_acks_.front().deadline < next) {
      next = pending_acks_.front().deadline;
    }
    if (!job_scope_open_ && job_scope_gate_deadline_ < next) next = job_scope_gate_deadline_;
    timer_cv_.wait_until(lock, next);
  }
}

}  // namespace rally::coordinator
