#include "runtime/elastic/elastic_run.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "collectives/memory_bootstrap_store.h"
#include "collectives/registry.h"
#include "kernels/base/logging.h"
#include "kernels/base/tunables.h"

namespace rally {
namespace {

double msBetween(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::string isoNow() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()) % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms.count());
}

// One JSON line appended to the job's event log (the agents write theirs to the same file; a
// single write() of a line with O_APPEND does not interleave with theirs).
void appendEvent(const nlohmann::json& event) {
  const char* path = std::getenv("RALLY_EVENTS");
  if (path == nullptr || *path == '\0') return;
  const int fd = ::open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const std::string line = event.dump() + "\n";
  (void)!::write(fd, line.data(), line.size());
  ::close(fd);
}

}  // namespace

// Worth following the job after: a peer lost or the generation moved (not a closed job, not a
// timeout waiting for a round).
bool ElasticRun::followable(const Status& s) const {
  if (world_.closed()) return false;
  return s.code() == StatusCode::kAborted || s.code() == StatusCode::kPeerLost;
}

bool isRecoverable(const Status& s) {
  return s.code() == StatusCode::kPeerLost || s.code() == StatusCode::kAborted ||
         s.code() == StatusCode::kTimeout;
}

ElasticRun::ElasticRun(World& world, ElasticState& state, ElasticRunOptions options)
    : world_(world), state_(state), options_(std::move(options)) {
  if (options_.checkpoint_dir.empty()) {
    auto tunables = Tunables::fromEnvironment();
    if (!tunables.ok()) {
      log::get("elastic")->error("checkpoint settings ignored: {}", tunables.status().message());
    } else if (auto dir = tunables->string("checkpoint_dir"); dir.ok() && !dir->empty()) {
      options_.checkpoint_dir = *dir;
      options_.checkpoint_every = static_cast<int>(tunables->integer("checkpoint_every").value());
      options_.checkpoint.keep_last =
          static_cast<int>(tunables->integer("checkpoint_keep").value());
    }
  }
  if (!options_.checkpoint_dir.empty()) {
    checkpointer_ =
        std::make_unique<checkpoint::Checkpointer>(options_.checkpoint_dir, options_.checkpoint);
  }
  auto plan = FaultPlan::fromEnvironment();
  if (!plan.ok()) {
    log::get("elastic")->error("RALLY_FAULTS ignored: {}", plan.status().message());
  } else if (!plan->empty()) {
    faults_.emplace(std::move(*plan), world_.firedFaults());
  }
}

Status ElasticRun::atStep(std::int64_t step) {
  last_step_ = std::max(last_step_, step);
  world_.reportProgress(step);
  if (pending_) {
    if (!pending_->first_step) {
      pending_->first_step = step;
    } else if (step > *pending_->first_step) {
      writeRecoveryEvent();
    }
  }
  if (faults_) {
    RALLY_RETURN_IF_ERROR(faults_->atStep(world_.rank(), step));
  }
  return okStatus();
}

Status ElasticRun::commit() {
  const auto next = static_cast<std::int64_t>(state_.commitNumber() + 1);
  if (faults_) {
    RALLY_RETURN_IF_ERROR(
        faults_->beforeCommit(world_.rank(), next, [this] { return world_.generationChanged(); }));
  }
  RALLY_RETURN_IF_ERROR(state_.commit());
  if (Status p = world_.publishCommit(state_.commitNumber()); !p.ok()) {
    log::get("elastic")->warn("commit {} taken, but not recorded: {}", state_.commitNumber(),
                              p.toString());
  }
  if (faults_) {
    RALLY_RETURN_IF_ERROR(faults_->afterCommit(world_.rank(), world_.nodeRank(), world_.localRank(),
                                               static_cast<std::int64_t>(state_.commitNumber())));
  }
  if (checkpointer_ && options_.checkpoint_every > 0 &&
      state_.commitNumber() % static_cast<std::uint64_t>(options_.checkpoint_every) == 0) {
    // Named by the "step" scalar when there is one, else by the commit number.
    std::uint64_t step = state_.commitNumber();
    for (const ElasticState::Entry& e : state_.registered()) {
      if (e.name == "step" && e.kind == ElasticState::Kind::kInt) {
        step = static_cast<std::uint64_t>(*static_cast<const std::int64_t*>(e.data));
      }
    }
    RALLY_RETURN_IF_ERROR(checkpointer_->save(step).status());
  }
  return world_.atCommitPoint();
}

