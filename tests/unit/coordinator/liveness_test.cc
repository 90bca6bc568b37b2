// Heartbeat liveness: detection within 2 intervals, and no false failures when the checker stalls.
#include "launcher/coordinator/liveness.h"

#include <gtest/gtest.h>

namespace rally::coordinator {
namespace {

using std::chrono::milliseconds;

TEST(LivenessTest, SilentNodeExpiresWithinTwoIntervals) {
  LivenessTracker live(milliseconds(100));
  EXPECT_EQ(live.timeout(), milliseconds(150));
  EXPECT_EQ(live.checkPeriod(), milliseconds(5));
  EXPECT_LT(live.timeout() + live.checkPeriod(), 2 * live.interval());
  TimePoint t0{};
  live.beat("a", t0);
  live.beat("b", t0);
  int detected_at = -1;
  for (int ms = 5; ms <= 300; ms += 5) {
    if (ms % 50 == 0) live.beat("b", t0 + milliseconds(ms));  // twice per interval
    auto gone = live.expired(t0 + milliseconds(ms));
    if (!gone.empty()) {
      ASSERT_EQ(gone.size(), 1u);
      EXPECT_EQ(gone[0], "a");
      EXPECT_EQ(detected_at, -1) << "reported once";
      detected_at = ms;
    }
  }
  EXPECT_EQ(detected_at, 155);
  EXPECT_EQ(live.size(), 1u) << "the node that kept beating is still tracked";
}

TEST(LivenessTest, TwoLateHeartbeatsAreTolerated) {
  LivenessTracker live(milliseconds(100));
  TimePoint t0{};
  live.beat("a", t0);
  // Heartbeats due at 50 and 100 ms were lost; the one at 145 ms arrives in time.
  for (int ms = 5; ms < 145; ms += 5) EXPECT_TRUE(live.expired(t0 + milliseconds(ms)).empty());
  live.beat("a", t0 + milliseconds(145));
  for (int ms = 150; ms < 290; ms += 5) EXPECT_TRUE(live.expired(t0 + milliseconds(ms)).empty());
}

TEST(LivenessTest, CheckerStallIsNotCountedAgainstNodes) {
  LivenessTracker live(milliseconds(100));
  TimePoint t0{};
  live.beat("a", t0);
  EXPECT_TRUE(live.expired(t0 + milliseconds(10)).empty());
  // The coordinator was descheduled for 5 s: heartbeats may be queued unread. No false failure.
  EXPECT_TRUE(live.expired(t0 + milliseconds(5010)).empty());
  // Once the checker runs at its period again, the node's silence counts again: 15 ms were
  // counted before and across the stall, so it expires about 135 ms after it.
  int detected_at = -1;
  for (int ms = 5015; ms <= 5400 && detected_at < 0; ms += 5) {
    if (!live.expired(t0 + milliseconds(ms)).empty()) detected_at = ms;
  }
  EXPECT_GE(detected_at, 5140);
  EXPECT_LE(detected_at, 5170);
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
