// Rendezvous at scale: N simulated agents join one `rally coordinator` process over loopback.
//
// For each N it measures:
//   - round time: from the first join to every agent holding its RoundFormed (max = N, so the round
//     forms the moment the last agent joins);
//   - the coordinator's CPU (percent of one core) and resident memory while N agents heartbeat;
//   - failure detection, p50/p99: agents killed (their streams cancelled, as when a process dies)
//   and
//     agents hung (alive but silent), from the kill, or from the hung agent's last heartbeat, to
//     the generation event that names it.
//   - a store write's latency, p50/p99 over 200 writes in a row: to the job scope, which the
//     coordinator answers once its 3 holders (agents 0-2 keep copies, as `rally run` agents do)
//     have acknowledged it, and to the generation's scope, which is not copied.
// It ends with one line per N: `rendezvous agents=N seconds=S detect_p99_ms=D`, D the worse of the
// two p99s.
//
//   rendezvous_bench [--sizes 64,256,1024,4096,10000] [--connections 256] [--trials 10]
//                    [--heartbeat-interval-ms 1000] [--load-seconds 5]
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "kernels/base/logging.h"
#include "launcher/coordinator/coordinator_server.h"
#include "runtime/rendezvous/agent_session.h"
#include "runtime/rendezvous/generation_watcher.h"
#include "tests/integration/process.h"

namespace {

namespace v1 = rally::v1;
using namespace rally;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

double msBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5));
  return v[i];
}

struct ProcSample {
  double cpu_seconds = 0;
  double rss_mib = 0;
};

ProcSample sample(pid_t pid) {
  ProcSample s;
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string content((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto close = content.rfind(')');
  if (close != std::string::npos) {
    std::istringstream rest(content.substr(close + 2));
    std::string field;
    std::vector<std::string> fields;
    while (rest >> field) fields.push_back(field);
    // Fields after the command: state is [0]; utime and stime are fields 14 and 15 of stat, [11],
    // [12].
    if (fields.size() > 12) {
      s.cpu_seconds = (std::stod(fields[11]) + std::stod(fields[12])) / sysconf(_SC_CLK_TCK);
    }
  }
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) s.rss_mib = std::stod(line.substr(6)) / 1024.0;
  }
  return s;
}

struct Agent {
  std::unique_ptr<rendezvous::AgentSession> session;
  std::atomic<std::int64_t> formed_ns{0};
  std::atomic<bool> silent{false};
  std::atomic<std::int64_t> last_beat_ns{0};
  bool dead = false;
};

std::int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

struct SizeResult {
  int agents;
  double round_s;
  double cpu_percent;
  double rss_mib;
  double kill_p50, kill_p99, hang_p50, hang_p99;
  int false_failures;
  double job_set_p50_us, job_set_p99_us, gen_set_p50_us, gen_set_p99_us;
};

