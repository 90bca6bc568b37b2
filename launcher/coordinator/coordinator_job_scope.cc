// The coordinator's job scope (the store's generation 0), replicated to the holders: the round's
// successors, or for a standalone coordinator its first nodes by node rank. A write of the job
// scope is answered once every holder acknowledged it, or after one heartbeat interval (the holder
// is then *lagging*: later writes do not wait for it until it catches up). A coordinator that
// takes over, or one restarted, adopts the copies that rejoining holders send it, key by key, the
// newer revision winning and a key written here never replaced. docs/design/coordinator.md, "The
// job scope survives".
#include <fmt/format.h>

#include <algorithm>

#include "launcher/coordinator/coordinator_service.h"
#include "launcher/coordinator/internal/reactors.h"

namespace rally::coordinator {

namespace v1 = rally::v1;

bool CoordinatorService::replicateLocked(grpc::ServerUnaryReactor* reactor,
                                         const grpc::Status& status, TimePoint ack_by) {
  if (job_changes_.empty()) return false;
  v1::JobScope delta;
  delta.set_revision(job_revision_);
  for (auto& e : job_changes_) *delta.add_entries() = std::move(e);
  job_changes_.clear();
  sendToHoldersLocked(delta);
  PendingAck pending{job_revision_, reactor, status, {}, ack_by};
  for (const auto& [id, s] : sessions_by_node_) {
    if (s->holder && !s->lagging && s->acked < job_revision_) pending.waiting.insert(s.get());
  }
  if (pending.waiting.empty()) return false;
  // In deadline order (each caller's deadline bounds its own).
  const auto at = std::upper_bound(pending_acks_.begin(), pending_acks_.end(), pending.deadline,
                                   [](TimePoint d, const PendingAck& p) { return d < p.deadline; });
  pending_acks_.insert(at, std::move(pending));
  timer_cv_.notify_one();
  return true;
}

void CoordinatorService::sendToHoldersLocked(const v1::JobScope& message) {
  v1::CoordinatorMessage msg;
  *msg.mutable_job_scope() = message;
  for (const auto& [id, s] : sessions_by_node_) {
    if (!s->holder) continue;
    s->enqueue(msg);
    deferred_.push_back([s = s] { s->kick(); });
  }
}

std::vector<v1::JobScope> CoordinatorService::jobScopeSnapshotLocked() const {
  std::vector<v1::JobScope> out(1);
  size_t bytes = 0;
  auto add = [&](const std::string& key, const std::string* value, std::uint64_t revision) {
    const size_t size = key.size() + (value ? value->size() : 0) + 16;
    if (bytes + size > options_.job_scope_chunk_bytes && out.back().entries_size() > 0) {
      out.emplace_back();
      bytes = 0;
    }
    v1::JobScopeEntry* e = out.back().add_entries();
    e->set_key(key);
    if (value) e->set_value(*value);
    e->set_deleted(value == nullptr);
    e->set_revision(revision);
    bytes += size;
  };
  for (const auto& [key, value] : kv_.jobScope()) {
    auto it = job_revisions_.find(key);
    add(key, &value, it == job_revisions_.end() ? 0 : it->second.revision);
  }
  for (const auto& [key, r] : job_revisions_) {
    if (r.deleted) add(key, nullptr, r.revision);
  }
  // Acknowledging the last message only (the revision is on it): a holder has the snapshot when
  // all of it came.
  out.front().set_full(true);
  out.back().set_revision(job_revision_);
  out.back().set_complete(true);
  return out;
}

void CoordinatorService::setHoldersLocked(const std::vector<std::string>& holders) {
  std::unordered_set<std::string> wanted(holders.begin(), holders.end());
  // The holders after this call, named to each (a resuming coordinator waits for each one's copy):
  // in a new holder's snapshot, and to every holder when the list changed.
  std::vector<std::string> named;
  for (const auto& [id, s] : sessions_by_node_) {
    if (wanted.count(id) != 0 && s->keeps) named.push_back(id);
  }
  std::sort(named.begin(), named.end());
  std::vector<v1::JobScope> snapshot;  // made once, for the first new holder
  std::vector<std::shared_ptr<SessionReactor>> released;
  for (const auto& [id, s] : sessions_by_node_) {
    const bool hold = wanted.count(id) != 0 && s->keeps;
    if (hold == s->holder) continue;
    if (!hold) {
      released.push_back(s);
      continue;
    }
    if (snapshot.empty()) {
      snapshot = jobScopeSnapshotLocked();
      for (const std::string& h : named) snapshot.back().add_holders(h);
    }
    v1::CoordinatorMessage msg;
    for (const auto& m : snapshot) {
      *msg.mutable_job_scope() = m;
      s->enqueue(msg);
    }
    deferred_.push_back([s = s] { s->kick(); });
    s->holder = true;
    s->lagging = false;
    // Writes still waiting wait for it too (its snapshot has them), so that none is answered on
    // the word of a holder released below alone.
    for (auto& p : pending_acks_) p.waiting.insert(s.get());
  }
  for (const auto& s : released) {
    v1::CoordinatorMessage msg;
    msg.mutable_job_scope()->set_release(true);
    msg.mutable_job_scope()->set_revision(job_revision_);
    s->enqueue(std::move(msg));
    deferred_.push_back([s = s] { s->kick(); });
    stopWaitingForLocked(s.get());
    s->holder = false;
  }
  if (named == holders_named_) return;
  holders_named_ = named;
  v1::JobScope list;
  list.set_revision(job_revision_);
  for (const std::string& id : named) list.add_holders(id);
  sendToHoldersLocked(list);
}

void CoordinatorService::adoptLocked(const std::string& node_id, const v1::JobScope& copy) {
  v1::JobScope adopted;
  adopting_ = true;
  for (const v1::JobScopeEntry& e : copy.entries()) {
    auto it = job_revisions_.find(e.key());
    if (it != job_revisions_.end() && (it->second.local || it->second.revision >= e.revision())) {
      continue;
    }
    const Status s = e.deleted() ? kv_.remove(0, e.key()).status() : kv_.set(0, e.key(), e.value());
    if (!s.ok()) {
      log_->warn("job scope: key '{}' from node '{}' not kept: {}", e.key(), node_id, s.message());
      continue;
    }
    job_revisions_[e.key()] = KeyRevision{e.revision(), e.deleted(), false};
    job_revision_ = std::max(job_revision_, e.revision());
    *adopted.add_entries() = e;
  }
  adopting_ = false;
  if (adopted.entries_size() == 0) return;
  log_->info("job scope: took {} of {} key(s) from the copy of node '{}'", adopted.entries_size(),
             copy.entries_size(), node_id);
  adopted.set_revision(job_revision_);
  sendToHoldersLocked(adopted);
}

void CoordinatorService::acknowledgedLocked(SessionReactor* session, std::uint64_t revision) {
  session->acked = std::max(session->acked, revision);
  if (session->lagging && session->acked >= session->lagging_at) {
    session->lagging = false;
    log_->info("job scope: node '{}' caught up (revision {})", session->node_id, session->acked);
  }
  for (auto it = pending_acks_.begin(); it != pending_acks_.end();) {
    if (it->revision <= session->acked) it->waiting.erase(session);
    if (it->waiting.empty()) {
      deferred_.push_back([r = it->reactor, st = it->status] { r->Finish(st); });
      it = pending_acks_.erase(it);
    } else {
      ++it;
    }
  }
}

void CoordinatorService::stopWaitingForLocked(SessionReactor* session) {
  for (auto it = pending_acks_.begin(); it != pending_acks_.end();) {
    it->waiting.erase(session);
    if (it->waiting.empty()) {
      deferred_.push_back([r = it->reactor, st = it->status] { r->Finish(st); });
      it = pending_acks_.erase(it);
    } else {
      ++it;
    }
  }
}

std::vector<std::string> CoordinatorService::missingCopiesLocked() const {
  std::vector<std::string> missing;
  for (const std::string& h : copies_expected_) {
    if (copies_in_.count(h) == 0) missing.push_back(h);
  }
  return missing;
}

void CoordinatorService::openJobScopeLocked(const std::string& why) {
  job_scope_open_ = true;
  if (!why.empty()) {
    log_->info("job scope: answering calls ({}{})", why,
               gated_calls_.empty() ? "" : fmt::format("; {} held until now", gated_calls_.size()));
  }
  std::vector<std::function<void()>> calls;
  calls.swap(gated_calls_);
  for (auto& call : calls) call();
}

}  // namespace rally::coordinator
