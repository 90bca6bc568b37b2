// Heartbeat liveness: detection within 2 intervals, and no false failures when the checker stalls.
#include "launcher/coordinator/liveness.h"

#include <gtest/gtest.h>

namespace rally::coordinator {
namespace {

using std::chrono::milliseconds;

TEST(LivenessTest, SilentNodeExpiresAfterTwoIntervals) {
  LivenessTracker live(milliseconds(100));
  EXPECT_EQ(live.timeout(), milliseconds(200));
  TimePoint t0{};
  live.beat("a", t0);
  live.beat("b", t0);
  for (int ms = 10; ms <= 200; ms += 10) {
    live.beat("b", t0 + milliseconds(ms));
    EXPECT_TRUE(live.expired(t0 + milliseconds(ms)).empty()) << ms;
  }
  auto gone = live.expired(t0 + milliseconds(210));
  ASSERT_EQ(gone.size(), 1u);
  EXPECT_EQ(gone[0], "a");
  EXPECT_EQ(live.size(), 1u);
  EXPECT_TRUE(live.expired(t0 + milliseconds(220)).empty()) << "reported once";
}

TEST(LivenessTest, CheckerStallIsNotCountedAgainstNodes) {
  LivenessTracker live(milliseconds(100));
  TimePoint t0{};
  live.beat("a", t0);
  EXPECT_TRUE(live.expired(t0 + milliseconds(10)).empty());
  // The coordinator was descheduled for 5 s: heartbeats may be queued unread. No false failure.
  EXPECT_TRUE(live.expired(t0 + milliseconds(5010)).empty());
  // Once the checker runs at its period again, the node's silence counts again: 20 ms were
  // counted before the stall, so it expires 180 ms after it.
  int detected_at = -1;
  for (int ms = 5020; ms <= 5400 && detected_at < 0; ms += 10) {
    if (!live.expired(t0 + milliseconds(ms)).empty()) detected_at = ms;
  }
  EXPECT_GE(detected_at, 5180);
  EXPECT_LE(detected_at, 5220);
}

TEST(LivenessTest, RemovedNodeIsNotReported) {
  LivenessTracker live(milliseconds(50));
  TimePoint t0{};
  live.beat("a", t0);
  live.remove("a");
  EXPECT_TRUE(live.expired(t0 + milliseconds(1000)).empty());
}

}  // namespace
}  // namespace rally::coordinator
