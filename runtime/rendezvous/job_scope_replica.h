// A copy of the coordinator's job scope (the store's generation 0), kept by the agents the
// coordinator names as its *holders* (the round's successors). A coordinator that takes over, or
// one restarted, is given the copies of the holders that rejoin it, so the job's records (restart
// claims, failure reports, the newest commit, fault firings) outlive the coordinator's host
// (docs/design/coordinator.md, "The job scope survives").
//
//   auto replica = std::make_shared<JobScopeReplica>();
//   AgentSessionOptions opt;  opt.replica = replica;   // the session applies and acknowledges
//   ...                                                // what the coordinator sends
//   for (auto& m : replica->chunks()) send(m);         // after a Join with last_generation set
//
// Entries carry the revision at which the coordinator last wrote them, deletions included, so that
// of two copies the newer wins key by key.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "rally/v1/coordinator.pb.h"

namespace rally::rendezvous {

// How much of the job scope one message carries, under a gRPC message limit of
// `max_message_bytes`: half of it (room for the framing), at most 1 MiB. Snapshots and uploads
// both use it.
inline size_t jobScopeChunkBytes(std::int64_t max_message_bytes) {
  return static_cast<size_t>(std::clamp<std::int64_t>(max_message_bytes / 2, 1, 1 << 20));
}

class JobScopeReplica {
 public:
  struct Entry {
    std::string value;
    bool deleted = false;
    std::uint64_t revision = 0;
  };

  // Applies a JobScope message: `full` starts a snapshot that replaces the copy (held once its
  // `complete` message came), `release` drops the copy, entries are upserted, and a list of
  // `holders` replaces the one known. Returns the revision to acknowledge.
  std::uint64_t apply(const rally::v1::JobScope& message);
  void clear();  // not a holder any more

  // Whether this node holds the job scope (it received a whole snapshot since it was last
  // cleared), even an empty one.
  bool held() const;
  bool empty() const;
  std::uint64_t revision() const;
  // The value under `key`, if held and not deleted.
  std::optional<std::string> get(const std::string& key) const;
  size_t size() const;  // entries, deletions included
  // The holders the coordinator last named (none known: empty).
  std::vector<std::string> holders() const;

  // The copy as JobScope messages of about `max_bytes` each (at least one entry each; one with
  // none for an empty scope), the first one naming the holders, the last one marked `complete`,
  // for sending to a coordinator. None unless held().
  std::vector<rally::v1::JobScope> chunks(size_t max_bytes = 1 << 20) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;
  std::uint64_t revision_ = 0;
  bool held_ = false;
  std::vector<std::string> holders_;
};

}  // namespace rally::rendezvous