Status ElasticRun::attachCheckpoints() {
  auto log = log::get("elastic");
  RALLY_RETURN_IF_ERROR(checkpointer_->attach(world_.comm(), state_));
  std::int64_t newest = static_cast<std::int64_t>(state_.commitNumber());
  RALLY_RETURN_IF_ERROR(world_.comm()
                            .allreduce(&newest, 1, DataType::kI64, collectives::ReduceOp::kMax)
                            ->wait(options_.sync.timeout))
      << "ElasticRun: looking for a commit in memory";
  if (newest > 0) return okStatus();  // survivors hold the state: no storage needed
  // The whole job starts without a commit: from the newest checkpoint, if there is one. The
  // starting values are kept aside in case every checkpoint turns out unreadable.
  RALLY_RETURN_IF_ERROR(state_.commit());
  auto loaded = checkpointer_->loadNewest();
  if (loaded.ok()) {
    resumed_from_ = loaded->step;
    if (world_.rank() == 0) {
      log->info("resumed from checkpoint step {} ({}, commit {})", loaded->step, loaded->path,
                loaded->commit);
    }
    return okStatus();
  }
  RALLY_RETURN_IF_ERROR(state_.restore());
  state_.forget();
  if (loaded.status().code() != StatusCode::kNotFound) return loaded.status();
  if (world_.rank() == 0) {
    log->info("{}: starting from rank 0's values", loaded.status().message());
  }
  return okStatus();
}

void ElasticRun::writeRecoveryEvent() {
  Pending& p = *pending_;
  const double first_step = msBetween(p.restored, Clock::now());
  const double total = (p.detect_ms > 0 ? p.detect_ms : 0) + p.abort_ms + p.rendezvous_ms +
                       p.rebuild_ms + p.restore_ms + first_step;
  auto log = log::get("elastic");
  const std::int64_t steps_redone =
      p.last_step >= 0 && p.first_step ? std::max<std::int64_t>(0, p.last_step - *p.first_step) : 0;
  world_.noteRecovery(total / 1000.0, steps_redone);
  if (world_.rank() == p.writer) {
    log->info(
        "recovered in place: generation {} -> {}, world size {}, commit {}{}; detect {}, abort "
        "{:.1f} ms, rendezvous {:.1f} ms, rebuild {:.1f} ms, restore {:.1f} ms, first step {:.1f} "
        "ms ({:.1f} ms in all)",
        p.from_generation, p.generation, p.world_size, p.commit,
        p.fell_back_from > 0
            ? fmt::format(" (fell back: commit {} was held only by workers that are gone)",
                          p.fell_back_from)
            : "",
        p.detect_ms >= 0 ? fmt::format("{:.1f} ms", p.detect_ms) : "not measured", p.abort_ms,
        p.rendezvous_ms, p.rebuild_ms, p.restore_ms, first_step, total);
    nlohmann::json phases = {{"abort", p.abort_ms},
                             {"rendezvous", p.rendezvous_ms},
                             {"rebuild", p.rebuild_ms},
                             {"restore", p.restore_ms},
                             {"first_step", first_step}};
    if (p.detect_ms >= 0) phases["detect"] = p.detect_ms;
    appendEvent({{"time", isoNow()},
                 {"node", world_.nodeRank()},
                 {"rank", world_.rank()},
                 {"event", "recovery"},
                 {"from_generation", p.from_generation},
                 {"generation", p.generation},
                 {"world_size", p.world_size},
                 {"commit", p.commit},
                 {"fell_back_from", p.fell_back_from},
                 {"cause", p.cause},
                 {"phases_ms", phases},
                 {"last_step", p.last_step},
                 {"resumed_step", p.first_step.value_or(-1)},
                 {"steps_redone", steps_redone},
                 {"total_ms", total}});
  }
  pending_.reset();
}

