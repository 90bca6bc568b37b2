#include "launcher/agent/worker_group.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

namespace rally::agent {
namespace {

constexpr size_t kTailLines = 20;

// An fd closed on destruction.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept {
    reset();
    fd = o.fd;
    o.fd = -1;
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

const char* sigName(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  static thread_local std::string name;
  name = abbrev != nullptr ? std::string("SIG") + abbrev : fmt::format("signal {}", sig);
  return name.c_str();
}

// Through syscall(): glibc 2.36's <sys/pidfd.h> declares pidfd_open without extern "C".
int pidfdOpen(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

// Retries on EINTR.
ssize_t readRetry(int fd, void* buf, size_t n) {
  for (;;) {
    const ssize_t r = ::read(fd, buf, n);
    if (r >= 0 || errno != EINTR) return r;
  }
}

}  // namespace

std::string WorkerExit::describe() const {
  if (signal != 0) {
    return fmt::format("signal {}{}", sigName(signal),
                       oom_killed ? " (killed by the kernel's OOM killer)" : "");
  }
  return fmt::format("exit code {}", exit_code);
}

std::optional<long long> oomKillCount() {
  std::ifstream cg("/proc/self/cgroup");
  std::string line, v2_path, v1_memory_path;
  while (std::getline(cg, line)) {
    if (line.rfind("0::", 0) == 0) v2_path = line.substr(3);
    const auto p = line.find(":memory:");
    if (p != std::string::npos) v1_memory_path = line.substr(p + 8);
  }
  auto read_count = [](const std::string& file) -> std::optional<long long> {
    std::ifstream in(file);
    std::string key;
    long long value = 0;
    while (in >> key >> value) {
      if (key == "oom_kill") return value;
    }
    return std::nullopt;
  };
  if (!v1_memory_path.empty()) {
    if (auto c = read_count("/sys/fs/cgroup/memory" + v1_memory_path + "/memory.oom_control")) {
      return c;
    }
  }
  if (!v2_path.empty()) return read_count("/sys/fs/cgroup" + v2_path + "/memory.events");
  return std::nullopt;
}

struct WorkerGroup::Worker {
  WorkerSpec spec;
  pid_t pid = -1;
  Fd pidfd, out, err;
  bool exited = false;
  std::ofstream out_file, err_file;
  std::string out_partial, err_partial;
  std::deque<std::string> err_tail;
};

Result<std::unique_ptr<WorkerGroup>> WorkerGroup::start(std::vector<WorkerSpec> specs,
                                                        OnExit on_exit) {
  std::unique_ptr<WorkerGroup> g(new WorkerGroup());
  g->on_exit_ = std::move(on_exit);
  g->oom_kills_at_start_ = oomKillCount();
  g->epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  g->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (g->epoll_fd_ < 0 || g->wake_fd_ < 0) return errnoStatus("epoll/eventfd", errno);
  epoll_event wake{};
  wake.events = EPOLLIN;
  wake.data.u64 = ~0ull;
  epoll_ctl(g->epoll_fd_, EPOLL_CTL_ADD, g->wake_fd_, &wake);

  const pid_t agent_pid = getpid();
  for (auto& spec : specs) {
    auto w = std::make_unique<Worker>();
    w->spec = std::move(spec);
    if (!w->spec.stdout_file.empty()) {
      w->out_file.open(w->spec.stdout_file, std::ios::app);
      if (!w->out_file) return ioError(fmt::format("cannot open {}", w->spec.stdout_file));
    }
    if (!w->spec.stderr_file.empty()) {
      w->err_file.open(w->spec.stderr_file, std::ios::app);
      if (!w->err_file) return ioError(fmt::format("cannot open {}", w->spec.stderr_file));
    }
    // Everything the child needs is prepared before fork: after it, only async-signal-safe calls.
    std::vector<char*> argv;
    for (auto& a : w->spec.argv) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : w->spec.env) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    // Resolved against the worker's PATH here: after fork only async-signal-safe calls are made.
    std::string program = w->spec.argv.empty() ? std::string() : w->spec.argv[0];
    if (program.find('/') == std::string::npos) {
      const auto it = w->spec.env.find("PATH");
      std::stringstream dirs(it != w->spec.env.end() ? it->second : "/usr/local/bin:/usr/bin:/bin");
      std::string dir;
      while (std::getline(dirs, dir, ':')) {
        const std::string candidate = (dir.empty() ? "." : dir) + "/" + program;
        if (access(candidate.c_str(), X_OK) == 0) {
          program = candidate;
          break;
        }
      }
    }

    int out_pipe[2], err_pipe[2], exec_pipe[2];
    if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0 ||
        pipe2(exec_pipe, O_CLOEXEC) != 0) {
      return errnoStatus("pipe2", errno);
    }
    const pid_t pid = fork();
    if (pid < 0) return errnoStatus("fork", errno);
    if (pid == 0) {
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != agent_pid) _exit(1);  // the agent died before prctl took effect
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int s = 1; s < NSIG; ++s) signal(s, SIG_DFL);
      dup2(out_pipe[1], 1);
      dup2(err_pipe[1], 2);
      execve(program.c_str(), argv.data(), envp.data());
      const int e = errno;
      (void)!write(exec_pipe[1], &e, sizeof(e));
      _exit(127);
    }
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    ::close(exec_pipe[1]);
    setpgid(pid, pid);  // also from the parent, so that the group exists before any signal
    int exec_errno = 0;
    const ssize_t n = readRetry(exec_pipe[0], &exec_errno, sizeof(exec_errno));
    ::close(exec_pipe[0]);
    w->pid = pid;
    w->out = Fd(out_pipe[0]);
    w->err = Fd(err_pipe[0]);
    if (n == sizeof(exec_errno)) {
      waitpid(pid, nullptr, 0);
      w->exited = true;
      g->workers_.push_back(std::move(w));
      g->stop(SIGKILL, Milliseconds(0));
      return invalidArgument(fmt::format("cannot run '{}': {}", g->workers_.back()->spec.argv[0],
                                         std::strerror(exec_errno)));
    }
    w->pidfd = Fd(pidfdOpen(pid));
    if (w->pidfd.fd < 0) return errnoStatus("pidfd_open", errno);
    const size_t index = g->workers_.size();
    for (auto [fd, kind] : {std::pair{w->out.fd, 0}, {w->err.fd, 1}, {w->pidfd.fd, 2}}) {
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = (static_cast<std::uint64_t>(index) << 2) | static_cast<std::uint64_t>(kind);
      epoll_ctl(g->epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    }
    g->workers_.push_back(std::move(w));
  }
  g->io_ = std::thread([p = g.get()] { p->ioLoop(); });
  return g;
}