SizeResult runOne(int n, int connections, int trials, int interval_ms, int load_seconds) {
  const std::string dir = fmt::format("/tmp/rally-bench-{}", getpid());
  std::system(fmt::format("mkdir -p {}", dir).c_str());
  const std::string token_file = dir + "/token", port_file = dir + "/port";
  ::unlink(port_file.c_str());
  rally::testing::ChildProcess coord(
      {RALLY_BINARY, "coordinator", "--host", "127.0.0.1", "--port", "0", "--token-file",
       token_file, "--port-file", port_file, "--nnodes", fmt::format("1:{}", n), "--job-id",
       "bench", "--heartbeat-interval", fmt::format("{}ms", interval_ms), "--log-level", "info"},
      dir + "/coordinator.log");
  if (!coord.waitForOutput("listening", milliseconds(20000))) {
    std::cerr << "coordinator did not start: " << coord.errors() << "\n";
    std::exit(1);
  }
  const std::string port = rally::testing::ChildProcess::readFile(port_file);
  const std::string token = *rendezvous::readTokenFile(token_file);

  std::vector<std::shared_ptr<rendezvous::CoordinatorConnection>> conns;
  for (int c = 0; c < connections; ++c) {
    rendezvous::ClientOptions o;
    o.endpoint = "127.0.0.1:" + port.substr(0, port.find('\n'));
    o.token = token;
    o.dedicated_connection = true;
    conns.push_back(*rendezvous::CoordinatorConnection::open(o));
  }

  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> formed{0};
  std::map<std::string, Clock::time_point> detected;  // failed node -> when its event arrived
  std::uint64_t last_formed_generation = 0;
  auto watcher = rendezvous::GenerationWatcher::start(conns[0], [&](const v1::GenerationEvent& e) {
    std::lock_guard lock(mu);
    for (const auto& id : e.failed_nodes()) detected.emplace(id, Clock::now());
    if (e.state() == v1::GenerationEvent::FORMED) last_formed_generation = e.generation();
    cv.notify_all();
  });

  std::vector<std::unique_ptr<Agent>> agents(n);
  for (auto& a : agents) a = std::make_unique<Agent>();
  std::atomic<int> opened{0};

  // Heartbeats twice per interval for every open, live, non-silent agent, from one thread, from
  // each agent's join on (as a real agent's heartbeat thread does).
  std::atomic<bool> stop{false};
  std::thread beater([&] {
    while (!stop) {
      const auto next = Clock::now() + milliseconds(interval_ms / 2);
      const int count = opened.load();
      for (int i = 0; i < count; ++i) {
        Agent& a = *agents[i];
        if (a.dead || a.silent) continue;
        a.session->heartbeat();
        a.last_beat_ns = nowNs();
      }
      std::this_thread::sleep_until(next);
    }
  });

  // Agents join in parallel, as separate machines would: two opening threads for two cores.
  constexpr int kOpeners = 2;
  std::vector<std::atomic<int>> opened_by(kOpeners);
  const auto t0 = Clock::now();
  auto open_range = [&](int first) {
    for (int i = first; i < n; i += kOpeners) {
      Agent* a = agents[i].get();
      rendezvous::AgentSessionOptions opts;
      opts.auto_heartbeat = false;
      if (i < 3) opts.replica = std::make_shared<rendezvous::JobScopeReplica>();
      opts.on_message = [a, &formed, &cv, n](const v1::CoordinatorMessage& m) {
        if (m.has_round_formed() && a->formed_ns.load() == 0) {
          a->formed_ns = nowNs();
          if (formed.fetch_add(1) + 1 == n) cv.notify_all();
        }
      };
      auto s = rendezvous::AgentSession::open(conns[i % connections],
                                              {.node_id = fmt::format("agent-{}", i),
                                               .job_id = "bench",
                                               .local_world_size = 8,
                                               .address = "127.0.0.1"},
                                              std::move(opts));
      a->session = std::move(*s);
      a->last_beat_ns = nowNs();
      opened_by[first] = i + 1;
      opened = std::min(opened_by[0].load(), opened_by[1].load());
    }
  };
  std::thread second_opener(open_range, 1);
  open_range(0);
  second_opener.join();
  opened = n;
  const double open_s = msBetween(t0, Clock::now()) / 1000.0;
  {
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(120), [&] { return formed.load() == n; })) {
      std::cerr << fmt::format("only {} of {} agents got the round\n", formed.load(), n);
      std::exit(1);
    }
  }
  std::int64_t last = 0;
  for (auto& a : agents) last = std::max(last, a->formed_ns.load());
  const double round_s =
      (last - std::chrono::duration_cast<std::chrono::nanoseconds>(t0.time_since_epoch()).count()) /
      1e9;
  std::cerr << fmt::format("# {} agents: joins sent in {:.3f} s, round known by all at {:.3f} s\n",
                           n, open_s, round_s);

  // Coordinator cost under steady heartbeats.
  const ProcSample before = sample(coord.pid());
  const auto l0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(load_seconds));
  const ProcSample after = sample(coord.pid());
  const double cpu =
      100.0 * (after.cpu_seconds - before.cpu_seconds) / (msBetween(l0, Clock::now()) / 1000.0);
  // Store writes, one at a time, from a client of its own: the job scope (copied to the holders
  // before the answer) and the first generation's scope (not copied).
  std::vector<double> job_set_us, gen_set_us;
  {
    rendezvous::ClientOptions o = conns[0]->options();
    o.dedicated_connection = true;
    auto client = *rendezvous::CoordinatorConnection::open(o);
    rendezvous::StoreClient job(client), gen = job.scoped("", 1);
    for (int i = 0; i < 220; ++i) {
      const auto w0 = Clock::now();
      if (!job.set("bench/k", std::to_string(i)).ok()) break;
      const auto w1 = Clock::now();
      if (!gen.set("bench/k", std::to_string(i)).ok()) break;
      if (i < 20) continue;  // warm-up
      job_set_us.push_back(msBetween(w0, w1) * 1000);
      gen_set_us.push_back(msBetween(w1, Clock::now()) * 1000);
    }
  }
  // Nobody was killed yet: any node reported failed so far is a false failure.
  int false_failures = 0;
  {
    std::lock_guard lock(mu);
    false_failures = static_cast<int>(detected.size());
  }

  // One trial at a time: each waits for its re-formed round to reach the watcher and for the
  // simulated agents to settle, so that the simulator (all agents in this one process, on the same
  // cores as the coordinator) is not what gets measured.
  auto settle = [&](std::unique_lock<std::mutex>& lock, std::uint64_t after_generation) {
    cv.wait_for(lock, std::chrono::seconds(10),
                [&] { return last_formed_generation > after_generation; });
    lock.unlock();
    std::this_thread::sleep_for(milliseconds(interval_ms / 2));
    lock.lock();
  };
  std::vector<double> kill_ms, hang_ms;
  int victim = 0;
  // Killed agents: the stream is cancelled, as when the process dies.
  for (int t = 0; t < trials && victim < n - 1; ++victim) {
    Agent& a = *agents[victim];
    const std::string id = fmt::format("agent-{}", victim);
    std::unique_lock lock(mu);
    if (detected.count(id) != 0) continue;  // already (falsely) failed
    const std::uint64_t generation = last_formed_generation;
    const auto k0 = Clock::now();
    a.dead = true;
    a.session->cancel();
    if (!cv.wait_for(lock, std::chrono::seconds(10), [&] { return detected.count(id) != 0; })) {
      std::cerr << "kill of " << id << " not detected in 10 s\n";
    } else {
      kill_ms.push_back(msBetween(k0, detected[id]));
    }
    ++t;
    settle(lock, generation);
  }
  // Hung agents: alive but silent; latency from the last heartbeat it sent.
  for (int t = 0; t < trials && victim < n - 1; ++victim) {
    Agent& a = *agents[victim];
    const std::string id = fmt::format("agent-{}", victim);
    std::unique_lock lock(mu);
    if (detected.count(id) != 0) continue;
    const std::uint64_t generation = last_formed_generation;
    a.silent = true;
    lock.unlock();
    std::this_thread::sleep_for(
        milliseconds(interval_ms / 2 + 50));  // past any heartbeat in flight
    const std::int64_t last_beat_ns = a.last_beat_ns.load();
    lock.lock();
    if (!cv.wait_for(lock, milliseconds(interval_ms * 4),
                     [&] { return detected.count(id) != 0; })) {
      std::cerr << "hung " << id << " not detected in 4 intervals\n";
    } else {
      const double at_ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(detected[id].time_since_epoch())
              .count();
      hang_ms.push_back((at_ns - last_beat_ns) / 1e6);
    }
    ++t;
    settle(lock, generation);
  }
  int false_failures_total = 0;
  {
    std::lock_guard lock(mu);
    false_failures_total = static_cast<int>(detected.size()) - static_cast<int>(kill_ms.size()) -
                           static_cast<int>(hang_ms.size());
  }
  false_failures = std::max(false_failures, false_failures_total);
  stop = true;
  beater.join();
  agents.clear();
  watcher->reset();
  coord.signal(SIGTERM);
  coord.waitExit(milliseconds(10000));
  return SizeResult{n,
                    round_s,
                    cpu,
                    after.rss_mib,
                    percentile(kill_ms, 50),
                    percentile(kill_ms, 99),
                    percentile(hang_ms, 50),
                    percentile(hang_ms, 99),
                    false_failures,
                    percentile(job_set_us, 50),
                    percentile(job_set_us, 99),
                    percentile(gen_set_us, 50),
                    percentile(gen_set_us, 99)};
}