ElasticRun::~ElasticRun() { dropGrid(); }

void ElasticRun::dropGrid() {
  if (!grid_) return;
  world_.stopAborting(grid_->dp.get());
  world_.stopAborting(grid_->tp.get());
  grid_.reset();
}

collectives::Communicator& ElasticRun::dp() { return grid_ ? *grid_->dp : world_.comm(); }

collectives::Communicator& ElasticRun::tp() {
  if (grid_) return *grid_->tp;
  if (!self_tp_) {
    self_store_ = std::make_unique<collectives::MemoryBootstrapStore>();
    auto c = collectives::createCommunicator("gloo", *self_store_, {.rank = 0, .size = 1}, {});
    if (!c.ok())
      throw std::runtime_error("rally: a tensor-parallel group of one: " + c.status().toString());
    self_tp_ = std::move(*c);
  }
  return *self_tp_;
}

Result<SyncResult> ElasticRun::syncState(std::int64_t* last_step, int* writer) {
  if (options_.tp_size > 1) {
    // The grid of this generation (survivors and newcomers build it in the same call order),
    // aborted with the generation like the world's communicator.
    dropGrid();
    if (world_.size() % options_.tp_size != 0) {
      return failedPrecondition(fmt::format(
          "ElasticRun: world size {} is not a multiple of tp_size {}: tensor-parallel groups "
          "cannot be formed (wait for replacements, or set MIN so that it stays a multiple)",
          world_.size(), options_.tp_size));
    }
    auto g = collectives::makeGrid(world_.comm(), options_.tp_size);
    RALLY_RETURN_IF_ERROR(g.status()) << "ElasticRun: forming the DP x TP grid";
    grid_ = std::move(*g);
    world_.abortWithGeneration(grid_->dp.get());
    world_.abortWithGeneration(grid_->tp.get());
  }
  if (checkpointer_) {
    RALLY_RETURN_IF_ERROR(attachCheckpoints());
  }
  SyncOptions sync = options_.sync;
  if (sync.known_newest == 0) sync.known_newest = world_.newestCommit();
  RALLY_ASSIGN_OR_RETURN(const SyncResult synced, state_.sync(dp(), sync));
  // One allreduce (max) for two things: the newest step any rank had begun (a replacement or a
  // new node has begun none), for steps_redone; and the lowest rank that recovered in place
  // (-rank; newcomers give the least value), which writes the recovery event. Survivors (in
  // recoverOnce) and newcomers (in run) make the same calls.
  std::int64_t v[2] = {*last_step, writer != nullptr ? -std::int64_t{world_.rank()} : INT64_MIN};
  RALLY_RETURN_IF_ERROR(world_.comm()
                            .allreduce(v, 2, DataType::kI64, collectives::ReduceOp::kMax)
                            ->wait(options_.sync.timeout))
      << "ElasticRun: agreeing on the newest step";
  *last_step = v[0];
  if (writer != nullptr) *writer = static_cast<int>(-v[1]);
  return synced;
}

