// Child processes for integration tests: spawn with output to files, signal, wait with a bound.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace rally::testing {

class ChildProcess {
 public:
  // Starts argv[0] with stdout and stderr going to `out_path` and `out_path`.err.
  ChildProcess(std::vector<std::string> argv, std::string out_path)
      : out_path_(std::move(out_path)) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    const std::string err = out_path_ + ".err";
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    if (posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
  }
  ~ChildProcess() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      waitExit(std::chrono::milliseconds(5000));
    }
  }
  pid_t pid() const { return pid_; }
  void signal(int sig) { ::kill(pid_, sig); }

  // The wait status, or -1 if it did not exit within `timeout`.
  int waitExit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        reaped_ = true;
        return status;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return -1;
  }

  std::string output() const { return readFile(out_path_); }
  std::string errors() const { return readFile(out_path_ + ".err"); }

  // Wait until stdout (or stderr) contains `text`; false after `timeout`.
  bool waitForOutput(const std::string& text, std::chrono::milliseconds timeout) const {
    return waitForText(out_path_, text, timeout);
  }
  bool waitForErrors(const std::string& text, std::chrono::milliseconds timeout) const {
    return waitForText(out_path_ + ".err", text, timeout);
  }

  static std::string readFile(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  static bool waitForText(const std::string& path, const std::string& text,
                          std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (readFile(path).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  std::string out_path_;
  pid_t pid_ = -1;
  bool reaped_ = false;
};

// Running: neither gone nor a zombie waiting for whoever inherited it.
inline bool isRunning(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string content((std::istreambuf_iterator<char>(stat)), {});
  const auto close = content.rfind(')');
  return close != std::string::npos && content.size() > close + 2 && content[close + 2] != 'Z';
}

// A free port on loopback now (another process could take it before it is used; fine for tests).
// A port that is free now, for a server a test starts later. Drawn below the kernel's ephemeral
// range (32768 and up by default), where a port the kernel hands out meanwhile (a connection's
// local port, another test's port 0) cannot take it, and from a slice of 250 ports of this
// process's own (by pid), so that tests running side by side (ctest -j) do not draw the same one
// between drawing it and binding it. Checked on every address, since takeover tests bind it on
// 127.0.0.2 and 127.0.0.3 as well.
inline int freePort() {
  // In turn through the slice from a random start: one process never hands out a port twice
  // (an earlier test's processes may still be closing theirs).
  static unsigned next = static_cast<unsigned>(std::minstd_rand(
      static_cast<unsigned>(::getpid()) * 7919u + static_cast<unsigned>(::time(nullptr)))());
  const int slice = 20000 + static_cast<int>(::getpid() % 48) * 250;
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int port = slice + static_cast<int>(next++ % 250);
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(fd);
    if (free) return port;
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);  // crowded: let the kernel choose
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// A TCP socket listening on loopback at a port the kernel chose, for a test's own stand-in server:
// its descriptor and port; fd -1 (errno says why) if it could not.
struct LoopbackListener {
  int fd = -1;
  int port = 0;
};
inline LoopbackListener listenOnLoopback(int backlog) {
  LoopbackListener l;
  l.fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (l.fd < 0 || ::bind(l.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::listen(l.fd, backlog) != 0 ||
      ::getsockname(l.fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (l.fd >= 0) ::close(l.fd);
    l.fd = -1;
    return l;
  }
  l.port = ntohs(a.sin_port);
  return l;
}

// The exit code (128+N when killed by signal N), or -1 if it did not exit within `timeout`.
inline int exitCode(ChildProcess& p,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds(60000)) {
  const int status = p.waitExit(timeout);
  if (status == -1) return -1;
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

// How often `what` occurs in `text`.
inline size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

inline std::string tempPath(const std::string& name) {
  return ::testing::TempDir() + name + "." + std::to_string(::getpid());
}

}  // namespace rally::testing
