#include "launcher/agent/agent.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <variant>

#include "kernels/base/logging.h"
#include "kernels/base/telemetry_files.h"
#include "launcher/agent/internal/agent_impl.h"

namespace rally::agent {
namespace {

Result<int> freePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return errnoStatus("socket", errno);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int e = errno;
    ::close(fd);
    return errnoStatus("choosing a free MASTER_PORT", e);
  }
  ::close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

// The workers' telemetry directories: made by the agent (a bad path fails before any worker
// starts) and passed on as absolute paths.
struct TelemetryDir {
  const char* tunable;
  const char* flag;
  const char* env;
};
constexpr TelemetryDir kTelemetryDirs[] = {{"trace_dir", "--trace-dir", "RALLY_TRACE_DIR"},
                                           {"metrics_dir", "--metrics-dir", "RALLY_METRICS_DIR"}};

}  // namespace

std::string hostName() {
  char buf[256] = {};
  gethostname(buf, sizeof(buf) - 1);
  return buf;
}

std::string randomHex(int bytes) {
  std::random_device rd;
  std::string out;
  for (int i = 0; i < bytes; ++i) out += fmt::format("{:02x}", rd() & 0xff);
  return out;
}

Agent::Agent(cli::RunOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Agent::~Agent() = default;
int Agent::run() { return impl_->run(); }

int Agent::Impl::run() {
  // Signals are taken by a thread of ours (sigtimedwait); block them before any thread starts.
  sigset_t set;
  sigemptyset(&set);
  for (int s : o_.signals_to_handle) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal_thread_ = std::thread([this, set] { signalLoop(set); });

  int code = 1;
  if (Status s = setup(); !s.ok()) {
    std::cerr << "rally run: " << s.message() << "\n";
    code = 2;
  } else if (o_.staticBackend()) {
    code = runStatic();
  } else if (Status c = connect(); !c.ok()) {
    if (std::optional<int> sig;
        c.code() == StatusCode::kAborted && (sig = queue_.takeSignal()).has_value()) {
      log_->warn("received {} while looking for the job's coordinator: stopping",
                 cli::signalName(*sig));
      code = 128 + *sig;
    } else {
      log_->error("{}", c.message());
      code = 1;
    }
  } else {
    code = loop();
  }
  return finish(code);
}

void Agent::Impl::signalLoop(sigset_t set) {
  while (!stop_signals_) {
    timespec timeout{0, 200'000'000};
    const int sig = sigtimedwait(&set, nullptr, &timeout);
    if (sig > 0) queue_.push(SignalReceived{sig});
  }
}

int Agent::Impl::finish(int code) {
  // Signalled (e.g. preempted) while hosting the coordinator: the job may go on without this node,
  // so the round's successors take the coordinator over at once. Not leaving first spares the job
  // a second re-form: the takeover's round is the one without this node.
  const bool hand_over = embedded_ && code > 128;
  if (hand_over) {  // before this node's session ends, which the others would take as a re-form
    embedded_->handOver(fmt::format("the agent hosting the coordinator was stopped by {}",
                                    cli::signalName(code - 128)));
    embedded_.reset();
  }
  if (group_) stopWorkers(SIGTERM, "the agent is exiting");
  if (session_ && !session_->ended() && !hand_over) {
    session_->leave(code == 0 ? "finished" : fmt::format("exiting with code {}", code));
    session_->endStatus(Milliseconds(2000));
  }
  session_.reset();
  if (embedded_) {
    // Other agents may still need the coordinator to learn how the job ended: wait (bounded) for
    // them to go.
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (embedded_->service().stats().sessions > 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(Milliseconds(20));
    }
    embedded_->shutdown("the agent hosting the coordinator exited");
    embedded_.reset();
  }
  stop_signals_ = true;
  if (signal_thread_.joinable()) signal_thread_.join();
  if (events_) events_->write("agent_exit", {{"exit_code", code}});
  return code;
}

Status Agent::Impl::setup() {
  node_id_ = o_.node_id.empty() ? fmt::format("{}-{}", hostName(), getpid()) : o_.node_id;
  address_ = !o_.local_addr.empty() ? o_.local_addr : (o_.standalone ? "127.0.0.1" : hostName());
  RALLY_RETURN_IF_ERROR(
      log::setup(fmt::format("node {}", node_id_), *o_.tunables.string("log_level")));
  log_ = log::get("agent");
  std::string agent_metrics;
  if (auto dir = o_.tunables.string("metrics_dir"); dir.ok() && !dir->empty()) {
    agent_metrics =
        (std::filesystem::path(*dir) / ("rally-agent-" + fileNameSafe(node_id_) + ".prom"))
            .string();
  }
  RALLY_ASSIGN_OR_RETURN(events_, EventLog::open(o_.events_file, node_id_, agent_metrics,
                                                 {{"node", node_id_}, {"run", o_.rdzv_id}}));
  const std::string base =
      o_.log_dir.empty() ? std::filesystem::temp_directory_path().string() : o_.log_dir;
  run_dir_ = fmt::format("{}/rally_{}_{}", base, o_.rdzv_id, randomHex(4));
  std::error_code ec;
  std::filesystem::create_directories(run_dir_, ec);
  if (ec) return ioError(fmt::format("--log-dir: cannot create {}: {}", run_dir_, ec.message()));
  // The workers write telemetry (rally::World): refuse what they would refuse, before they start.
  if (const std::int64_t n = *o_.tunables.integer("trace_buffer"); n < 0) {
    return invalidArgument(fmt::format("--trace-buffer {}: must be a count of at least 0", n));
  }
  if (tunable("telemetry_interval") < kMinTelemetryInterval) {
    return invalidArgument(fmt::format("--telemetry-interval {}: must be at least {} (e.g. 10s)",
                                       formatDuration(tunable("telemetry_interval")),
                                       formatDuration(kMinTelemetryInterval)));
  }
  for (const TelemetryDir& d : kTelemetryDirs) {
    if (auto dir = o_.tunables.string(d.tunable); dir.ok() && !dir->empty()) {
      std::filesystem::create_directories(*dir, ec);
      if (ec) return ioError(fmt::format("{}: cannot create {}: {}", d.flag, *dir, ec.message()));
    }
  }
  if (const Milliseconds t = tunable("progress_timeout"); t.count() > 0) {
    auto dog = ProgressWatchdog::open(t);
    RALLY_RETURN_IF_ERROR(dog.status()) << "--progress-timeout";
    watchdog_ = std::move(*dog);
  }
  if (!o_.fault_plan.empty()) {
    RALLY_ASSIGN_OR_RETURN(FaultPlan plan, FaultPlan::fromFile(o_.fault_plan));
    fault_plan_text_ = plan.toText();
    fault_plan_ = std::move(plan);
  }
  return okStatus();
}

std::map<std::string, std::string> Agent::Impl::workerEnv(const v1::RoundFormed& r, int local_rank,
                                                          int master_port,
                                                          const std::string& error_file) {
  std::map<std::string, std::string> env = cli::processEnvironment();
  const int lws = o_.local_world_size;
  const int rank = static_cast<int>(r.rank_offset()) + local_rank;
  const std::map<std::string, std::string> vars = {
      {"LOCAL_RANK", std::to_string(local_rank)},
      {"RANK", std::to_string(rank)},
      {"GROUP_RANK", std::to_string(r.node_rank())},
      {"ROLE_RANK", std::to_string(rank)},
      {"ROLE_NAME", o_.role},
      {"LOCAL_WORLD_SIZE", std::to_string(lws)},
      {"WORLD_SIZE", std::to_string(r.world_size())},
      {"GROUP_WORLD_SIZE", std::to_string(r.num_nodes())},
      {"ROLE_WORLD_SIZE", std::to_string(r.world_size())},
      {"MASTER_ADDR", r.master_address()},
      {"MASTER_PORT", std::to_string(master_port)},
      {"TORCHELASTIC_RESTART_COUNT", std::to_string(restart_count_)},
      {"TORCHELASTIC_MAX_RESTARTS", std::to_string(o_.max_restarts)},
      {"TORCHELASTIC_RUN_ID", o_.rdzv_id},
      {"TORCHELASTIC_USE_AGENT_STORE", "False"},
      {"TORCHELASTIC_ERROR_FILE", error_file},
      {"RALLY_RANK", std::to_string(rank)},
      {"RALLY_LOCAL_RANK", std::to_string(local_rank)},
      {"RALLY_WORLD_SIZE", std::to_string(r.world_size())},
      {"RALLY_LOCAL_WORLD_SIZE", std::to_string(lws)},
      {"RALLY_NODE_RANK", std::to_string(r.node_rank())},
      {"RALLY_NUM_NODES", std::to_string(r.num_nodes())},
      {"RALLY_GENERATION", std::to_string(r.generation())},
      {"RALLY_RESTART_COUNT", std::to_string(restart_count_)},
      {"RALLY_RUN_ID", o_.rdzv_id},
      {"RALLY_NODE_ID", node_id_},
  };
  for (const auto& [k, v] : vars) env[k] = v;
  env["RALLY_RECOVERY"] = o_.recovery;
  if (!fault_plan_text_.empty()) env["RALLY_FAULTS"] = fault_plan_text_;
  // Checkpoint settings are the workers' (ElasticRun reads them): given as flags to rally run, or
  // in the agent's environment, they reach the workers as variables.
  if (auto dir = o_.tunables.string("checkpoint_dir"); dir.ok() && !dir->empty()) {
    env["RALLY_CHECKPOINT_DIR"] = std::filesystem::absolute(*dir).string();
    env["RALLY_CHECKPOINT_EVERY"] = std::to_string(o_.tunables.integer("checkpoint_every").value());
    env["RALLY_CHECKPOINT_KEEP"] = std::to_string(o_.tunables.integer("checkpoint_keep").value());
  }
  for (const TelemetryDir& d : kTelemetryDirs) {
    if (auto dir = o_.tunables.string(d.tunable); dir.ok() && !dir->empty()) {
      env[d.env] = std::filesystem::absolute(*dir).string();
    }
  }
  env["RALLY_TRACE_BUFFER"] = std::to_string(o_.tunables.integer("trace_buffer").value());
  env["RALLY_HEARTBEAT_INTERVAL"] = std::to_string(tunable("heartbeat_interval").count()) + "ms";
  env["RALLY_TELEMETRY_INTERVAL"] =
      std::to_string(o_.tunables.duration("telemetry_interval").value().count()) + "ms";
  if (watchdog_) {
    env["RALLY_PROGRESS_SOCKET"] = watchdog_->socketName();
    env["RALLY_PROGRESS_INTERVAL"] = std::to_string(watchdog_->reportInterval().count());
  }
  if (!o_.events_file.empty()) {
    env["RALLY_EVENTS"] = std::filesystem::absolute(o_.events_file).string();
  }
  if (conn_) {  // none with the static backend
    env["RALLY_COORDINATOR"] = conn_->endpoint();
    env["RALLY_COORDINATOR_FILE"] = coordinator_file_;
    env["RALLY_TOKEN"] = conn_->options().token;
  }
  if (env.count("NCCL_ASYNC_ERROR_HANDLING") == 0) env["NCCL_ASYNC_ERROR_HANDLING"] = "1";
  if (env.count("OMP_NUM_THREADS") == 0 && lws > 1) env["OMP_NUM_THREADS"] = "1";
  return env;
}

Status Agent::Impl::startWorkers(const v1::RoundFormed& r) {
  auto restarts = store_->get("restarts");
  RALLY_RETURN_IF_ERROR(restarts.status()) << "reading the job's restart count";
  restart_count_ = restarts->has_value() ? std::stoi(**restarts) : 0;
  job_restarts_ = std::max<std::int64_t>(job_restarts_, restart_count_);
  int master_port = o_.master_port;
  if (!o_.master_port_given) {
    rendezvous::StoreClient gen =
        rendezvous::StoreClient(conn_).scoped("rally/run/", r.generation());
    if (r.node_rank() == 0) {
      RALLY_ASSIGN_OR_RETURN(master_port, freePort());
      RALLY_RETURN_IF_ERROR(gen.set("master_port", std::to_string(master_port)));
    } else {
      RALLY_RETURN_IF_ERROR(gen.wait({"master_port"}, tunable("join_timeout")))
          << "waiting for node rank 0 to choose MASTER_PORT";
      RALLY_ASSIGN_OR_RETURN(auto port, gen.get("master_port"));
      master_port = port ? std::stoi(*port) : 0;
    }
  }
  return spawn(r, master_port);
}

WorkerSpec Agent::Impl::specFor(const v1::RoundFormed& r, int lr, int master_port) {
  const std::string dir = fmt::format("{}/attempt_{}/{}", run_dir_, restart_count_, lr);
  std::filesystem::create_directories(dir);
  WorkerSpec spec;
  spec.local_rank = lr;
  spec.argv = o_.command();
  spec.env = workerEnv(r, lr, master_port, dir + "/error.json");
  std::filesystem::remove(dir + "/error.json");
  const cli::StdStreams redirect = o_.redirects.forRank(lr);
  const cli::StdStreams tee = o_.tee.forRank(lr);
  const bool shown = !o_.local_ranks_filter || o_.local_ranks_filter->count(lr) != 0;
  spec.stdout_to_console = shown && (!redirect.out || tee.out);
  spec.stderr_to_console = shown && (!redirect.err || tee.err);
  if (redirect.out || tee.out) spec.stdout_file = dir + "/stdout.log";
  if (redirect.err || tee.err) spec.stderr_file = dir + "/stderr.log";
  if (tee.out || tee.err) spec.console_prefix = fmt::format("[{}{}]:", o_.role, lr);
  return spec;
}

Status Agent::Impl::spawn(const v1::RoundFormed& r, int master_port) {
  std::vector<WorkerSpec> specs;
  for (int lr = 0; lr < o_.local_world_size; ++lr) specs.push_back(specFor(r, lr, master_port));
  master_port_ = master_port;
  missing_.clear();
  last_exit_ok_.clear();
  if (!workers_started_at_) workers_started_at_ = Clock::now();
  const std::uint64_t epoch = ++epoch_;
  RALLY_ASSIGN_OR_RETURN(group_,
                         WorkerGroup::start(std::move(specs), [this, epoch](const WorkerExit& e) {
                           queue_.push(WorkerExited{epoch, e});
                         }));
  round_ = r;
  log_->info(
      "generation {}: node rank {} of {}, started {} worker(s) as ranks {}..{} of {}"
      " (restart {}, MASTER_ADDR {}:{})",
      r.generation(), r.node_rank(), r.num_nodes(), o_.local_world_size, r.rank_offset(),
      r.rank_offset() + o_.local_world_size - 1, r.world_size(), restart_count_, r.master_address(),
      master_port);
  events_->write("workers_started", {{"generation", r.generation()},
                                     {"node_rank", r.node_rank()},
                                     {"num_nodes", r.num_nodes()},
                                     {"world_size", r.world_size()},
                                     {"restart", restart_count_},
                                     {"pids", group_->pids()},
                                     {"cause", r.cause()}});
  return okStatus();
}

Status Agent::Impl::spawnReplacements(const v1::RoundFormed& r) {
  std::vector<WorkerSpec> specs;
  for (int lr : missing_) specs.push_back(specFor(r, lr, master_port_));
  if (specs.empty()) return okStatus();
  const std::uint64_t epoch = epoch_;  // the same group as the survivors, for exits
  RALLY_ASSIGN_OR_RETURN(auto group,
                         WorkerGroup::start(std::move(specs), [this, epoch](const WorkerExit& e) {
                           queue_.push(WorkerExited{epoch, e});
                         }));
  log_->info(
      "generation {}: started replacement(s) for local rank(s) {} (ranks from {}); the "
      "other workers recover in place",
      r.generation(), fmt::join(missing_, ","), r.rank_offset());
  events_->write("workers_replaced",
                 {{"generation", r.generation()},
                  {"local_ranks", std::vector<int>(missing_.begin(), missing_.end())},
                  {"pids", group->pids()}});
  replacements_.push_back(std::move(group));
  missing_.clear();
  return okStatus();
}

bool Agent::Impl::allLocalWorkersSucceeded() const {
  if (!group_ || group_->running() > 0 || !missing_.empty()) return false;
  for (const auto& g : replacements_) {
    if (g->running() > 0) return false;
  }
  for (int lr = 0; lr < o_.local_world_size; ++lr) {
    auto it = last_exit_ok_.find(lr);
    if (it == last_exit_ok_.end() || !it->second) return false;
  }
  return true;
}

void Agent::Impl::stopWorkers(int sig, const std::string& why) {
  if (!group_) return;
  size_t running = group_->running();
  for (const auto& g : replacements_) running += g->running();
  ++epoch_;  // exits of this group from now on are expected
  if (running > 0) {
    log_->info("stopping {} worker(s) ({}): {} then SIGKILL after {}", running, why,
               cli::signalName(sig), formatDuration(tunable("grace_period")));
    const auto t0 = Clock::now();
    for (const auto& g : replacements_) g->signalAll(sig);
    group_->stop(sig, tunable("grace_period"));
    for (const auto& g : replacements_) g->stop(SIGKILL, Milliseconds(0));
    events_->write("workers_stopped",
                   {{"reason", why},
                    {"ms", std::chrono::duration_cast<Milliseconds>(Clock::now() - t0).count()}});
  }
  group_.reset();
  replacements_.clear();
  missing_.clear();
  in_barrier_ = false;
}

std::optional<int> Agent::Impl::onWorkerFailure(const WorkerExit& e) {
  const v1::RoundFormed& r = *round_;
  WorkerFailure f;
  f.time = isoTime(e.when);
  f.node_id = node_id_;
  f.host = fmt::format("{} ({})", hostName(), address_);
  f.node_rank = static_cast<int>(r.node_rank());
  f.local_rank = e.local_rank;
  f.global_rank = static_cast<int>(r.rank_offset()) + e.local_rank;
  f.exit_code = e.exit_code;
  if (e.signal != 0) {
    const char* abbrev = sigabbrev_np(e.signal);
    f.signal = abbrev != nullptr ? std::string("SIG") + abbrev : std::to_string(e.signal);
  }
  f.oom_killed = e.oom_killed;
  f.stderr_tail = e.stderr_tail;
  f.generation = r.generation();
  f.restart = restart_count_;
  readErrorFile(fmt::format("{}/attempt_{}/{}/error.json", run_dir_, restart_count_, e.local_rank),
                &f.error_message, &f.error_traceback);
  if (auto hung = hung_killed_.find(e.pid); hung != hung_killed_.end()) {
    f.error_message =
        fmt::format("hung: stopped for {} (--hang-timeout {}); killed by its agent",
                    formatDuration(hung->second), formatDuration(tunable("hang_timeout")));
    hung_killed_.erase(hung);  // the pid may be reused
  }
  if (auto stalled = stalled_killed_.find(e.pid); stalled != stalled_killed_.end()) {
    f.error_message = stalled->second;
    stalled_killed_.erase(stalled);
  }
  log_->error("worker local rank {} (rank {}) failed: {}", e.local_rank, f.global_rank,
              e.describe());
  events_->write("worker_failed", f.toJson());
  (void)store_->set(fmt::format("failures/{:08}/{}/{}", r.generation(), node_id_, e.local_rank),
                    f.toJson().dump());
  // When it died, in microseconds since the epoch: in-place recovery times its detection from it.
  (void)store_->set(
      fmt::format("failure_times/{:08}/{}/{}", r.generation(), node_id_, e.local_rank),
      std::to_string(
          std::chrono::duration_cast<std::chrono::microseconds>(e.when.time_since_epoch())
              .count()));
  if (o_.inPlace()) {
    missing_.insert(e.local_rank);  // replaced when the next round forms; the others go on
  } else {
    stopWorkers(SIGTERM, "a worker failed");
  }

  return claimRestart(f, e.describe());
}

std::optional<int> Agent::Impl::claimRestart(const WorkerFailure& f, const std::string& what,
                                             bool reform) {
  // One restart per failed generation, however many nodes saw failures in it.
  auto claim =
      store_->compareAndSet(fmt::format("restart_claim/{}", f.generation), std::nullopt, node_id_);
  if (!claim.ok()) {
    // The coordinator is away (lost, or restarting): count it when one is back, so that failures
    // during an outage are held to --max-restarts like any other.
    unaccounted_.push_back({f, what});
    return std::nullopt;
  }
  if (!claim->swapped) return std::nullopt;  // another node decides
  auto restarts = store_->add("restarts", 1);
  if (restarts.ok()) job_restarts_ = std::max(job_restarts_, *restarts);
  if (restarts.ok() && *restarts <= o_.max_restarts) {
    if (!reform) return std::nullopt;
    session_->requestReform(fmt::format(
        "worker failed on node '{}' (local rank {}: {}); {} {} of {}", node_id_, f.local_rank, what,
        o_.inPlace() ? "in-place recovery" : "restart", *restarts, o_.max_restarts));
    return std::nullopt;
  }
  // Out of restarts: report the job's failures of this generation, first by time as root cause.
  std::this_thread::sleep_for(Milliseconds(300));  // let near-simultaneous failures be recorded
  std::vector<WorkerFailure> failures;
  rendezvous::StoreClient store = *store_;
  if (auto keys = store.list(fmt::format("failures/{:08}/", f.generation)); keys.ok()) {
    for (const auto& k : *keys) {
      if (auto v = store.get(k); v.ok() && v->has_value()) {
        failures.push_back(WorkerFailure::fromJson(nlohmann::json::parse(**v, nullptr, false)));
      }
    }
  }
  if (failures.empty()) failures.push_back(f);
  const std::string report = formatReport(
      failures, fmt::format("rally run: job '{}' failed after {} restart(s) (--max-restarts {})",
                            o_.rdzv_id, restart_count_, o_.max_restarts));
  std::cerr << report << std::flush;
  if (o_.inPlace()) stopWorkers(SIGTERM, "the job failed");
  events_->write("job_failed", {{"root_cause", failures.front().toJson()}});
  session_->close("failed:\n" + report);
  return 1;
}

std::optional<int> Agent::Impl::accountOutageFailures(bool reform) {
  if (unaccounted_.empty()) return std::nullopt;
  std::vector<Unaccounted> pending;
  pending.swap(unaccounted_);
  for (const Unaccounted& u : pending) {
    const WorkerFailure& f = u.failure;
    (void)store_->set(fmt::format("failures/{:08}/{}/{}", f.generation, node_id_, f.local_rank),
                      f.toJson().dump());
  }
  log_->warn("{} worker failure(s) while the coordinator was away: counting them now",
             pending.size());
  // Generations in order, once each (a claim per generation, as for any failure).
  std::set<std::uint64_t> claimed;
  for (const Unaccounted& u : pending) {
    if (!claimed.insert(u.failure.generation).second) continue;
    if (auto code = claimRestart(u.failure, u.what, reform)) return code;
  }
  return std::nullopt;
}

std::optional<int> Agent::Impl::onAllWorkersSucceeded() {
  const v1::RoundFormed& r = *round_;
  log_->info("all {} worker(s) finished; waiting for the other nodes (exit barrier, {})",
             o_.local_world_size, formatDuration(tunable("exit_barrier_timeout")));
  events_->write("workers_succeeded", {{"generation", r.generation()}});
  in_barrier_ = true;
  barrier_deadline_ = Clock::now() + tunable("exit_barrier_timeout");
  countInBarrier();
  return std::nullopt;
}

void Agent::Impl::countInBarrier() {
  const v1::RoundFormed& r = *round_;
  const std::string scope = fmt::format("done/{}/", r.generation());
  if (Status s = store_->set(scope + node_id_, "1"); !s.ok()) {
    // The coordinator is away: counted again when it is back (onRoundResumed), or in the round
    // that follows its takeover.
    log_->warn("exit barrier: {}", s.message());
    return;
  }
  auto done = store_->list(scope);
  if (done.ok() && done->size() >= r.num_nodes()) {
    session_->close("succeeded: every worker finished");
  }
}

// --rdzv-backend static: a fixed job with no coordinator. Ranks come from --node-rank and a world
// of
// --nnodes equal nodes; a failure restarts this node's workers, up to --max-restarts, and other
// nodes are not told (as with torchrun's static rendezvous).
int Agent::Impl::runStatic() {
  v1::RoundFormed r;
  r.set_generation(1);
  r.set_node_rank(static_cast<std::uint32_t>(o_.node_rank));
  r.set_num_nodes(o_.max_nodes);
  r.set_rank_offset(static_cast<std::uint32_t>(o_.node_rank * o_.local_world_size));
  r.set_world_size(o_.max_nodes * static_cast<std::uint32_t>(o_.local_world_size));
  r.set_master_address(o_.master_addr);
  r.set_cause("static rendezvous");
  round_ = r;
  for (restart_count_ = 0;; ++restart_count_) {
    if (Status s = spawn(r, o_.master_port); !s.ok()) {
      std::cerr << "rally run: " << s.message() << "\n";
      return 1;
    }
    std::optional<WorkerExit> failure;
    while (group_ && group_->running() > 0 && !failure) {
      auto next = queue_.pop(Milliseconds(500));
      if (!next) continue;
      if (auto* sig = std::get_if<SignalReceived>(&*next)) {
        stopWorkers(sig->sig, fmt::format("received {}", cli::signalName(sig->sig)));
        return 128 + sig->sig;
      }
      if (auto* exited = std::get_if<WorkerExited>(&*next); exited && exited->epoch == epoch_) {
        if (!exited->exit.ok()) failure = exited->exit;
      }
    }
    if (!failure) {
      stopWorkers(SIGTERM, "finished");
      return 0;
    }
    log_->error("worker local rank {} failed: {}", failure->local_rank, failure->describe());
    stopWorkers(SIGTERM, "a worker failed");
    if (restart_count_ >= o_.max_restarts) {
      WorkerFailure f;
      f.time = isoTime(failure->when);
      f.node_id = node_id_;
      f.host = hostName();
      f.node_rank = o_.node_rank;
      f.local_rank = failure->local_rank;
      f.global_rank = o_.node_rank * o_.local_world_size + failure->local_rank;
      f.exit_code = failure->exit_code;
      f.stderr_tail = failure->stderr_tail;
      f.restart = restart_count_;
      std::cerr << formatReport({f}, fmt::format("rally run: job '{}' failed after {} restart(s)",
                                                 o_.rdzv_id, restart_count_))
                << std::flush;
      return 1;
    }
  }
}

int Agent::Impl::loop() {
  // Bounded like every other wait: a coordinator that never answers is an error naming it.
  const auto welcome_deadline = Clock::now() + tunable("connect_timeout");
  bool welcomed = false;
  for (;;) {
    if (!welcomed && Clock::now() > welcome_deadline) {
      log_->error(
          "cannot reach the coordinator at {} within {} (--connect-timeout): is its host "
          "up, is the port right, and is it a rally coordinator that listens there?",
          conn_->endpoint(), formatDuration(tunable("connect_timeout")));
      return 1;
    }
    if (in_barrier_ && Clock::now() > barrier_deadline_) {
      log_->error("exit barrier timed out after {}: the other nodes did not finish",
                  formatDuration(tunable("exit_barrier_timeout")));
      return 1;
    }
    if (takeover_ && takeover_->reopen_at && Clock::now() >= *takeover_->reopen_at) {
      takeover_->reopen_at.reset();
      if (Status s = openSession(&*round_); !s.ok()) {
        log_->warn("rejoining the coordinator at {}: {}", conn_->endpoint(), s.message());
      }
    }
    // Past the deadline, but a Welcome may be queued: give up only with nothing left to read.
    if (takeover_ && Clock::now() > takeover_->deadline && queue_.empty()) {
      log_->warn("no answer from the coordinator at {} within {}", conn_->endpoint(),
                 formatDuration(takeover_->patience));
      if (auto code = tryNextSuccessor()) return *code;
    }
    checkHungWorkers();
    applyTimedFaults();
    checkAdmission();
    if (auto code = deferToMovedCoordinator()) return *code;
    if (auto code = watchForRivals()) return *code;
    auto next = queue_.pop(Milliseconds(fault_plan_ || watchdog_ ? 20 : 100));
    if (!next) continue;
    if (auto* sig = std::get_if<SignalReceived>(&*next)) {
      log_->warn("received {}: forwarding it to the workers", cli::signalName(sig->sig));
      if (embedded_) {
        // Hosting the coordinator: hand it over first, so that the others take it over now
        // rather than after this node's workers have stopped (up to --grace-period).
        embedded_->handOver(fmt::format("the agent hosting the coordinator received {}",
                                        cli::signalName(sig->sig)));
        embedded_.reset();
        stopWorkers(sig->sig, fmt::format("received {}", cli::signalName(sig->sig)));
        return 128 + sig->sig;
      }
      stopWorkers(sig->sig, fmt::format("received {}", cli::signalName(sig->sig)));
      session_->leave(fmt::format("received {}", cli::signalName(sig->sig)));
      return 128 + sig->sig;
    }
    if (auto* ended = std::get_if<SessionEnded>(&*next)) {
      if (ended->session != session_serial_.load()) continue;  // superseded by a takeover
      if (takeover_ && takeover_->same_endpoint && Clock::now() < takeover_->deadline) {
        // Not up yet, or it still holds this node's old session: try again shortly.
        takeover_->reopen_at = Clock::now() + Milliseconds(250);
        continue;
      }
      if (relocate_deadline_ && ended->status.code() == StatusCode::kAlreadyExists &&
          Clock::now() < *relocate_deadline_) {
        // The coordinator still holds this node's broken session: it lets go within a heartbeat
        // interval or two.
        std::this_thread::sleep_for(Milliseconds(250));
        if (Status s = openSession(nullptr); !s.ok()) {
          log_->error("cannot join the coordinator at {}: {}", conn_->endpoint(), s.message());
          return 1;
        }
        continue;
      }
      if (takeover_) {
        log_->warn("the coordinator at {} did not take this node: {}", conn_->endpoint(),
                   ended->status.message());
        if (auto code = tryNextSuccessor()) return *code;
        continue;
      }
      const StatusCode code = ended->status.code();
      if (session_->lostCoordinator() &&
          beginTakeover(ended->status.message(), /*handover=*/false)) {
        if (auto code = tryNextSuccessor()) return *code;
        continue;
      }
      if (session_->lostCoordinator() && !round_) {
        if (relocate(ended->status.message())) continue;
        return 1;  // it said why
      }
      stopWorkers(SIGTERM, "lost the coordinator");
      if (code == StatusCode::kUnauthenticated) {
        log_->error(
            "the coordinator at {} refused this node's job token: give every node the "
            "coordinator's token in RALLY_TOKEN ({})",
            conn_->endpoint(), ended->status.message());
        return 1;
      }
      if (code == StatusCode::kInvalidArgument || code == StatusCode::kAlreadyExists ||
          code == StatusCode::kFailedPrecondition) {
        log_->error("the coordinator at {} refused this node: {}", conn_->endpoint(),
                    ended->status.message());
        return 1;
      }
      if (!session_->lostCoordinator()) {
        log_->error("the coordinator at {} ended this node's session: {}", conn_->endpoint(),
                    ended->status.message());
        return 1;
      }
      log_->error(
          "lost the coordinator at {} ({}): its host may be down, and {}, so this node stops",
          conn_->endpoint(), ended->status.message(),
          tunable("failover_timeout").count() == 0
              ? "takeover is off (--failover-timeout 0)"
              : "the job's coordinator has no successors (this node hosts it, or it is the only "
                "node)");
      return 1;
    }
    if (auto* exited = std::get_if<WorkerExited>(&*next)) {
      if (exited->epoch != epoch_ || !group_) continue;  // from a group already stopped
      std::optional<int> done;
      last_exit_ok_[exited->exit.local_rank] = exited->exit.ok();
      if (!exited->exit.ok()) {
        done = onWorkerFailure(exited->exit);
      } else if (allLocalWorkersSucceeded()) {
        done = onAllWorkersSucceeded();
      }
      if (done) return *done;
      continue;
    }
    const auto& push = std::get<CoordinatorPush>(*next);
    if (push.session != session_serial_.load()) continue;  // a session a takeover replaced
    const v1::CoordinatorMessage& m = push.message;
    welcomed = welcomed || m.has_welcome();
    if (m.has_welcome()) relocate_deadline_.reset();
    if (takeover_ && m.has_welcome()) {
      const auto ms =
          std::chrono::duration_cast<Milliseconds>(Clock::now() - takeover_->lost_at).count();
      if (takeover_->same_endpoint) {
        log_->warn("the job's coordinator is back at {} ({} ms after it was lost)",
                   conn_->endpoint(), ms);
      } else {
        log_->warn("the job's coordinator is now at {} ({} ms after the loss of {})",
                   conn_->endpoint(), ms, takeover_->lost_endpoint);
      }
      events_->write("coordinator_moved", {{"endpoint", conn_->endpoint()},
                                           {"from", takeover_->lost_endpoint},
                                           {"here", embedded_ != nullptr},
                                           {"ms", ms}});
      const bool moved = !takeover_->same_endpoint;
      takeover_.reset();
      conn_->clearLost();
      writeCoordinatorFile();
      raiseRestarts();
      // A successor's round replaces failed workers anyway; a resumed round re-forms for them
      // (onRoundResumed).
      if (moved) {
        if (auto code = accountOutageFailures(/*reform=*/false)) return *code;
      }
    }
    if (m.has_round_formed()) rememberCoordinators(m.round_formed());
    if (m.has_welcome() && m.welcome().waiting()) {
      log_->info("joined; held until the running round admits new nodes");
    } else if (m.has_round_formed() && m.round_formed().generation() == generation_) {
      // The same round again: a restarted coordinator resumed it (nothing moved).
      if (auto code = onRoundResumed(m.round_formed())) return *code;
    } else if (m.has_round_formed() && m.round_formed().generation() > generation_ &&
               o_.inPlace() && group_) {
      // In place: the running workers re-form by themselves (their generation watch aborts
      // their communicators, they read the new round); only failed ones are started anew.
      const auto& r = m.round_formed();
      generation_ = r.generation();
      round_ = r;
      // The job's restart count, for a takeover's coordinator to carry on from.
      if (auto n = store_->get("restarts"); n.ok() && n->has_value()) {
        job_restarts_ =
            std::max<std::int64_t>(job_restarts_, std::strtoll((*n)->c_str(), nullptr, 10));
      }
      log_->info("generation {}: node rank {} of {}, ranks {}..{} of {}, recovering in place ({})",
                 r.generation(), r.node_rank(), r.num_nodes(), r.rank_offset(),
                 r.rank_offset() + o_.local_world_size - 1, r.world_size(), r.cause());
      admit_pending_since_.reset();  // whatever the cause, the waiting nodes are in this round
      events_->write("round_reformed_in_place", {{"generation", r.generation()},
                                                 {"node_rank", r.node_rank()},
                                                 {"world_size", r.world_size()},
                                                 {"cause", r.cause()}});
      if (r.node_rank() == 0 && !o_.master_port_given) {
        // New nodes' workers take MASTER_PORT from node rank 0, as in a fresh start.
        (void)rendezvous::StoreClient(conn_)
            .scoped("rally/run/", r.generation())
            .set("master_port", std::to_string(master_port_));
      }
      if (Status s = spawnReplacements(r); !s.ok()) {
        log_->error("cannot start a replacement worker: {}", s.message());
        stopWorkers(SIGTERM, "a replacement could not start");
        session_->close("failed: " + s.message());
        return 1;
      }
      // This node's workers had all finished (or finished while the coordinator was away, when
      // the barrier could not count them): the new round's barrier counts its members, this one
      // too.
      if (in_barrier_) countInBarrier();
    } else if (m.has_round_formed() && m.round_formed().generation() > generation_) {
      const auto& r = m.round_formed();
      stopWorkers(SIGTERM, fmt::format("the job re-formed: {}", r.cause()));
      generation_ = r.generation();
      if (Status s = startWorkers(r); !s.ok()) {
        // The generation moved again meanwhile, or the coordinator was lost (the takeover's
        // round starts them).
        if (s.code() == StatusCode::kAborted || conn_->lost()) continue;
        if (s.code() == StatusCode::kInvalidArgument) {  // e.g. the program cannot be executed
          std::cerr << "rally run: " << s.message() << "\n";
          session_->close("failed: " + s.message());
          return 1;
        }
        log_->error("cannot start the workers: {}", s.message());
        return 1;
      }
    } else if (m.has_generation()) {
      const auto& g = m.generation();
      if (g.state() == v1::GenerationEvent::CLOSED) {
        stopWorkers(SIGTERM, "the job ended");
        const bool failed = g.cause().find("job finished: failed") == 0;
        if (failed) {
          std::cerr << g.cause().substr(std::string("job finished: failed:\n").size())
                    << std::flush;
        }
        log_->info("the job ended: {}", failed ? "failed" : "every worker finished");
        if (memory_) memory_->forget();  // a next job of the same id does not ask old addresses
        return failed ? 1 : 0;
      }
      if (g.state() == v1::GenerationEvent::REFORMING && g.generation() > generation_ &&
          !o_.inPlace()) {
        stopWorkers(SIGTERM, fmt::format("the job is re-forming: {}", g.cause()));
      }
    } else if (m.has_nodes_waiting()) {
      if (m.nodes_waiting().count() > 0 && round_ && round_->node_rank() == 0 && group_ &&
          !in_barrier_ && reform_requested_for_ != generation_) {
        reform_requested_for_ = generation_;
        if (o_.inPlace()) {
          // Admit at the workers' next commit point, so that nobody rolls back: ask, and re-form
          // when rank 0 says it has committed (or after admit_wait, for programs that never do).
          log_->info("{} node(s) waiting to join: admitting them at the next commit",
                     m.nodes_waiting().count());
          (void)store_->set("admit/requested", std::to_string(generation_));
          admit_pending_since_ = Clock::now();
          admit_waiting_ = m.nodes_waiting().count();
        } else {
          log_->info("{} node(s) waiting to join: restarting the job to admit them",
                     m.nodes_waiting().count());
          session_->requestReform(
              fmt::format("admit {} waiting node(s)", m.nodes_waiting().count()));
        }
      }
    } else if (m.has_shutdown() && m.shutdown().handover() && !takeover_ &&
               beginTakeover("its host is leaving: " + m.shutdown().reason(),
                             /*handover=*/true)) {
      if (auto code = tryNextSuccessor()) return *code;
    } else if (m.has_shutdown() && m.shutdown().handover() && takeover_ &&
               !takeover_->same_endpoint) {
      // A successor this node was joining handed its coordinator over before welcoming it (it
      // stepped aside for another successor that took over too): look again from the first.
      log_->warn("the coordinator at {} handed the job over ({}): trying the successors again",
                 conn_->endpoint(), m.shutdown().reason());
      takeover_->next = 0;
      takeover_->lost_at = Clock::now();  // each gets its patience from now
      if (auto code = tryNextSuccessor()) return *code;
    } else if (m.has_shutdown() && m.shutdown().handover() && !round_ && !takeover_) {
      // Held (or gathering) when the coordinator's host left: no successors known here, so look
      // for where it goes, as for a lost one.
      if (!relocate("its host is leaving: " + m.shutdown().reason())) return 1;
    } else if (m.has_shutdown() && !group_ &&
               m.shutdown().reason().rfind("job finished: succeeded", 0) == 0) {
      // Held for a round that never came (a spare of a full job): the job is done, and so is
      // this node.
      log_->info("the job finished while this node was held for its next round: {}",
                 m.shutdown().reason());
      return 0;
    } else if (m.has_shutdown()) {
      stopWorkers(SIGTERM, "the coordinator dismissed this node");
      log_->error("the coordinator dismissed this node: {}", m.shutdown().reason());
      return 1;
    }
  }
}

}  // namespace rally::agent
