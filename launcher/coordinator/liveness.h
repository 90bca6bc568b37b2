// Liveness by heartbeats: which nodes have been silent for longer than the timeout. Pure logic: the
// caller passes `now`.
//
//   LivenessTracker live(1s);             // timeout 1.5s, checked every 50ms
//   live.beat("n0", now);
//   for (auto& id : live.expired(now + 3s)) fail(id);
//
// The bound: agents heartbeat twice per interval; a node silent for 1.5 intervals (three heartbeats
// missed) is failed at the next check, so a dead node is detected within 1.55 intervals of its last
// sign of life, inside the promised 2 intervals, while two late heartbeats in a row are tolerated.
//
// No false failures under load: if the checker itself was not scheduled for a while (a loaded or
// paused coordinator), that stall is not counted against the nodes, whose heartbeats may simply be
// queued unread. A stall is any gap between checks longer than `stall_threshold`.
//
// Thread-safety: none; the owner serialises calls.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "launcher/coordinator/rendezvous.h"

namespace rally::coordinator {

class LivenessTracker {
 public:
  explicit LivenessTracker(Milliseconds heartbeat_interval);

  Milliseconds interval() const { return interval_; }
  Milliseconds timeout() const { return timeout_; }
  // How often expired() should be called: detection is within timeout() + checkPeriod().
  Milliseconds checkPeriod() const { return check_period_; }

  void beat(const std::string& node_id, TimePoint now);
  void remove(const std::string& node_id);
  // Nodes silent for longer than the timeout; they are removed from tracking.
  std::vector<std::string> expired(TimePoint now);
  size_t size() const { return nodes_.size(); }
  // Total time the checker was found stalled (and not counted against the nodes).
  Clock::duration stalled() const { return stalled_; }

 private:
  struct Entry {
    TimePoint last_beat;
    Clock::duration stalled_at_beat;  // total stall when the beat was seen
  };
  Milliseconds interval_;
  Milliseconds timeout_;
  Milliseconds check_period_;
  Milliseconds stall_threshold_;
  std::unordered_map<std::string, Entry> nodes_;
  std::optional<TimePoint> last_check_;
  Clock::duration stalled_{0};  // total time the checker was stalled beyond its period
};

}  // namespace rally::coordinator