std::vector<int> parseSizes(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoi(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> sizes = {64, 256, 1024, 4096, 10000};
  int connections = 256, trials = 10, interval_ms = 1000, load_seconds = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--sizes")
      sizes = parseSizes(argv[i + 1]);
    else if (flag == "--connections")
      connections = std::stoi(argv[i + 1]);
    else if (flag == "--trials")
      trials = std::stoi(argv[i + 1]);
    else if (flag == "--heartbeat-interval-ms")
      interval_ms = std::stoi(argv[i + 1]);
    else if (flag == "--load-seconds")
      load_seconds = std::stoi(argv[i + 1]);
    else {
      std::cerr << "unknown flag " << flag << "\n";
      return 2;
    }
  }
  coordinator::raiseOpenFileLimit();
  (void)rally::log::setup("bench", "warn");
  std::vector<SizeResult> results;
  std::cout << fmt::format("# heartbeat interval {} ms, {} trials per failure kind\n", interval_ms,
                           trials);
  std::cout << fmt::format(
      "# {:>7} {:>6} {:>9} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>6} {:>12} {:>12}\n", "agents",
      "conns", "round_s", "cpu_%", "rss_MiB", "kill_p50ms", "kill_p99ms", "hang_p50ms",
      "hang_p99ms", "false", "jobset_us", "genset_us");
  for (int n : sizes) {
    const int c = std::min(n, connections);
    SizeResult r = runOne(n, c, trials, interval_ms, load_seconds);
    results.push_back(r);
    std::cout << fmt::format(
                     "  {:>7} {:>6} {:>9.3f} {:>8.1f} {:>8.1f} {:>10.1f} {:>10.1f} {:>10.1f} "
                     "{:>10.1f} {:>6} {:>12} {:>12}\n",
                     r.agents, c, r.round_s, r.cpu_percent, r.rss_mib, r.kill_p50, r.kill_p99,
                     r.hang_p50, r.hang_p99, r.false_failures,
                     fmt::format("{:.0f}/{:.0f}", r.job_set_p50_us, r.job_set_p99_us),
                     fmt::format("{:.0f}/{:.0f}", r.gen_set_p50_us, r.gen_set_p99_us))
              << std::flush;
  }
  for (const SizeResult& r : results) {
    std::cout << fmt::format(
        "rendezvous agents={} seconds={:.3f} detect_p99_ms={:.0f}{}\n", r.agents, r.round_s,
        std::max(r.kill_p99, r.hang_p99),
        r.false_failures == 0 ? "" : fmt::format(" false_failures={}", r.false_failures));
  }
  return 0;
}
