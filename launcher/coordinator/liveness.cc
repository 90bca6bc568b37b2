#include "launcher/coordinator/liveness.h"

#include <algorithm>

namespace rally::coordinator {

LivenessTracker::LivenessTracker(Milliseconds heartbeat_interval)
    : interval_(std::max(heartbeat_interval, Milliseconds(1))),
      timeout_(interval_ * 3 / 2),
      check_period_(std::max(interval_ / 20, Milliseconds(1))),
      stall_threshold_(std::max(interval_ / 2, Milliseconds(5))) {}

void LivenessTracker::beat(const std::string& node_id, TimePoint now) {
  nodes_[node_id] = Entry{now, stalled_};
}

void LivenessTracker::remove(const std::string& node_id) { nodes_.erase(node_id); }

std::vector<std::string> LivenessTracker::expired(TimePoint now) {
  if (last_check_) {
    const auto gap = now - *last_check_;
    if (gap > stall_threshold_) stalled_ += gap - check_period_;
  }
  last_check_ = now;
  std::vector<std::string> out;
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    const auto silent = (now - it->second.last_beat) - (stalled_ - it->second.stalled_at_beat);
    if (silent > timeout_) {
      out.push_back(it->first);
      it = nodes_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

}  // namespace rally::coordinator
