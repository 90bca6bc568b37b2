// The GPT example under rally run:
//   - 2 workers train on the project's docs, a fault plan kills rank 1 at step 60, the job
//     recovers in place (a replacement joins; generation 2), training continues to the end, and
//     the loss falls clearly (the mean of the last three logged losses below 88% of the mean of
//     the first two);
//   - DP = 2 x TP = 2 on 4 workers, rank 1 killed at step 30: the TP group that lost a member is
//     rebuilt from the replica in the other DP group, the surviving ranks keep their processes
//     (one worker failed in all), and the loss at every later step is that of an uninterrupted
//     run (within 1e-3; here it is equal);
//   - TP = 2 x DP = 2 trains as TP = 1 x DP = 4 on the same data (same global batch of 16
//     sequences, the same initial full weights): the logged losses agree within 1e-3, and the
//     greedy samples (at TP = 2 from logits gathered across the group) are the same text.
#include <cstdlib>
#include <memory>
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
  // Each logged loss is one batch's: compare means (the first two logs, at steps 10 and 20,
  // against the last three), not single batches.
  const double first = (l[0] + l[1]) / 2, last = (l[l.size() - 1] + l[l.size() - 2] + l[l.size() - 3]) / 3;
  EXPECT_LT(last, 0.88 * first) << out;
  EXPECT_NE(ChildProcess::readFile(events).find("\"event\":\"recovery\""), std::string::npos);
}

TEST(GptExample, DataTimesTensorParallelRecoversInPlaceAsIfUninterrupted) {
  auto run = [](const std::string& name, const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {RALLY_BINARY, "run", "--standalone", "--nproc-per-node", "4",
                                     "--recovery", "in-place", "--max-restarts", "2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    for (std::string a : {std::string(RALLY_GPT), std::string("--data"), std::string(RALLY_DOCS),
                          std::string("--steps"), std::string("60"), std::string("--tp"),
                          std::string("2"), std::string("--batch"), std::string("4"),
                          std::string("--log-every"), std::string("10")}) {
      argv.push_back(a);
    }
    auto p = std::make_unique<ChildProcess>(argv, tempPath(name));
    EXPECT_EQ(exitCode(*p, std::chrono::milliseconds(110000)), 0) << p->errors();
    return p;
  };
  const auto reference = run("gpt-tp-ref.out", {});
  const std::string plan = tempPath("gpt-tp-plan.txt"), events = tempPath("gpt-tp-events.jsonl");
  { std::ofstream(plan) << "kill rank=1 step=30\n"; }
  std::remove(events.c_str());
  const auto faulty = run("gpt-tp.out", {"--fault-plan", plan, "--events", events});
  const std::string out = faulty->output();
  EXPECT_NE(out.find("steps 60 recoveries 1 world 4"), std::string::npos) << out;
  EXPECT_NE(out.find("world 4 generation 2"), std::string::npos) << out;
  EXPECT_EQ(count(ChildProcess::readFile(events), "\"event\":\"worker_failed\""), 1u)
      << "only the killed worker may fail";
  const auto want = losses(reference->output()), got = losses(out);
  ASSERT_EQ(got.size(), 6u) << out;
  ASSERT_EQ(want.size(), 6u) << reference->output();
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-3) << "log line " << i;
}

TEST(GptExample, TensorParallelTrainsAsDataParallelOnTheSameData) {
  struct Run {
    std::vector<double> losses;
    std::string sample;
  };
  auto run = [](const std::string& name, const std::string& tp, const std::string& batch) {
    ChildProcess p({RALLY_BINARY, "run", "--standalone", "--nproc-per-node", "4", RALLY_GPT,
                    "--data", RALLY_DOCS, "--steps", "40", "--log-every", "10", "--tp", tp,
                    "--batch", batch, "--sample-bytes", "40", "--temperature", "0"},
                   tempPath(name));
    EXPECT_EQ(exitCode(p, std::chrono::milliseconds(110000)), 0) << p.errors();
    const std::string out = p.output();
    const auto at = out.find("sample:\n");
    return Run{losses(out), at == std::string::npos ? "" : out.substr(at + 8)};
  };
  const auto tp2 = run("gpt-tp2dp2.out", "2", "8"), tp1 = run("gpt-tp1dp4.out", "1", "4");
  ASSERT_EQ(tp2.losses.size(), 4u);
  ASSERT_EQ(tp1.losses.size(), 4u);
  for (size_t i = 0; i < tp1.losses.size(); ++i) {
    EXPECT_NEAR(tp2.losses[i], tp1.losses[i], 1e-3) << "log line " << i;
  }
  EXPECT_GE(tp1.sample.size(), 56u) << "a 16-byte prompt and 40 generated bytes";
  EXPECT_EQ(tp2.sample, tp1.sample);
}

}  // namespace
}  // namespace rally::testing
