#include "runtime/world/world.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>

#include "collectives/memory_bootstrap_store.h"
#include "collectives/registry.h"
#include "kernels/base/logging.h"
#include "kernels/base/telemetry_files.h"
#include "runtime/rendezvous/coordinator_bootstrap_store.h"
#include "runtime/rendezvous/coordinator_client.h"
#include "runtime/rendezvous/generation_watcher.h"
#include "runtime/world/internal/malloc_tuning.h"
#include "runtime/world/internal/progress.h"

extern char** environ;

namespace rally {
namespace {

using Env = std::map<std::string, std::string>;

// "Once per job" for fault firings, through the coordinator's job-scoped store.
class StoreFiredFaults final : public FiredFaults {
 public:
  // `owner`: a value no other World uses.
  StoreFiredFaults(rendezvous::StoreClient store, std::string owner)
      : store_(std::move(store)), owner_(std::move(owner)) {}
  Result<bool> claim(size_t index) override {
    // Retried while the coordinator is away: a claim in flight when it is lost is not a
    // failure of this rank. Each claim its own value: only its own earlier attempt counts.
    return store_.claim(std::to_string(index), fmt::format("{}/{}", owner_, ++claims_));
  }

 private:
  rendezvous::StoreClient store_;
  std::string owner_;
  std::atomic<std::uint64_t> claims_{0};
};

const std::string* find(const Env& env, const std::string& name) {
  auto it = env.find(name);
  return it == env.end() ? nullptr : &it->second;
}

Result<std::int64_t> intVar(const Env& env, const std::string& name, std::int64_t min,
                            const char* who) {
  const std::string* v = find(env, name);
  if (v == nullptr) {
    return invalidArgument(
        fmt::format("environment variable {} is not set ({} sets it)", name, who));
  }
  char* end = nullptr;
  const long long n = std::strtoll(v->c_str(), &end, 10);
  if (v->empty() || *end != '\0' || n < min) {
    return invalidArgument(fmt::format(
        "environment variable {}='{}' is not a whole number of at least {} ({} sets it)", name, *v,
        min, who));
  }
  return static_cast<std::int64_t>(n);
}

std::int64_t intVarOr(const Env& env, const std::string& name, std::int64_t fallback) {
  auto v = intVar(env, name, 0, "");
  return v.ok() ? *v : fallback;
}

}  // namespace

std::string_view launcherName(Launcher l) {
  switch (l) {
    case Launcher::kNone:
      return "no launcher";
    case Launcher::kMpi:
      return "MPI";
    case Launcher::kRally:
      return "rally run";
  }
  return "?";
}

World::~World() {
  std::unique_ptr<rendezvous::GenerationWatcher> watcher;
  {
    std::lock_guard lock(watch_mu_);
    stopping_ = true;
  }
  watch_cv_.notify_all();
  if (rewatch_.joinable()) rewatch_.join();
  {
    std::lock_guard lock(watch_mu_);
    watcher = std::move(watcher_);
  }
  watcher.reset();  // no more aborts from the watch (its end is ignored: stopping_)
  {
    std::lock_guard lock(telemetry_mu_);
    telemetry_stop_ = true;
  }
  telemetry_cv_.notify_all();
  if (telemetry_.joinable()) telemetry_.join();
  if (const Status s = writeTelemetry(); !s.ok()) {
    log::get("world")->warn("the last telemetry files were not written: {}", s.toString());
  }
  std::lock_guard lock(comm_mu_);
  comm_.reset();
}

std::unique_ptr<collectives::Communicator> World::decorate(
    std::unique_ptr<collectives::Communicator> c) {
  c = collectives::recordCollectives(std::move(c), recorder_, "world");
  return progress_ ? internal::trackWaits(std::move(c), progress_) : std::move(c);
}

std::string World::metricsText() {
  char host[256] = {};
  if (node_id_.empty()) ::gethostname(host, sizeof(host) - 1);
  std::map<std::string, std::string> labels = {{"node", node_id_.empty() ? host : node_id_},
                                               {"local_rank", std::to_string(local_rank_)}};
  if (!run_id_.empty()) labels["run"] = run_id_;
  std::string out = recorder_->prometheus(labels);
  const std::string l = prometheusLabels(labels);
  int rank, size;
  {
    std::lock_guard lock(comm_mu_);
    rank = rank_;
    size = size_;
  }
  const auto gauge = [&](const char* name, const char* type, const char* help, auto value) {
    out += prometheusHeader(name, type, help) + fmt::format("{}{} {}\n", name, l, value);
  };
  gauge("rally_world_size", "gauge", "Workers in this process's current generation.", size);
  gauge("rally_rank", "gauge", "This process's rank in its current generation.", rank);
  gauge("rally_generation", "gauge", "This process's current generation.", generation());
  gauge("rally_step", "gauge", "The step the training thread began last (-1: none yet).",
        step_.load());
  gauge("rally_recoveries_total", "counter", "Times this process re-formed in place.",
        recoveries_.load());
  if (const double last = last_recovery_seconds_.load(); last >= 0) {
    gauge(
        "rally_last_recovery_seconds", "gauge",
        "The newest in-place recovery's time, from the failure (or when this rank learnt of it) to "
        "the first step after it.",
        fmt::format("{:.6f}", last));
  }
  gauge("rally_steps_redone_total", "counter",
        "Steps done again after in-place recoveries (begun after the commit they rolled back to).",
        steps_redone_.load());
  gauge("rally_telemetry_timestamp_seconds", "gauge",
        "When this file was written (Unix time): a file that stops changing is a worker gone.",
        fmt::format("{:.3f}", std::chrono::duration<double>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count()));
  return out;
}

Status World::writeTelemetry() {
  if (trace_path_.empty() && metrics_path_.empty()) return okStatus();
  std::lock_guard lock(telemetry_write_mu_);
  try {
    return writeTelemetryFiles();
  } catch (const std::exception& e) {  // bad_alloc, a JSON error: never the training's end
    return internalError(fmt::format("writing the telemetry files: {}", e.what()));
  }
}

Status World::writeTelemetryFiles() {
  Status result;
  if (!trace_path_.empty()) {
    int rank;
    {
      std::lock_guard comm_lock(comm_mu_);
      rank = rank_;
    }
    const std::string who = node_id_.empty()
                                ? fmt::format("rank {}", rank)
                                : fmt::format("rank {} (node {}, local rank {}, pid {})", rank,
                                              node_id_, local_rank_, ::getpid());
    result = writeFileReplacing(
        trace_path_, recorder_->chromeTrace({.rank = rank, .process_name = who, .run = run_id_}));
  }
  if (!metrics_path_.empty()) {
    Status s = writeFileReplacing(metrics_path_, metricsText());
    if (result.ok()) result = std::move(s);
  }
  return result;
}

void World::requestTelemetryWrite() {
  {
    std::lock_guard lock(telemetry_mu_);
    telemetry_now_ = true;
  }
  telemetry_cv_.notify_all();
}

void World::telemetryLoop() {
  for (;;) {
    {
      std::unique_lock lock(telemetry_mu_);
      telemetry_cv_.wait_for(lock, telemetry_interval_,
                             [&] { return telemetry_stop_ || telemetry_now_; });
      if (telemetry_stop_) return;
      telemetry_now_ = false;
    }
    if (const Status s = writeTelemetry(); !s.ok()) {
      log::get("world")->warn("telemetry not written: {}", s.toString());
    }
  }
}

std::string World::describe() const {
  return fmt::format("rank {} of {} (local {} of {}, node {} of {}), generation {}, {}, backend {}",
                     rank_, size_, local_rank_, local_size_, node_rank_, num_nodes_, generation(),
                     launcherName(launcher_), backend_);
}

void World::onGeneration(std::uint64_t generation, const std::string& cause, bool closed) {
  std::uint64_t seen = latest_.load();
  while (generation > seen && !latest_.compare_exchange_weak(seen, generation)) {
  }
  if (closed) closed_ = true;
  gen_cv_.notify_all();
  if (generation <= generation_ && !closed) return;
  std::lock_guard lock(comm_mu_);
  // Again under the lock: recover() may have moved to this generation meanwhile, and its new
  // communicator must not be aborted.
  if (generation <= generation_ && !closed) return;
  std::int64_t none = 0;
  moved_at_us_.compare_exchange_strong(none,
                                       std::chrono::duration_cast<std::chrono::microseconds>(
                                           std::chrono::system_clock::now().time_since_epoch())
                                           .count());
  if (comm_ && !comm_->aborted()) {
    const std::string what = closed ? (cause.empty() ? "the job was closed" : cause)
                                    : fmt::format("the job moved to generation {}{}{}", generation,
                                                  cause.empty() ? "" : ": ", cause);
    log::get("world")->info("rank {}: {}; aborting generation {}'s communicator", rank_, what,
                            generation_.load());
    comm_->abort(what);
  }
  if (comm_ != nullptr || !derived_.empty()) {
    const std::string what =
        closed ? "the job was closed" : fmt::format("the job moved to generation {}", generation);
    for (collectives::Communicator* c : derived_) {
      if (!c->aborted()) c->abort(what);
    }
  }
  // The generation this process was in has ended: its collectives to disk now (under `rally run
  // --recovery restart` the agent stops this process next, and a signal leaves no final write).
  requestTelemetryWrite();
}

void World::abortWithGeneration(collectives::Communicator* c) {
  std::lock_guard lock(comm_mu_);
  derived_.push_back(c);
  if (latest_.load() > generation_.load() || closed_.load()) c->abort("the job moved on");
}

void World::stopAborting(collectives::Communicator* c) {
  std::lock_guard lock(comm_mu_);
  derived_.erase(std::remove(derived_.begin(), derived_.end(), c), derived_.end());
}

Result<std::unique_ptr<World>> initFrom(const Env& env, const InitOptions& options) {
  if (options.tune_malloc) {
    const internal::MallocTuning t = internal::tuneMallocForTraining(env);
    if (t.bad_value) return invalidArgument(t.reason);
    log::get("world")->debug("malloc tuning {}: {}", t.applied ? "applied" : "skipped", t.reason);
  }
  auto world = std::unique_ptr<World>(new World());
  World& w = *world;
  {
    std::int64_t capacity = 2000;
    if (const std::string* v = find(env, "RALLY_TRACE_BUFFER"); v != nullptr && !v->empty()) {
      RALLY_ASSIGN_OR_RETURN(capacity,
                             intVar(env, "RALLY_TRACE_BUFFER", 0, "rally run --trace-buffer"));
    }
    w.recorder_ = std::make_shared<collectives::CollectiveRecorder>(static_cast<size_t>(capacity));
    if (const std::string* v = find(env, "RALLY_TELEMETRY_INTERVAL"); v != nullptr && !v->empty()) {
      auto interval = parseDuration(*v);
      if (!interval.ok() || *interval < kMinTelemetryInterval) {
        return invalidArgument(
            fmt::format("RALLY_TELEMETRY_INTERVAL='{}' is not a duration of at least {} (e.g. 10s)",
                        *v, formatDuration(kMinTelemetryInterval)));
      }
      w.telemetry_interval_ = *interval;
    }
  }
  std::string backend = options.backend;
  if (backend.empty()) {
    const std::string* b = find(env, "RALLY_BACKEND");
    backend = b != nullptr && !b->empty() ? *b : "auto";
  }
  collectives::CommunicatorOptions co;
  co.connect_timeout = options.connect_timeout;
  co.op_timeout = options.op_timeout;
  const collectives::Requirements needs{.device_memory = options.device_memory};

  if (const std::string* endpoint = find(env, "RALLY_COORDINATOR")) {
    constexpr const char* kWho = "rally run";
    w.launcher_ = Launcher::kRally;
    RALLY_ASSIGN_OR_RETURN(const std::int64_t size, intVar(env, "RALLY_WORLD_SIZE", 1, kWho));
    RALLY_ASSIGN_OR_RETURN(const std::int64_t rank, intVar(env, "RALLY_RANK", 0, kWho));
    if (rank >= size) {
      return invalidArgument(
          fmt::format("RALLY_RANK={} is not below RALLY_WORLD_SIZE={}", rank, size));
    }
    RALLY_ASSIGN_OR_RETURN(const std::int64_t lsize,
                           intVar(env, "RALLY_LOCAL_WORLD_SIZE", 1, kWho));
    RALLY_ASSIGN_OR_RETURN(const std::int64_t lrank, intVar(env, "RALLY_LOCAL_RANK", 0, kWho));
    RALLY_ASSIGN_OR_RETURN(const std::int64_t nodes, intVar(env, "RALLY_NUM_NODES", 1, kWho));
    RALLY_ASSIGN_OR_RETURN(const std::int64_t node, intVar(env, "RALLY_NODE_RANK", 0, kWho));
    RALLY_ASSIGN_OR_RETURN(const std::int64_t gen, intVar(env, "RALLY_GENERATION", 1, kWho));
    w.rank_ = static_cast<int>(rank);
    w.size_ = static_cast<int>(size);
    w.local_rank_ = static_cast<int>(lrank);
    w.local_size_ = static_cast<int>(lsize);
    w.node_rank_ = static_cast<int>(node);
    w.num_nodes_ = static_cast<int>(nodes);
    w.generation_ = static_cast<std::uint64_t>(gen);
    w.latest_ = w.generation_.load();
    const std::string* recovery = find(env, "RALLY_RECOVERY");
    w.in_place_ = recovery != nullptr && *recovery == "in-place";
    if (const std::string* id = find(env, "RALLY_NODE_ID")) w.node_id_ = *id;
    if (w.in_place_ && w.node_id_.empty()) {
      return invalidArgument("RALLY_RECOVERY=in-place needs RALLY_NODE_ID (rally run sets both)");
    }
    const std::string* token = find(env, "RALLY_TOKEN");
    rendezvous::ClientOptions client;
    client.endpoint = *endpoint;
    client.token = token != nullptr ? *token : "";
    client.connect_timeout = options.connect_timeout;
    // The agents' heartbeat interval sets how soon a silent coordinator is found, as for them.
    if (const std::string* hb = find(env, "RALLY_HEARTBEAT_INTERVAL")) {
      if (auto interval = parseDuration(*hb); interval.ok()) client.keepalive = 2 * *interval;
    }
    auto conn = rendezvous::CoordinatorConnection::open(client);
    RALLY_RETURN_IF_ERROR(conn.status()) << "connecting to the job's coordinator at " << *endpoint;
    w.conn_ = std::move(*conn);
    if (const std::string* file = find(env, "RALLY_COORDINATOR_FILE")) {
      w.coordinator_file_ = *file;
      w.followCoordinator();  // a replacement started during a takeover
    }
    // The watch first, so that a generation that moves while the communicator is being built
    // aborts it (or ends its bootstrap, whose keys live in the generation's scope).
    w.connect_timeout_ = options.connect_timeout;
    RALLY_RETURN_IF_ERROR(w.startWatch()) << "watching the job's generation";
    // The agent's progress watchdog (rally run --progress-timeout): report the training thread's
    // step over the local channel.
    if (const std::string* sock = find(env, "RALLY_PROGRESS_SOCKET"); sock && !sock->empty()) {
      const std::int64_t every = intVarOr(env, "RALLY_PROGRESS_INTERVAL", 1000);
      w.progress_ = std::make_shared<internal::ProgressTracker>();
      auto reporter = internal::ProgressReporter::start(
          *sock, Milliseconds(std::clamp<std::int64_t>(every, 10, 60'000)), w.progress_);
      if (reporter.ok()) {
        w.reporter_ = std::move(*reporter);
      } else {
        log::get("world")->warn("no progress reports to the agent: {}",
                                reporter.status().message());
        w.progress_.reset();
      }
    }
    w.rewatch_ = std::thread([self = &w] { self->rewatchLoop(); });
    w.bootstrap_ = std::make_unique<rendezvous::CoordinatorBootstrapStore>(
        rendezvous::StoreClient(w.conn_).scoped("rally/comm/", w.generation()));
    // The claimant: this World, among every node's processes (and any other World of this one).
    const std::string* node_id = find(env, "RALLY_NODE_ID");
    std::random_device rd;
    w.fired_ = std::make_shared<StoreFiredFaults>(
        rendezvous::StoreClient(w.conn_).scoped("rally/faults/fired/", 0),
        fmt::format("{}/{}/{:08x}{:08x}", node_id != nullptr ? *node_id : std::string("?"),
                    ::getpid(), rd(), rd()));
    co.rank = w.rank_;
    co.size = w.size_;
    co.generation = w.generation();
  } else if (find(env, "OMPI_COMM_WORLD_SIZE") || find(env, "PMI_SIZE") || find(env, "PMIX_RANK")) {
    w.launcher_ = Launcher::kMpi;
    if (options.backend.empty() && find(env, "RALLY_BACKEND") == nullptr) backend = "mpi";
    w.bootstrap_ = std::make_unique<collectives::MemoryBootstrapStore>();  // MPI bootstraps itself
    w.fired_ = std::make_shared<LocalFiredFaults>();
    co.rank = -1;  // MPI's own
    co.size = 0;
    co.generation = 1;
    w.generation_ = 1;
    w.latest_ = 1;
  } else {
    if (const std::string* ws = find(env, "WORLD_SIZE"); ws != nullptr && *ws != "1") {
      return failedPrecondition(fmt::format(
          "WORLD_SIZE={} says this process is one of several, but it was not started by a "
          "launcher rally can join (RALLY_COORDINATOR is unset and this is not an MPI job): start "
          "it with `rally run --nproc-per-node N ...` (as you would torchrun) or with mpirun",
          *ws));
    }
    w.launcher_ = Launcher::kNone;
    w.bootstrap_ = std::make_unique<collectives::MemoryBootstrapStore>();
    w.fired_ = std::make_shared<LocalFiredFaults>();
    co.rank = 0;
    co.size = 1;
    co.generation = 1;
    w.generation_ = 1;
    w.latest_ = 1;
  }

  // Where this process writes its telemetry; MPI ranks are known once the communicator is.
  if (const std::string* id = find(env, "RALLY_RUN_ID")) w.run_id_ = *id;
  const std::string* trace_dir = find(env, "RALLY_TRACE_DIR");
  const std::string* metrics_dir = find(env, "RALLY_METRICS_DIR");
  const auto telemetryPaths = [&] {
    // A worker's place: its replacement takes over its metrics file (a counter reset, as
    // Prometheus expects of a restart) but writes its trace beside the dead process's.
    const std::string place =
        w.launcher_ == Launcher::kRally && !w.node_id_.empty()
            ? fmt::format("{}-local{}", fileNameSafe(w.node_id_), w.local_rank_)
            : fmt::format("rank{}", w.rank_);
    const std::string process = w.launcher_ == Launcher::kRally && !w.node_id_.empty()
                                    ? fmt::format("{}-pid{}", place, ::getpid())
                                    : place;
    if (trace_dir != nullptr && !trace_dir->empty()) {
      w.trace_path_ =
          (std::filesystem::path(*trace_dir) / ("collectives-" + process + ".json")).string();
    }
    if (metrics_dir != nullptr && !metrics_dir->empty()) {
      w.metrics_path_ =
          (std::filesystem::path(*metrics_dir) / ("rally-" + place + ".prom")).string();
    }
    if (!w.trace_path_.empty() || !w.metrics_path_.empty()) {
      w.telemetry_ = std::thread([self = &w] { self->telemetryLoop(); });
    }
  };

  w.backend_choice_ = backend;
  w.device_memory_ = options.device_memory;
  w.connect_timeout_ = options.connect_timeout;
  w.op_timeout_ = options.op_timeout;
  RALLY_ASSIGN_OR_RETURN(w.backend_, collectives::chooseBackend(backend, needs));
  auto comm = collectives::createCommunicator(w.backend_, *w.bootstrap_, co, needs);
  if (w.launcher_ != Launcher::kMpi || !comm.ok()) telemetryPaths();
  if (!comm.ok() && w.in_place_ && w.jobMovedOn()) {
    // A replacement or a new node that starts while the job moves on again: follow it.
    log::get("world")->info("generation {} ended while this worker started ({}); following the job",
                            w.generation(), comm.status().message());
    RALLY_RETURN_IF_ERROR(w.recover(options.connect_timeout)) << "joining the job";
    return world;
  }
  RALLY_RETURN_IF_ERROR(comm.status())
      << "creating generation " << w.generation() << "'s " << w.backend_ << " communicator";
  if (w.launcher_ == Launcher::kMpi) {
    w.rank_ = (*comm)->rank();
    w.size_ = (*comm)->size();
    // Placement: Slurm says it; Open MPI gives the local rank and size (nodes are then assumed
    // filled in order, as mpirun's default --map-by slot does).
    w.local_rank_ = static_cast<int>(
        intVarOr(env, "SLURM_LOCALID", intVarOr(env, "OMPI_COMM_WORLD_LOCAL_RANK", w.rank_)));
    w.local_size_ = static_cast<int>(intVarOr(env, "OMPI_COMM_WORLD_LOCAL_SIZE", w.size_));
    const int per_node = std::max(1, w.local_size_);
    w.node_rank_ = static_cast<int>(intVarOr(env, "SLURM_NODEID", w.rank_ / per_node));
    w.num_nodes_ =
        static_cast<int>(intVarOr(env, "SLURM_NNODES", (w.size_ + per_node - 1) / per_node));
    telemetryPaths();
  }
  {
    std::lock_guard lock(w.comm_mu_);
    w.comm_ = w.decorate(std::move(*comm));
  }
  // A move seen before the communicator existed aborts it now.
  if (w.generationChanged() || w.closed_) {
    w.onGeneration(w.latest_.load(), "seen while starting", w.closed_.load());
  }
  log::get("world")->debug("{}", w.describe());
  return world;
}

Status World::startWatch() {
  // Numbered: a watch this one replaces ends when it goes, and that end (or a late event of
  // it) must not count as this one's.
  std::uint64_t id;
  {
    std::lock_guard lock(watch_mu_);
    id = ++watch_seq_;
  }
  auto watcher = rendezvous::GenerationWatcher::start(
      conn_,
      [this, id](const rally::v1::GenerationEvent& ev) {
        onGeneration(ev.generation(), ev.cause(), ev.state() == rally::v1::GenerationEvent::CLOSED);
        {
          std::lock_guard lock(watch_mu_);  // so that rewatchLoop cannot miss the wake-up
          if (id != watch_seq_) return;
          coordinator_up_ = true;
          watch_events_.fetch_add(1);
        }
        watch_cv_.notify_all();
      },
      [this, id](const Status& end) {
        std::lock_guard lock(watch_mu_);
        if (stopping_ || id != watch_seq_) return;
        coordinator_up_ = false;
        watch_ended_ = true;
        watch_end_ = end;
        watch_cv_.notify_all();
      });
  RALLY_RETURN_IF_ERROR(watcher.status());
  std::unique_ptr<rendezvous::GenerationWatcher> old;
  {
    std::lock_guard lock(watch_mu_);
    old = std::exchange(watcher_, std::move(*watcher));
  }
  return okStatus();  // `old` goes here, outside the lock its end takes
}

bool World::followCoordinator() {
  if (coordinator_file_.empty() || !conn_) return false;
  std::ifstream in(coordinator_file_);
  std::string endpoint;
  if (!in || !std::getline(in, endpoint)) return false;
  while (!endpoint.empty() && std::isspace(static_cast<unsigned char>(endpoint.back()))) {
    endpoint.pop_back();
  }
  if (endpoint.empty() || endpoint == conn_->endpoint()) return false;
  const std::string from = conn_->endpoint();
  if (Status s = conn_->retarget(endpoint); !s.ok()) {
    log::get("world")->warn("rank {}: {} names no coordinator: {}", rank_, coordinator_file_,
                            s.message());
    return false;
  }
  log::get("world")->warn("rank {}: the job's coordinator moved from {} to {}", rank_, from,
                          endpoint);
  return true;
}

void World::rewatchLoop() {
  auto log = log::get("world");
  std::unique_lock lock(watch_mu_);
  for (;;) {
    // While the watch is healthy, look at where the agent says the coordinator is every 100 ms:
    // after a takeover the agent knows first (a silent old host breaks this watch only when its
    // keepalive runs out). A move restarts the watch at the new address.
    while (!watch_ended_ && !stopping_) {
      if (watch_cv_.wait_for(lock, Milliseconds(100), [&] { return watch_ended_ || stopping_; })) {
        break;
      }
      lock.unlock();
      const bool moved = followCoordinator();
      const Status restarted = moved ? startWatch() : okStatus();
      lock.lock();
      if (moved && !restarted.ok()) {
        watch_ended_ = true;
        watch_end_ = restarted;
      }
    }
    if (stopping_ || closed_) return;
    const Status why = watch_end_;
    log->warn("rank {}: the generation watch ended ({}); watching again", rank_, why.toString());
    const auto deadline = std::chrono::steady_clock::now() + connect_timeout_;
    Milliseconds backoff(50);
    bool back = false;
    // Checked while waiting: under rally run, the agents may move the coordinator to a successor.
    const auto moved = [&] {
      lock.unlock();
      const bool m = followCoordinator();
      lock.lock();
      return m;
    };
    while (!stopping_ && std::chrono::steady_clock::now() < deadline) {
      watch_ended_ = false;
      const std::uint64_t before = watch_events_.load();
      moved();
      lock.unlock();
      const Status started = startWatch();
      lock.lock();
      // A healthy watch delivers the job's current state at once.
      bool retry_now = false;
      if (started.ok()) {
        const auto patience =
            std::min(deadline, std::chrono::steady_clock::now() + Milliseconds(1000) + 5 * backoff);
        const auto healthy = [&] {
          return stopping_ || watch_ended_ || watch_events_.load() > before;
        };
        while (!healthy() && std::chrono::steady_clock::now() < patience) {
          watch_cv_.wait_for(lock, Milliseconds(50), healthy);
          if (!healthy() && moved()) {
            retry_now = true;
            break;
          }
        }
        if (watch_events_.load() > before && !watch_ended_) {
          back = true;
          break;
        }
      }
      if (retry_now) continue;
      const auto resume = std::chrono::steady_clock::now() + backoff;
      while (!stopping_ && std::chrono::steady_clock::now() < resume && !retry_now) {
        watch_cv_.wait_for(lock, Milliseconds(50), [&] { return stopping_; });
        retry_now = moved();
      }
      if (!retry_now) backoff = std::min(backoff * 2, Milliseconds(2000));
    }
    if (stopping_) return;
    if (back) {
      log->info("rank {}: watching the job's generation again", rank_);
      continue;
    }
    lock.unlock();
    onGeneration(latest_.load(),
                 fmt::format("lost the job's coordinator: the generation watch ended ({}) and "
                             "could not be restarted within {}",
                             why.toString(), formatDuration(connect_timeout_)),
                 /*closed=*/true);
    log->error("rank {}: lost the job's coordinator ({}); this world is closed", rank_,
               why.toString());
    return;
  }
}

Status World::recover(Milliseconds timeout) {
  // Waiting for the others, as far as the progress watchdog is concerned.
  struct Waiting {
    internal::ProgressTracker* t;
    explicit Waiting(internal::ProgressTracker* p) : t(p) {
      if (t) t->waiting.fetch_add(1);
    }
    ~Waiting() {
      if (t) t->waiting.fetch_sub(1);
    }
  } waiting(progress_.get());
  if (launcher_ != Launcher::kRally || !in_place_) {
    return failedPrecondition(fmt::format(
        "this world cannot re-form in place ({}{}): start the job with `rally run --recovery "
        "in-place`",
        launcherName(launcher_),
        launcher_ == Launcher::kRally ? ", which restarts workers instead" : ""));
  }
  auto log = log::get("world");
  // The generation that ended, as this process saw its collectives, goes to disk now (the watch
  // may not have said so yet: a collective's failure can come first).
  requestTelemetryWrite();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::optional<std::chrono::steady_clock::time_point> excluded_since;
  for (;;) {
    RALLY_ASSIGN_OR_RETURN(const rally::v1::RoundInfo round, conn_->getRound());
    if (round.state() == rally::v1::GenerationEvent::CLOSED) {
      return aborted("the job was closed while this worker waited to re-form");
    }
    if (round.state() == rally::v1::GenerationEvent::FORMED && round.generation() > generation_) {
      int offset = 0, total = 0, node = -1;
      for (const auto& m : round.members()) {
        if (m.node_id() == node_id_) {
          node = static_cast<int>(m.node_rank());
          offset = total;
        }
        total += static_cast<int>(m.local_world_size());
      }
      if (node < 0) {
        // Not in this round. Usually the job went on without this node; but a node that came
        // back late to a coordinator that took over is re-formed with at once (the coordinator
        // re-forms for it): wait a little for a round with it.
        constexpr auto kExcludedWait = std::chrono::seconds(10);
        const auto now = std::chrono::steady_clock::now();
        if (!excluded_since) {
          excluded_since = now;
          log->info(
              "rank {}: generation {}'s round formed without node '{}'; waiting up to {} "
              "for one with it",
              rank_, round.generation(), node_id_, formatDuration(kExcludedWait));
        }
        if (now - *excluded_since >= kExcludedWait) {
          return failedPrecondition(fmt::format(
              "node '{}' is not a member of generation {}'s round: the job went on without it",
              node_id_, round.generation()));
        }
      } else {
        round_read_at_ = std::chrono::steady_clock::now();
        {
          std::lock_guard lock(comm_mu_);
          comm_.reset();  // frees the old generation's connections and shared memory
          generation_ = round.generation();
          rank_ = offset + local_rank_;
          size_ = total;
          node_rank_ = node;
          num_nodes_ = round.members_size();
        }
        bootstrap_ = std::make_unique<rendezvous::CoordinatorBootstrapStore>(
            rendezvous::StoreClient(conn_).scoped("rally/comm/", generation()));
        const Status built = buildCommunicator();
        if (built.ok()) {
          recoveries_.fetch_add(1);
          last_moved_at_ = movedAt();
          moved_at_us_ = 0;
          log->info("re-formed in place: {}", describe());
          return okStatus();
        }
        if (!jobMovedOn()) return built;
        log->info("generation {} ended while its communicator was built ({}); following the job",
                  generation(), built.message());
      }
    }
    std::unique_lock lock(comm_mu_);
    const std::uint64_t seen = latest_.load();
    if (std::chrono::steady_clock::now() >= deadline) {
      return timeoutError(fmt::format(
          "no round newer than generation {} formed within {} (the job's newest generation: {})",
          generation(), formatDuration(timeout), seen));
    }
    // Woken by the watch; polls as well, so a missed event costs at most 50 ms.
    gen_cv_.wait_for(lock, std::chrono::milliseconds(50),
                     [&] { return latest_.load() != seen || closed_.load(); });
  }
}

Status World::atCommitPoint(Milliseconds wait) {
  if (launcher_ != Launcher::kRally || !in_place_ || rank_ != 0 || !conn_) return okStatus();
  // While the coordinator is away (restarted, or taken over) nobody can be admitted: training
  // goes on instead of waiting for a store that does not answer.
  if (!coordinator_up_) return okStatus();
  rendezvous::StoreClient store = rendezvous::StoreClient(conn_).scoped("rally/run/", 0);
  const std::string gen = std::to_string(generation());
  auto requested = store.get("admit/requested");
  if (!requested.ok() || !requested->has_value() || **requested != gen) return okStatus();
  RALLY_RETURN_IF_ERROR(store.set("admit/ready", gen)) << "telling the agents of a commit point";
  std::unique_lock lock(comm_mu_);
  gen_cv_.wait_for(lock, wait, [&] { return generationChanged(); });
  return okStatus();
}

void World::noteRecovery(double seconds, std::int64_t steps_redone) {
  last_recovery_seconds_.store(seconds);
  steps_redone_.fetch_add(std::max<std::int64_t>(0, steps_redone));
}

void World::reportProgress(std::int64_t step) {
  step_.store(step, std::memory_order_relaxed);
  if (progress_) progress_->step.store(step);
}

Status World::publishCommit(std::uint64_t commit) {
  if (launcher_ != Launcher::kRally || local_rank_ != 0 || !conn_) return okStatus();
  // The coordinator is away (restarted, or taken over): the next commit after it is back records
  // the newest (the record only ever rises), so skipping this one loses nothing.
  if (!coordinator_up_) return okStatus();
  rendezvous::StoreClient store = rendezvous::StoreClient(conn_).scoped("rally/run/", 0);
  std::optional<std::string> seen;
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (seen && std::strtoull(seen->c_str(), nullptr, 10) >= commit) return okStatus();
    auto swapped = store.compareAndSet("newest_commit", seen, std::to_string(commit));
    RALLY_RETURN_IF_ERROR(swapped.status()) << "recording commit " << commit;
    const rendezvous::CompareAndSetResult& r = *swapped;
    if (r.swapped) return okStatus();
    seen = r.present ? std::optional<std::string>(r.value) : std::nullopt;
  }
  return okStatus();  // others keep raising it: one of them holds a newer commit
}

std::uint64_t World::newestCommit() {
  if (launcher_ != Launcher::kRally || !conn_) return 0;
  auto v = rendezvous::StoreClient(conn_).scoped("rally/run/", 0).get("newest_commit");
  if (!v.ok() || !v->has_value()) return 0;
  return std::strtoull((*v)->c_str(), nullptr, 10);
}

collectives::Communicator& World::comm() {
  if (!comm_) {
    throw std::logic_error(
        "rally::World::comm(): this world has no communicator: the last recover() failed");
  }
  return *comm_;
}

std::chrono::system_clock::time_point World::movedAt() const {
  return std::chrono::system_clock::time_point(std::chrono::microseconds(moved_at_us_.load()));
}

std::optional<std::chrono::system_clock::time_point> World::failureTime(std::uint64_t from) {
  if (!conn_) return std::nullopt;
  rendezvous::StoreClient store =
      rendezvous::StoreClient(conn_).scoped(fmt::format("rally/run/failure_times/{:08}/", from), 0);
  auto keys = store.list();
  if (!keys.ok()) return std::nullopt;
  std::optional<std::int64_t> earliest;
  for (const auto& k : *keys) {
    auto v = store.get(k);
    if (!v.ok() || !v->has_value()) continue;
    const std::int64_t us = std::strtoll((*v)->c_str(), nullptr, 10);
    if (us > 0 && (!earliest || us < *earliest)) earliest = us;
  }
  if (!earliest) return std::nullopt;
  return std::chrono::system_clock::time_point(std::chrono::microseconds(*earliest));
}

bool World::jobMovedOn() {
  if (generationChanged()) return true;
  if (!conn_) return false;
  // The store can tell before the watch does ("generation 4 has ended (current is 5)").
  auto round = conn_->getRound();
  return round.ok() && round->generation() > generation();
}

Status World::buildCommunicator() {
  collectives::CommunicatorOptions co;
  co.rank = rank_;
  co.size = size_;
  co.generation = generation();
  co.connect_timeout = connect_timeout_;
  co.op_timeout = op_timeout_;
  auto comm =
      collectives::createCommunicator(backend_, *bootstrap_, co, {.device_memory = device_memory_});
  RALLY_RETURN_IF_ERROR(comm.status())
      << "creating generation " << generation() << "'s " << backend_ << " communicator";
  {
    std::lock_guard lock(comm_mu_);
    comm_ = decorate(std::move(*comm));
  }
  if (generationChanged()) {
    onGeneration(latest_.load(), "seen while re-forming", closed_.load());
    return aborted(fmt::format("generation {} ended as soon as it formed", generation()));
  }
  return okStatus();
}

Result<std::unique_ptr<World>> init(const InitOptions& options) {
  Env env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string kv = *e;
    const auto eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return initFrom(env, options);
}

}  // namespace rally
