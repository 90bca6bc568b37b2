// Fault plan: a rank process is killed with SIGKILL in the middle of large allreduces. What must
// hold: every survivor's in-flight allreduce fails with PeerLost (or Aborted) within 2 s of the
// kill (the kernel closes the dead rank's sockets, so no timeout is involved), and the error names
// the operation, the rank and the generation.
#include <signal.h>

#include <regex>

#include "tests/integration/coordinator/coordinator_fixture.h"
#include "tests/integration/process.h"

namespace rally::testing {
namespace {

using std::chrono::milliseconds;

// Over TCP (ranks on different hosts) and through shared memory (ranks on one host; the dead
// process is seen through its pidfd).
class CollectiveSigkillTest : public CoordinatorFixture,
                              public ::testing::WithParamInterface<std::string> {};

TEST_P(CollectiveSigkillTest, SurvivorsGetPeerLostWithinTwoSeconds) {
  constexpr int kRanks = 3;
  const std::string transport = GetParam();
  std::vector<std::unique_ptr<ChildProcess>> ranks;
  for (int r = 0; r < kRanks; ++r) {
    ranks.push_back(std::make_unique<ChildProcess>(
        std::vector<std::string>{RALLY_COLLECTIVE_RANK, endpoint_, kToken, std::to_string(r),
                                 std::to_string(kRanks), std::to_string(4u << 20), transport},
        tempPath("rank" + std::to_string(r))));
  }
  for (auto& r : ranks) {
    ASSERT_TRUE(r->waitForOutput("transport " + transport + "\n", milliseconds(60000)))
        << r->output() << r->errors();
    ASSERT_TRUE(r->waitForOutput("iteration 2\n", milliseconds(60000)))
        << r->output() << r->errors();
  }
  const auto kill_ms =
      std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  ranks[1]->signal(SIGKILL);
  for (int r : {0, 2}) {
    const int status = ranks[r]->waitExit(milliseconds(30000));
    ASSERT_NE(status, -1) << "rank " << r << " still blocked 30 s after its peer died";
    ASSERT_FALSE(WIFSIGNALED(status))
        << "rank " << r << " was killed by signal " << WTERMSIG(status) << " when its peer died";
    EXPECT_EQ(WEXITSTATUS(status), 3);
    const std::string out = ranks[r]->output();
    std::smatch m;
    ASSERT_TRUE(std::regex_search(out, m, std::regex(R"(error at (\d+) (\w+): (.*))"))) << out;
    const long long latency = std::stoll(m[1].str()) - kill_ms;
    EXPECT_TRUE(m[2].str() == "PeerLost" || m[2].str() == "Aborted") << m[0].str();
    EXPECT_LT(latency, 2000) << "rank " << r << " learned of the dead peer after " << latency
                             << " ms";
    EXPECT_NE(m[3].str().find("allreduce"), std::string::npos);
    EXPECT_NE(m[3].str().find("rank " + std::to_string(r) + " of 3, generation 1"),
              std::string::npos)
        << m[3].str();
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, CollectiveSigkillTest, ::testing::Values("tcp", "shm"));

}  // namespace
}  // namespace rally::testing
