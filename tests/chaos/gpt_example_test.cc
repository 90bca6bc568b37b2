// The GPT example under rally run: 2 workers train on the project's docs, a fault plan kills
// rank 1 at step 60, the job recovers in place (a replacement joins; generation 2), training
// continues to the end, and the loss falls clearly (the last logged loss below 85% of the first).
#include <cstdlib>
#include <sstream>

#include "tests/integration/process.h"

namespace rally::testing {
namespace {

std::vector<double> losses(const std::string& out) {
  std::vector<double> v;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    const auto at = line.find(" loss ");
    if (line.rfind("step ", 0) == 0 && at != std::string::npos) {
      v.push_back(std::strtod(line.c_str() + at + 6, nullptr));
    }
  }
  return v;
}

TEST(GptExample, AKilledWorkerIsRecoveredInPlaceAndTheLossKeepsFalling) {
  const std::string plan = tempPath("gpt-plan.txt"), events = tempPath("gpt-events.jsonl");
  { std::ofstream(plan) << "kill rank=1 step=60\n"; }
  std::remove(events.c_str());
  ChildProcess job({RALLY_BINARY, "run", "--standalone", "--nproc-per-node", "2", "--recovery",
                    "in-place", "--max-restarts", "2", "--fault-plan", plan, "--events", events,
                    RALLY_GPT, "--data", RALLY_DOCS, "--steps", "150", "--log-every", "10",
                    "--sample-bytes", "40"},
                   tempPath("gpt.out"));
  ASSERT_EQ(exitCode(job, std::chrono::milliseconds(110000)), 0) << job.errors();
  const std::string out = job.output();
  EXPECT_NE(out.find("steps 150 recoveries 1 world 2"), std::string::npos) << out;
  EXPECT_NE(out.find("generation 2"), std::string::npos) << out;
  EXPECT_NE(out.find("sample:"), std::string::npos) << out;
  const auto l = losses(out);
  ASSERT_GE(l.size(), 10u) << out;
  EXPECT_LT(l.back(), 0.85 * l.front()) << out;
  EXPECT_NE(ChildProcess::readFile(events).find("\"event\":\"recovery\""), std::string::npos);
}

}  // namespace
}  // namespace rally::testing
