// rally::init()'s malloc tuning: when it applies, and that it stops a training-like allocation
// pattern from faulting its pages in again every round. mallopt is process-wide, so every case
// runs in a child process and this one keeps glibc's defaults.
#include "runtime/world/internal/malloc_tuning.h"

#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

namespace rally::internal {
namespace {

// Runs `fn` in a forked child; returns what it wrote (one int64), or -1 if it failed.
std::int64_t inChild(const std::function<std::int64_t()>& fn) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    const std::int64_t v = fn();
    const bool ok = write(fds[1], &v, sizeof v) == static_cast<ssize_t>(sizeof v);
    _exit(ok ? 0 : 1);
  }
  close(fds[1]);
  std::int64_t v = -1;
  if (read(fds[0], &v, sizeof v) != static_cast<ssize_t>(sizeof v)) v = -1;
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? v : -1;
}

std::int64_t applied(const std::map<std::string, std::string>& env) {
  return inChild([&] { return tuneMallocForTraining(env).applied ? 1 : 0; });
}

bool sanitizerAllocator() {
  return inChild([] {
           return tuneMallocForTraining({}).reason.find("sanitizer") != std::string::npos ? 1 : 0;
         }) == 1;
}

// Minor page faults over rounds 3..6 of: allocate 48 blocks of 256 KiB to 2 MiB (activations of
// varied sizes), touch every page, free them all (the end of a step).
std::int64_t faultsOfSteps(bool tune) {
  return inChild([tune]() -> std::int64_t {
    // Page faults counted in 4 KiB pages: where transparent huge pages are "always", the heap
    // would fault in 2 MiB at a time and the counts would not compare.
    prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
    if (tune && !tuneMallocForTraining({}).applied) return -2;
    std::int64_t counted = 0;
    for (int round = 0; round < 6; ++round) {
      rusage before{};
      getrusage(RUSAGE_SELF, &before);
      std::vector<volatile char*> blocks;
      for (int i = 0; i < 48; ++i) {
        const size_t bytes = (256u << 10) * (1 + i % 8);
        auto* p = static_cast<volatile char*>(std::malloc(bytes));
        if (p == nullptr) return -3;
        for (size_t off = 0; off < bytes; off += 4096) p[off] = static_cast<char>(i);
        blocks.push_back(p);
      }
      for (volatile char* p : blocks) std::free(const_cast<char*>(p));
      rusage after{};
      getrusage(RUSAGE_SELF, &after);
      if (round >= 2) counted += after.ru_minflt - before.ru_minflt;
    }
    return counted;
  });
}

TEST(MallocTuning, AppliesUnlessTheUserChose) {
  if (sanitizerAllocator()) GTEST_SKIP() << "a sanitizer's allocator replaces glibc malloc here";
  EXPECT_EQ(applied({}), 1);
  EXPECT_EQ(applied({{"GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F"}}), 1);
  EXPECT_EQ(applied({{"RALLY_MALLOC_TUNING", "1"}}), 1);
  for (const char* off : {"0", "off", "false", "no"}) {
    EXPECT_EQ(applied({{"RALLY_MALLOC_TUNING", off}}), 0) << off;
  }
  EXPECT_EQ(applied({{"GLIBC_TUNABLES", "glibc.malloc.arena_max=2"}}), 0);
  const auto off = tuneMallocForTraining({{"RALLY_MALLOC_TUNING", "0"}});
  EXPECT_FALSE(off.applied);
  EXPECT_EQ(off.reason, "RALLY_MALLOC_TUNING=0");
}

TEST(MallocTuning, AnUnknownSettingIsAnErrorThatSaysWhatWouldDo) {
  const auto bad = tuneMallocForTraining({{"RALLY_MALLOC_TUNING", "maybe"}});
  EXPECT_FALSE(bad.applied);
  EXPECT_TRUE(bad.bad_value);
  EXPECT_NE(bad.reason.find("RALLY_MALLOC_TUNING=maybe"), std::string::npos) << bad.reason;
  EXPECT_NE(bad.reason.find("use on or off"), std::string::npos) << bad.reason;
}

TEST(MallocTuning, StepsStopFaultingTheirPagesInAgain) {
  if (sanitizerAllocator()) GTEST_SKIP() << "a sanitizer's allocator replaces glibc malloc here";
  const std::int64_t untuned = faultsOfSteps(false);
  const std::int64_t tuned = faultsOfSteps(true);
  ASSERT_GE(untuned, 0);
  ASSERT_GE(tuned, 0);
  // Four rounds of 54 MiB are ~55,000 pages with glibc's defaults (the freed heap top is
  // trimmed and faulted in again); tuned, the heap keeps them.
  EXPECT_GT(untuned, 20000);
  EXPECT_LT(tuned, untuned / 20) << "untuned " << untuned;
}

}  // namespace
}  // namespace rally::internal
