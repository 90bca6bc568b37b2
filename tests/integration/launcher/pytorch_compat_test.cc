// An unmodified PyTorch DDP script (examples/pytorch/train_ddp.py: gloo, a checkpoint every few
// steps) run by `rally run` with 2 workers as torchrun would run it; one worker is killed with
// SIGKILL mid-run, and the job restarts from its checkpoint and finishes. Needs Debian's
// python3-torch at /usr/bin/python3 (scripts/install-deps installs it); skipped, saying so,
// without.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <regex>

#include "tests/integration/process.h"

namespace rally::testing {
namespace {

using std::chrono::milliseconds;

bool torchAvailable() {
  return std::system("/usr/bin/python3 -c 'import torch.distributed' >/dev/null 2>&1") == 0;
}

TEST(PytorchCompatTest, DdpScriptSurvivesAKilledWorker) {
  if (!torchAvailable()) {
    GTEST_SKIP() << "Debian's python3-torch is not installed at /usr/bin/python3 "
                    "(scripts/install-deps installs it): PyTorch compatibility not tested";
  }
  const std::string ckpt = tempPath("ddp-ckpt");
  std::filesystem::remove_all(ckpt);
  ChildProcess p({"/usr/bin/env", "PYTHON_EXEC=/usr/bin/python3", RALLY_BINARY, "run",
                  "--nproc_per_node", "2", "--max_restarts", "3", RALLY_DDP_SCRIPT, "--steps", "80",
                  "--step-time", "0.02", "--checkpoint-every", "10", "--checkpoint-dir", ckpt},
                 tempPath("ddp.out"));
  ASSERT_TRUE(p.waitForOutput("step 30 ", milliseconds(60000))) << p.output() << p.errors();
  const std::string started = p.output();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(started, m, std::regex(R"(\[rank 1\] pid (\d+))"))) << started;
  ASSERT_EQ(::kill(std::stoi(m[1].str()), SIGKILL), 0);

  const int status = p.waitExit(milliseconds(120000));
  ASSERT_NE(status, -1) << "the job did not finish: " << p.output() << p.errors();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << p.errors();
  const std::string out = p.output();
  EXPECT_NE(out.find("restart 1"), std::string::npos) << "the workers were restarted:\n" << out;
  EXPECT_NE(out.find("resumed from step"), std::string::npos) << "from the checkpoint:\n" << out;
  EXPECT_NE(out.find("done: 80 steps"), std::string::npos) << out;
  EXPECT_NE(p.errors().find("worker local rank 1 (rank 1) failed: signal SIGKILL"),
            std::string::npos)
      << p.errors();
  std::filesystem::remove_all(ckpt);
}

}  // namespace
}  // namespace rally::testing
