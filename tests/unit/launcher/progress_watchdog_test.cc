// The agent's progress watchdog (and, at the end, where its coordinator listens; the host's memory
// of where it is: coordinator_memory_test.cc, in the same binary): reports arrive over the
// abstract Unix socket with the sender's pid from the kernel; a worker is judged hung only
// after the timeout passes with neither a new step nor a wait, once; waiting (a collective) and new
// steps restart the clock; workers not running, silent or not yet at a step are never judged.
#include "launcher/agent/progress_watchdog.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "launcher/agent/internal/agent_impl.h"  // listenAddressFor

namespace rally::agent {
namespace {

using std::chrono::milliseconds;

class Reporter {
 public:
  explicit Reporter(const std::string& name) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path + 1, name.data() + 1, name.size() - 1);  // "@name": abstract
    EXPECT_EQ(::connect(fd_, reinterpret_cast<sockaddr*>(&a),
                        static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size())),
              0)
        << std::strerror(errno);
  }
  ~Reporter() { ::close(fd_); }
  void send(long long step, bool waiting) {
    const std::string m = std::to_string(step) + (waiting ? " 1\n" : " 0\n");
    ASSERT_EQ(::send(fd_, m.data(), m.size(), 0), static_cast<ssize_t>(m.size()));
  }

 private:
  int fd_ = -1;
};

TEST(ProgressWatchdog, JudgesOnlyAWorkerThatNeitherAdvancesNorWaits) {
  auto dog = ProgressWatchdog::open(milliseconds(200));
  ASSERT_TRUE(dog.ok()) << dog.status().toString();
  EXPECT_EQ((*dog)->reportInterval(), milliseconds(50));
  EXPECT_EQ((*dog)->socketName()[0], '@');
  Reporter me((*dog)->socketName());
  const pid_t self = ::getpid();
  const std::vector<pid_t> running = {self};
  // Before its first step, a worker is not judged however long it takes.
  me.send(-1, false);
  std::this_thread::sleep_for(milliseconds(250));
  me.send(-1, false);
  EXPECT_TRUE((*dog)->check(running).empty());
  // Waiting in a collective at step 3, for longer than the timeout: not judged.
  for (int i = 0; i < 6; ++i) {
    me.send(3, true);
    std::this_thread::sleep_for(milliseconds(50));
    EXPECT_TRUE((*dog)->check(running).empty());
  }
  // Computing again at step 3: the clock starts when the wait ended, so not yet...
  me.send(3, false);
  EXPECT_TRUE((*dog)->check(running).empty());
  // ...but after the timeout with neither a step nor a wait: judged, once.
  std::vector<ProgressWatchdog::Verdict> v;
  for (int i = 0; i < 10 && v.empty(); ++i) {
    std::this_thread::sleep_for(milliseconds(50));
    me.send(3, false);
    v = (*dog)->check(running);
  }
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].pid, self);
  EXPECT_EQ(v[0].step, 3);
  EXPECT_GE(v[0].still, milliseconds(200));
  me.send(3, false);
  EXPECT_TRUE((*dog)->check(running).empty());
  // A new step is progress: judged again only after another full timeout.
  me.send(4, false);
  EXPECT_TRUE((*dog)->check(running).empty());
  // A worker that is not (or no longer) running is forgotten, never judged.
  std::this_thread::sleep_for(milliseconds(250));
  me.send(4, false);
  EXPECT_TRUE((*dog)->check({}).empty());
}

TEST(ProgressWatchdog, ASilentWorkerIsNotJudged) {
  auto dog = ProgressWatchdog::open(milliseconds(100));
  ASSERT_TRUE(dog.ok());
  Reporter me((*dog)->socketName());
  me.send(7, false);
  EXPECT_TRUE((*dog)->check({::getpid()}).empty());
  // No more reports (stopped, or gone): its reports are stale, so --hang-timeout's to judge.
  std::this_thread::sleep_for(milliseconds(700));
  EXPECT_TRUE((*dog)->check({::getpid()}).empty());
}

}  // namespace
}  // namespace rally::agent

// Where an agent's coordinator listens (the first one, and a successor's after a takeover): on
// loopback the address exactly, since one-machine tests and demos give nodes 127.0.0.2, 127.0.0.3.
TEST(ListenAddress, LoopbackAddressesExactlyOthersOnEveryInterface) {
  EXPECT_EQ(rally::agent::listenAddressFor("127.0.0.1"), "127.0.0.1");
  EXPECT_EQ(rally::agent::listenAddressFor("127.0.0.3"), "127.0.0.3");
  EXPECT_EQ(rally::agent::listenAddressFor("::1"), "::1");
  EXPECT_EQ(rally::agent::listenAddressFor("localhost"), "127.0.0.1");
  EXPECT_EQ(rally::agent::listenAddressFor("10.0.0.5"), "0.0.0.0");
  EXPECT_EQ(rally::agent::listenAddressFor("node-7.cluster"), "0.0.0.0");
  EXPECT_EQ(rally::agent::listenAddressFor("fd00::5"), "::") << "an IPv6 address: IPv6 interfaces";
}