WorkerGroup::~WorkerGroup() {
  stop(SIGKILL, Milliseconds(0));
  if (wake_fd_ >= 0) {
    const std::uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
  }
  if (io_.joinable()) io_.join();
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void WorkerGroup::handleOutput(Worker& w, int fd, bool is_err) {
  char buf[65536];
  for (;;) {
    const ssize_t n = readRetry(fd, buf, sizeof(buf));
    if (n <= 0) return;  // drained (EAGAIN) or closed
    std::string& partial = is_err ? w.err_partial : w.out_partial;
    partial.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1) {
      const std::string_view line(partial.data() + start, nl - start);
      if (is_err) {
        if (w.err_file.is_open()) w.err_file << line << '\n';
        if (w.spec.stderr_to_console) std::cerr << w.spec.console_prefix << line << '\n';
        w.err_tail.emplace_back(line);
        if (w.err_tail.size() > kTailLines) w.err_tail.pop_front();
      } else {
        if (w.out_file.is_open()) w.out_file << line << '\n';
        if (w.spec.stdout_to_console) std::cout << w.spec.console_prefix << line << '\n';
      }
    }
    partial.erase(0, start);
    if (is_err) {
      std::cerr.flush();
      w.err_file.flush();
    } else {
      std::cout.flush();
      w.out_file.flush();
    }
  }
}