Status ElasticRun::recoverOnce(const Status& cause) {
  const auto returned = Clock::now();
  const auto returned_sys = std::chrono::system_clock::now();
  Pending p;
  p.from_generation = world_.generation();
  p.cause = cause.toString();
  p.last_step = last_step_;
  RALLY_RETURN_IF_ERROR(world_.recover(options_.recover_timeout))
      << "recovering in place after: " << cause.toString();
  const auto rebuilt = Clock::now();
  if (faults_) {  // a fault plan's "during the N-th recovery"
    RALLY_RETURN_IF_ERROR(faults_->atRecovery(world_.rank(), recoveries_));
  }
  p.rendezvous_ms = msBetween(returned, world_.roundReadAt());
  p.rebuild_ms = msBetween(world_.roundReadAt(), rebuilt);
  p.generation = world_.generation();
  p.world_size = world_.size();
  RALLY_ASSIGN_OR_RETURN(const SyncResult synced, syncState(&p.last_step, &p.writer));
  p.restored = Clock::now();
  p.restore_ms = msBetween(rebuilt, p.restored);
  p.commit = synced.commit;
  p.fell_back_from = synced.fell_back_from;
  // Told: the watch's news or the error, whichever came first.
  auto told = world_.lastMovedAt();
  if (told.time_since_epoch().count() == 0 || told > returned_sys) told = returned_sys;
  p.abort_ms = std::chrono::duration<double, std::milli>(returned_sys - told).count();
  // Detection: from the failure, as its agent recorded it, to being told. A survivor whose
  // communicator saw the peer's connection close can be told before the agent's own clock read
  // the exit: then it took no time (0), rather than going unreported.
  if (auto failed = world_.failureTime(p.from_generation)) {
    p.detect_ms = std::max(0.0, std::chrono::duration<double, std::milli>(told - *failed).count());
  }
  pending_ = p;
  return okStatus();
}

Status ElasticRun::run(const std::function<Status()>& train) {
  auto log = log::get("elastic");
  // Everyone starts from the same state: rank 0's, or the newest commit a survivor holds (a
  // replacement or a new node arrives here while the others are in recoverOnce()).
  for (int attempt = 0;; ++attempt) {
    std::int64_t last_step = last_step_;
    auto synced = syncState(&last_step, nullptr);
    if (synced.ok()) break;
    if (!followable(synced.status()) || !world_.canRecoverInPlace() ||
        attempt >= options_.max_recoveries) {
      return synced.status();
    }
    RALLY_RETURN_IF_ERROR(world_.recover(options_.recover_timeout))
        << "re-forming before the first step";
  }
  for (;;) {
    Status s;
    try {
      s = train();
    } catch (const collectives::CollectiveError& e) {  // thrown where no Status can be returned
      s = e.status();
    }
    if (s.ok()) {
      if (pending_) writeRecoveryEvent();
      if (checkpointer_) {  // the last save in flight: finish it before the process ends
        const Status saved = checkpointer_->wait(options_.checkpoint.finalize_timeout);
        if (!saved.ok()) log->error("the last checkpoint was not saved: {}", saved.toString());
      }
      return s;
    }
    if (!isRecoverable(s) && !world_.generationChanged()) return s;
    if (!world_.canRecoverInPlace() || world_.closed()) return s;
    if (++recoveries_ > options_.max_recoveries) {
      RALLY_RETURN_IF_ERROR(s) << "after " << options_.max_recoveries
                               << " in-place recoveries (ElasticRunOptions::max_recoveries)";
    }
    log->warn("rank {}: {}; recovering in place. Its last collectives:\n{}", world_.rank(),
              s.toString(), world_.recentCollectives());
    for (;;) {
      const Status r = recoverOnce(s);
      if (r.ok()) break;
      // The generation moved again during recovery (a second failure): follow it, within the
      // same budget.
      if (!followable(r)) return r;
      if (++recoveries_ > options_.max_recoveries) {
        RALLY_RETURN_IF_ERROR(r) << "after " << options_.max_recoveries
                                 << " in-place recoveries (ElasticRunOptions::max_recoveries)";
      }
      log->warn("rank {}: recovery interrupted ({}); following the job", world_.rank(),
                r.toString());
    }
  }
}

}  // namespace rally
