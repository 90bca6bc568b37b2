#include "runtime/rendezvous/job_scope_replica.h"

#include <algorithm>

namespace rally::rendezvous {

namespace v1 = rally::v1;

std::uint64_t JobScopeReplica::apply(const v1::JobScope& message) {
  std::lock_guard lock(mu_);
  if (message.full() || message.release()) {
    entries_.clear();
    revision_ = 0;
    held_ = false;
    holders_.clear();
  }
  if (message.release()) return message.revision();
  if (message.holders_size() > 0) {
    holders_.assign(message.holders().begin(), message.holders().end());
  }
  for (const v1::JobScopeEntry& e : message.entries()) {
    Entry& mine = entries_[e.key()];
    if (mine.revision > e.revision()) continue;  // never older over newer
    mine.value = e.deleted() ? std::string() : e.value();
    mine.deleted = e.deleted();
    mine.revision = e.revision();
  }
  revision_ = std::max(revision_, message.revision());
  // A snapshot is held once all of it came (its last message); a change applies to what is held.
  if (message.complete()) held_ = true;
  return message.revision();
}

void JobScopeReplica::clear() {
  std::lock_guard lock(mu_);
  entries_.clear();
  revision_ = 0;
  held_ = false;
  holders_.clear();
}

std::vector<std::string> JobScopeReplica::holders() const {
  std::lock_guard lock(mu_);
  return holders_;
}

bool JobScopeReplica::held() const {
  std::lock_guard lock(mu_);
  return held_;
}

bool JobScopeReplica::empty() const {
  std::lock_guard lock(mu_);
  return entries_.empty();
}

std::uint64_t JobScopeReplica::revision() const {
  std::lock_guard lock(mu_);
  return revision_;
}

std::optional<std::string> JobScopeReplica::get(const std::string& key) const {
  std::lock_guard lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.deleted) return std::nullopt;
  return it->second.value;
}

size_t JobScopeReplica::size() const {
  std::lock_guard lock(mu_);
  return entries_.size();
}

std::vector<v1::JobScope> JobScopeReplica::chunks(size_t max_bytes) const {
  std::lock_guard lock(mu_);
  std::vector<v1::JobScope> out;
  if (!held_) return out;
  size_t bytes = 0;
  for (const auto& [key, e] : entries_) {
    const size_t size = key.size() + e.value.size() + 16;
    if (out.empty() || (bytes + size > max_bytes && out.back().entries_size() > 0)) {
      out.emplace_back().set_revision(revision_);
      bytes = 0;
    }
    v1::JobScopeEntry* entry = out.back().add_entries();
    entry->set_key(key);
    if (!e.deleted) entry->set_value(e.value);
    entry->set_deleted(e.deleted);
    entry->set_revision(e.revision);
    bytes += size;
  }
  if (out.empty()) out.emplace_back().set_revision(revision_);
  for (const std::string& h : holders_) out.front().add_holders(h);
  out.back().set_complete(true);
  return out;
}

}  // namespace rally::rendezvous
