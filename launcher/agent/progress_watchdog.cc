#include "launcher/agent/progress_watchdog.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <set>

namespace rally::agent {

Result<std::unique_ptr<ProgressWatchdog>> ProgressWatchdog::open(Milliseconds timeout) {
  std::unique_ptr<ProgressWatchdog> w(new ProgressWatchdog());
  w->timeout_ = timeout;
  w->fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (w->fd_ < 0)
    return errnoStatus("socket(AF_UNIX, SOCK_DGRAM) for the progress watchdog", errno);
  const int on = 1;
  if (::setsockopt(w->fd_, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) != 0) {
    return errnoStatus("setsockopt(SO_PASSCRED)", errno);
  }
  std::random_device rd;
  w->name_ = fmt::format("rally-agent-{}-{:08x}", ::getpid(), rd());
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path + 1, w->name_.data(), w->name_.size());  // abstract: no file
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + w->name_.size());
  if (::bind(w->fd_, reinterpret_cast<sockaddr*>(&a), len) != 0) {
    return errnoStatus(fmt::format("binding the progress socket '@{}'", w->name_), errno);
  }
  return w;
}

ProgressWatchdog::~ProgressWatchdog() {
  if (fd_ >= 0) ::close(fd_);
}

Milliseconds ProgressWatchdog::reportInterval() const {
  return std::clamp(timeout_ / 4, Milliseconds(50), Milliseconds(1000));
}

void ProgressWatchdog::drain() {
  for (;;) {
    char buf[128];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred))];
    iovec iov{buf, sizeof buf - 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(fd_, &msg, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // EAGAIN: nothing more
    }
    pid_t pid = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
        ucred cred{};
        std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
        pid = cred.pid;
      }
    }
    buf[n] = '\0';
    long long step = -1;
    int waiting = 0;
    if (pid <= 0 || std::sscanf(buf, "%lld %d", &step, &waiting) != 2) continue;
    const auto now = Clock::now();
    auto [it, fresh] = seen_.try_emplace(pid);
    Seen& s = it->second;
    // Progress: a new step, or waiting for others (the clock starts again when the wait ends:
    // a rank that waited long for a slow peer is not judged the moment it computes again).
    if (fresh || s.step != step || waiting != 0) {
      s.changed = now;
      s.judged = false;
    }
    s.step = step;
    s.waiting = waiting != 0;
    s.reported = now;
  }
}

std::vector<ProgressWatchdog::Verdict> ProgressWatchdog::check(const std::vector<pid_t>& running) {
  drain();
  const auto now = Clock::now();
  // Reports stop when a process is stopped or gone: judged on fresh reports only (a stopped
  // process is --hang-timeout's).
  const auto fresh = std::max(reportInterval() * 3, Milliseconds(500));
  std::vector<Verdict> out;
  const std::set<pid_t> alive(running.begin(), running.end());
  for (auto it = seen_.begin(); it != seen_.end();) {
    if (alive.count(it->first) == 0) {  // exited (its pid may be reused)
      it = seen_.erase(it);
      continue;
    }
    Seen& s = it->second;
    const auto still = std::chrono::duration_cast<Milliseconds>(now - s.changed);
    if (!s.judged && s.step >= 0 && !s.waiting && still >= timeout_ && now - s.reported <= fresh) {
      s.judged = true;
      out.push_back({it->first, s.step, still});
    }
    ++it;
  }
  return out;
}

}  // namespace rally::agent