void WorkerGroup::reap(Worker& w) {
  int status = 0;
  if (waitpid(w.pid, &status, WNOHANG) != w.pid) return;
  // What the worker wrote before it died is still in the pipes: take it for the tail.
  handleOutput(w, w.out.fd, false);
  handleOutput(w, w.err.fd, true);
  for (std::string* partial : {&w.out_partial, &w.err_partial}) {
    if (partial->empty()) continue;
    const bool is_err = partial == &w.err_partial;
    if (is_err) {
      w.err_tail.push_back(*partial);
      if (w.spec.stderr_to_console) std::cerr << w.spec.console_prefix << *partial << '\n';
      if (w.err_file.is_open()) w.err_file << *partial << '\n';
    } else {
      if (w.spec.stdout_to_console) std::cout << w.spec.console_prefix << *partial << '\n';
      if (w.out_file.is_open()) w.out_file << *partial << '\n';
    }
    partial->clear();
  }
  WorkerExit e;
  e.local_rank = w.spec.local_rank;
  e.pid = w.pid;
  e.when = std::chrono::system_clock::now();
  if (WIFSIGNALED(status)) {
    e.signal = WTERMSIG(status);
    if (e.signal == SIGKILL && oom_kills_at_start_) {
      const auto now = oomKillCount();
      e.oom_killed = now && *now > *oom_kills_at_start_;
    }
  } else {
    e.exit_code = WEXITSTATUS(status);
  }
  e.stderr_tail.assign(w.err_tail.begin(), w.err_tail.end());
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, w.pidfd.fd, nullptr);
  {
    std::lock_guard lock(mu_);
    w.exited = true;
    exits_.push_back(e);
  }
  exited_cv_.notify_all();
  if (on_exit_) on_exit_(e);
}

void WorkerGroup::ioLoop() {
  epoll_event events[64];
  for (;;) {
    const int n = epoll_wait(epoll_fd_, events, 64, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return;
    for (int i = 0; i < n; ++i) {
      if (events[i].data.u64 == ~0ull) return;  // woken to stop
      Worker& w = *workers_[events[i].data.u64 >> 2];
      switch (events[i].data.u64 & 3) {
        case 0:
          handleOutput(w, w.out.fd, false);
          if (events[i].events & (EPOLLHUP | EPOLLERR))
            epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, w.out.fd, nullptr);
          break;
        case 1:
          handleOutput(w, w.err.fd, true);
          if (events[i].events & (EPOLLHUP | EPOLLERR))
            epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, w.err.fd, nullptr);
          break;
        case 2:
          reap(w);
          break;
      }
    }
  }
}

void WorkerGroup::signalAll(int sig) {
  std::lock_guard lock(mu_);
  for (const auto& w : workers_) {
    if (!w->exited && w->pid > 0) kill(-w->pid, sig);
  }
}

bool WorkerGroup::waitAll(Milliseconds timeout) {
  std::unique_lock lock(mu_);
  return exited_cv_.wait_for(lock, timeout, [&] {
    for (const auto& w : workers_) {
      if (!w->exited) return false;
    }
    return true;
  });
}

void WorkerGroup::stop(int sig, Milliseconds grace) {
  if (sig != SIGKILL) {
    signalAll(sig);
    waitAll(grace);
  }
  // SIGKILL to every group, exited or not: a worker's children may outlive it in its group.
  for (const auto& w : workers_) {
    if (w->pid > 0) kill(-w->pid, SIGKILL);
  }
  if (io_.joinable()) {
    waitAll(Milliseconds(10'000));
  } else {
    for (auto& w : workers_) {  // no I/O thread (a failed start): reap here
      if (!w->exited && w->pid > 0) {
        waitpid(w->pid, nullptr, 0);
        w->exited = true;
      }
    }
  }
}

std::vector<pid_t> WorkerGroup::pids() const {
  std::lock_guard lock(mu_);
  std::vector<pid_t> out;
  for (const auto& w : workers_) out.push_back(w->pid);
  return out;
}

std::vector<std::pair<pid_t, int>> WorkerGroup::localRanks() const {
  std::lock_guard lock(mu_);
  std::vector<std::pair<pid_t, int>> out;
  for (const auto& w : workers_) {
    if (!w->exited) out.emplace_back(w->pid, w->spec.local_rank);
  }
  return out;
}

std::vector<WorkerExit> WorkerGroup::exits() const {
  std::lock_guard lock(mu_);
  return exits_;
}

size_t WorkerGroup::running() const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (const auto& w : workers_) n += w->exited ? 0 : 1;
  return n;
}

}  // namespace rally::agent
