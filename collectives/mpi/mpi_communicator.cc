#include "collectives/mpi/mpi_communicator.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "collectives/internal/call_check.h"
#include "collectives/internal/completable_work.h"
#include "collectives/internal/reduce.h"
#include "collectives/mpi/internal/mpi_process.h"

namespace rally::collectives {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;

using internal::AbandonedRequest;
using internal::callMpi;
using internal::finalizedCause;
using internal::mpiOp;
using internal::MpiProcess;
using internal::mpiStatus;
using internal::mpiType;

using WorkImpl = internal::CompletableWork;

// What a rank is about to do, exchanged before each collective when check_calls is on (the same
// descriptor and wording as the Gloo backend's).
using internal::CallDesc;
using Kind = internal::CallKind;
using namespace internal;  // the CallKind values

CallDesc callDesc(Kind kind, DataType type, size_t count, int root, std::optional<ReduceOp> op) {
  return {kind, static_cast<std::uint32_t>(type), count, root,
          op ? static_cast<std::int32_t>(*op) : -1};
}

// Polling an MPI request: spin (yielding the core) for the first kSpinFor, then sleep, doubling
// from kFirstSleep to kMaxSleep. Open MPI progresses a non-blocking operation only inside MPI calls
// (it has no progress thread as built here), so the sleeps stay short.
constexpr microseconds kSpinFor{50};
constexpr microseconds kFirstSleep{10};
constexpr microseconds kMaxSleep{200};

class Backoff {
 public:
  // Zero while spinning, then the next sleep.
  microseconds next() {
    if (Clock::now() - start_ < kSpinFor) return microseconds(0);
    sleep_ = sleep_.count() == 0 ? kFirstSleep : std::min(sleep_ * 2, kMaxSleep);
    return sleep_;
  }
  void reset() {
    start_ = Clock::now();
    sleep_ = microseconds(0);
  }

 private:
  Clock::time_point start_ = Clock::now();
  microseconds sleep_{0};
};

Result<std::unique_ptr<Communicator>> makeCommunicator(MpiProcess& process, MPI_Comm comm,
                                                       CommunicatorOptions options);

// One MPI communicator and its executor thread. Thread-safety: every method may be called from any
// thread; operations run in issue order (collectives one at a time, send/recv posted in order and
// completed while later operations run), and every rank must issue the same collectives in the same
// order. The destructor waits until the queued and posted operations end (each within op_timeout);
// abort() first to end them at once.
class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MpiProcess& process, MPI_Comm comm, CommunicatorOptions o)
      : process_(process), comm_(comm), options_(std::move(o)) {
    executor_ = std::thread([this] { run(); });
  }
  ~MpiCommunicator() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    executor_.join();
    // The communicator is freed once MPI has finished what was abandoned on it (at once if
    // nothing was); not at all if MPI is already finalized.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) process_.retire(std::make_shared<MPI_Comm>(comm_), std::move(abandoned_));
  }

  int rank() const override { return options_.rank; }
  int size() const override { return options_.size; }
  std::uint64_t generation() const override { return options_.generation; }
  std::string_view backend() const override { return "mpi"; }
  Capabilities capabilities() const override {
    return {.host_memory = true,
            .device_memory = false,
            .can_shrink = false,
            .elastic = false,
            .needs_launcher = true};
  }
  bool aborted() const override { return aborted_.load(); }

  // The counts below fit in an int: collective() refuses larger ones before anything runs.
  std::shared_ptr<Work> allreduce(void* data, size_t count, DataType type, ReduceOp op) override {
    const int n = static_cast<int>(count);
    return collective(
        fmt::format("allreduce({} x {}, {})", count, dataTypeName(type), reduceOpName(op)),
        callDesc(kAllreduce, type, count, -1, op), "MPI_Iallreduce",
        [=, this](MPI_Request* req) {
          return MPI_Iallreduce(MPI_IN_PLACE, data, n, mpiType(type), mpiOp(process_, type, op),
                                comm_, req);
        },
        [=, this] {
          if (op == ReduceOp::kAvg) internal::finishAverage(type, data, count, size());
        });
  }

  std::shared_ptr<Work> reduceScatter(const void* in, void* out, size_t count, DataType type,
                                      ReduceOp op) override {
    const int n = static_cast<int>(count);
    return collective(
        fmt::format("reduce_scatter({} x {}, {})", count, dataTypeName(type), reduceOpName(op)),
        callDesc(kReduceScatter, type, count, -1, op), "MPI_Ireduce_scatter_block",
        [=, this](MPI_Request* req) {
          return MPI_Ireduce_scatter_block(in, out, n, mpiType(type), mpiOp(process_, type, op),
                                           comm_, req);
        },
        [=, this] {
          if (op == ReduceOp::kAvg) internal::finishAverage(type, out, count, size());
        });
  }

  std::shared_ptr<Work> allgather(const void* in, void* out, size_t count, DataType type) override {
    const int n = static_cast<int>(count);
    return collective(fmt::format("allgather({} x {})", count, dataTypeName(type)),
                      callDesc(kAllgather, type, count, -1, std::nullopt), "MPI_Iallgather",
                      [=, this](MPI_Request* req) {
                        return MPI_Iallgather(in, n, mpiType(type), out, n, mpiType(type), comm_,
                                              req);
                      });
  }

  std::shared_ptr<Work> broadcast(void* data, size_t count, DataType type, int root) override {
    auto what = fmt::format("broadcast({} x {}, root {})", count, dataTypeName(type), root);
    if (root < 0 || root >= size()) {
      return failed(
          invalidArgument(fmt::format("{} on {}: root {} is not a rank of {} (0 <= root < {})",
                                      what, where(), root, size(), size())));
    }
    const int n = static_cast<int>(count);
    return collective(std::move(what), callDesc(kBroadcast, type, count, root, std::nullopt),
                      "MPI_Ibcast", [=, this](MPI_Request* req) {
                        return MPI_Ibcast(data, n, mpiType(type), root, comm_, req);
                      });
  }

  std::shared_ptr<Work> alltoall(const void* in, void* out, size_t count, DataType type) override {
    const int n = static_cast<int>(count);
    return collective(fmt::format("alltoall({} x {})", count, dataTypeName(type)),
                      callDesc(kAlltoall, type, count, -1, std::nullopt), "MPI_Ialltoall",
                      [=, this](MPI_Request* req) {
                        return MPI_Ialltoall(in, n, mpiType(type), out, n, mpiType(type), comm_,
                                             req);
                      });
  }

  std::shared_ptr<Work> send(const void* data, size_t count, DataType type, int peer) override {
    return pointToPoint(const_cast<void*>(data), count, type, peer, /*is_recv=*/false);
  }

  std::shared_ptr<Work> recv(void* data, size_t count, DataType type, int peer) override {
    return pointToPoint(data, count, type, peer, /*is_recv=*/true);
  }

  std::shared_ptr<Work> barrier() override {
    return collective("barrier", callDesc(kBarrier, DataType::kF32, 0, -1, std::nullopt),
                      "MPI_Ibarrier",
                      [this](MPI_Request* req) { return MPI_Ibarrier(comm_, req); });
  }

  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    auto result =
        std::make_shared<Result<std::unique_ptr<Communicator>>>(internalError("split did not run"));
    const std::uint64_t seq = splits_++;
    auto work = submit(
        fmt::format("split(color {}, key {})", color, key),
        [=, this](const std::string& what) { return splitNow(color, key, seq, what, *result); });
    RALLY_RETURN_IF_ERROR(work->wait(options_.connect_timeout + 2 * options_.op_timeout));
    return std::move(*result);
  }

  Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>& excluded) override {
    return unimplemented(fmt::format(
        "shrink on {}: the MPI backend cannot shrink: Open MPI as built by Debian has no ULFM "
        "(User-Level Failure Mitigation), so the surviving ranks cannot drop a dead rank from an "
        "MPI communicator; restart the job with mpirun, or use the gloo (CPU) or nccl (GPU) "
        "backend for elastic jobs",
        where()));
  }

  // MPI reads host buffers when an operation runs: nothing enqueued on a device to wait for.
  Status waitForEvent(void*) override { return okStatus(); }

  void abort(const std::string& reason) override {
    {
      std::lock_guard lock(mu_);
      if (aborted_) return;
      abort_reason_ = reason;
      aborted_ = true;
    }
    cv_.notify_all();  // wakes the executor from its poll sleep
  }

 private:
  // A collective (or split): runs on the executor, posting and completing its MPI requests. Gets
  // the operation's description for its messages.
  using Run = std::function<Status(const std::string& what)>;
  struct Task {
    std::shared_ptr<WorkImpl> work;
    Run run;  // a collective
    // send/recv: posted without waiting; the executor completes it (pollPosted).
    std::function<Status(MPI_Request*)> post;
    bool is_recv = false;
    int peer = -1;
  };
  struct Posted {
    MPI_Request request = MPI_REQUEST_NULL;
    std::shared_ptr<WorkImpl> work;
    Clock::time_point deadline;
    bool is_recv = false;
    int peer = -1;
  };

  std::string where() const {
    return fmt::format("rank {} of {}, generation {}, communicator '{}'", rank(), size(),
                       generation(), options_.name);
  }

  Status inContext(const std::string& what, const Status& cause) const {
    return Status(cause.code(), fmt::format("{} on {}: {}", what, where(), cause.message()));
  }

  Status abortCause() {
    std::lock_guard lock(mu_);
    return ::rally::aborted(fmt::format("the communicator was aborted: {}", abort_reason_));
  }

  std::optional<Status> checkCount(const std::string& what, size_t count) const {
    if (count <= static_cast<size_t>(INT_MAX)) return std::nullopt;
    return invalidArgument(
        fmt::format("{} on {}: MPI counts are int, so one call moves at most {} elements; split "
                    "the buffer into pieces of at most that many",
                    what, where(), INT_MAX));
  }

  std::shared_ptr<Work> failed(Status s) {
    auto w = std::make_shared<WorkImpl>("");
    w->complete(std::move(s));
    return w;
  }

  std::shared_ptr<Work> submit(std::string what, Run run) {
    auto w = std::make_shared<WorkImpl>(std::move(what));
    return enqueue(Task{.work = w, .run = std::move(run)});
  }

  // Queues a collective: the call check, then `start` posts it (not when its count is 0: every
  // rank's is, when the check passes) and the executor polls it to completion; `finish` after.
  std::shared_ptr<Work> collective(std::string what, CallDesc desc, const char* mpi_call,
                                   std::function<int(MPI_Request*)> start,
                                   std::function<void()> finish = nullptr) {
    if (auto bad = checkCount(what, desc.count)) return failed(std::move(*bad));
    return submit(std::move(what), [=, this](const std::string& what) -> Status {
      RALLY_RETURN_IF_ERROR(checkCall(desc, what));
      if (desc.count == 0 && desc.kind != kBarrier) return okStatus();
      MPI_Request req = MPI_REQUEST_NULL;
      RALLY_RETURN_IF_ERROR(
          callMpi(process_, mpi_call, __FILE__, __LINE__, [&] { return start(&req); }));
      RALLY_RETURN_IF_ERROR(waitFor(req, nullptr, what));
      if (finish) finish();
      return okStatus();
    });
  }

  // split() on the executor: sets `result` to the sub-communicator.
  Status splitNow(int color, int key, std::uint64_t seq, const std::string& what,
                  Result<std::unique_ptr<Communicator>>& result) {
    RALLY_RETURN_IF_ERROR(checkCall(callDesc(kSplit, DataType::kF32, 0, -1, std::nullopt), what));
    // Every rank's (color, key), by rank, then mine. The exchange shows that every rank has
    // arrived, so the blocking MPI_Comm_split below returns at once; and it turns any int color
    // into the non-negative one MPI needs: the lowest rank with that color.
    const size_t n = static_cast<size_t>(size());
    auto pairs = std::make_shared<std::vector<int>>(2 * n + 2);
    (*pairs)[2 * n] = color;
    (*pairs)[2 * n + 1] = key;
    MPI_Request req = MPI_REQUEST_NULL;
    RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(
        process_, MPI_Iallgather,
        (pairs->data() + 2 * n, 2, MPI_INT, pairs->data(), 2, MPI_INT, comm_, &req)));
    RALLY_RETURN_IF_ERROR(waitFor(req, pairs, what));
    int mpi_color = -1;
    for (size_t r = 0; r < n && mpi_color < 0; ++r) {
      if ((*pairs)[2 * r] == color) mpi_color = static_cast<int>(r);
    }
    if (mpi_color < 0 || mpi_color > rank()) {
      return internalError(
          fmt::format("the exchanged colors do not hold this rank's color {} at or before rank {}",
                      color, rank()));
    }
    // MPI ranks the members by key, then by rank in this communicator: the contract's order.
    MPI_Comm sub = MPI_COMM_NULL;
    RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(process_, MPI_Comm_split, (comm_, mpi_color, key, &sub)));
    CommunicatorOptions sub_options = options_;
    sub_options.name = fmt::format("{}/split{}/color{}", options_.name, seq, color);
    result = makeCommunicator(process_, sub, std::move(sub_options));
    return result.status();
  }

  std::shared_ptr<Work> pointToPoint(void* data, size_t count, DataType type, int peer,
                                     bool is_recv) {
    const char* verb = is_recv ? "recv" : "send";
    const char* dir = is_recv ? "from" : "to";
    auto what = fmt::format("{}({} x {} {} rank {})", verb, count, dataTypeName(type), dir, peer);
    if (peer < 0 || peer >= size() || peer == rank()) {
      return failed(invalidArgument(
          fmt::format("{} on {}: rank {} is not another rank of {}", what, where(), peer, size())));
    }
    if (auto bad = checkCount(what, count)) return failed(std::move(*bad));
    auto w = std::make_shared<WorkImpl>(std::move(what));
    // One tag: MPI does not let messages between two ranks on one communicator overtake each other,
    // so the n-th send from a to b matches the n-th recv by b from a.
    constexpr int kTag = 0;
    const int n = static_cast<int>(count);
    auto post = [=, this](MPI_Request* req) {
      return is_recv ? RALLY_MPI_CALL(process_, MPI_Irecv,
                                      (data, n, mpiType(type), peer, kTag, comm_, req))
                     : RALLY_MPI_CALL(process_, MPI_Isend,
                                      (data, n, mpiType(type), peer, kTag, comm_, req));
    };
    return enqueue(Task{.work = w, .post = std::move(post), .is_recv = is_recv, .peer = peer});
  }

  // Queues the task for the executor, or fails it at once if the communicator was aborted.
  std::shared_ptr<Work> enqueue(Task task) {
    auto w = task.work;
    if (aborted_) {
      w->complete(inContext(w->what(), abortCause()));
      return w;
    }
    {
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_all();
    return w;
  }

  // Exchanges what every rank is about to do; InvalidArgument naming every rank's call if they
  // differ (then no rank runs the operation, and the communicator stays usable).
  Status checkCall(const CallDesc& mine, const std::string& what) {
    if (!options_.check_calls || size() == 1) return okStatus();
    // [0, size): every rank's call; [size]: mine. Shared: an abandoned exchange may still write it.
    const size_t n = static_cast<size_t>(size());
    auto descs = std::make_shared<std::vector<CallDesc>>(n + 1);
    (*descs)[n] = mine;
    MPI_Request req = MPI_REQUEST_NULL;
    RALLY_RETURN_IF_ERROR(
        RALLY_MPI_CALL(process_, MPI_Iallgather,
                       (&(*descs)[n], static_cast<int>(sizeof(CallDesc)), MPI_BYTE, descs->data(),
                        static_cast<int>(sizeof(CallDesc)), MPI_BYTE, comm_, &req)))
        << "while exchanging the calls of the ranks (CommunicatorOptions::check_calls)";
    RALLY_RETURN_IF_ERROR(waitFor(req, descs, what))
        << "while exchanging the calls of the ranks (CommunicatorOptions::check_calls)";
    const std::string problem =
        internal::mismatch(mine, std::vector<CallDesc>(descs->begin(), descs->begin() + n));
    return problem.empty() ? okStatus() : invalidArgument(problem);
  }

  // Polls `req` until it completes, the communicator is aborted, or op_timeout passes; posted
  // send/recv are completed meanwhile. On abort or timeout the request is abandoned (MPI cannot
  // cancel a collective), with `buffers` kept alive for it; a timeout also aborts the communicator,
  // since its ranks no longer agree on which operation comes next.
  Status waitFor(MPI_Request& req, std::shared_ptr<void> buffers, const std::string& what) {
    const auto deadline = Clock::now() + options_.op_timeout;
    Backoff backoff;
    for (;;) {
      int done = 0;
      {
        auto entry = process_.enter();
        if (!entry) return finalizedCause();
        const int rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
          return mpiStatus(rc, "MPI_Test", __FILE__, __LINE__, StatusCode::kPeerLost);
        }
      }
      pollPosted();
      if (done) return okStatus();
      if (aborted_) {
        abandoned_.push_back({req, std::move(buffers)});
        return abortCause();
      }
      if (Clock::now() >= deadline) {
        abandoned_.push_back({req, std::move(buffers)});
        return timedOut(what, "not every rank took part");
      }
      pause(backoff.next());
    }
  }

  Status timedOut(const std::string& what, std::string_view who) {
    const std::string limit = formatDuration(options_.op_timeout);
    abort(
        fmt::format("{} timed out after {} (MPI cannot cancel an operation that has started, so "
                    "the ranks no longer agree on which operation comes next)",
                    what, limit));
    return timeoutError(fmt::format(
        "{} within {} (CommunicatorOptions::op_timeout); the communicator is aborted", who, limit));
  }

  // Sleeps for `d` (or yields the core when zero), waking at once on abort().
  void pause(microseconds d) {
    if (d.count() == 0) {
      std::this_thread::yield();
      return;
    }
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, d, [&] { return aborted_.load(); });
  }

  // Completes the posted send/recv that are done, aborted or past their deadline. True if any was.
  bool pollPosted() {
    bool any = false;
    for (auto it = posted_.begin(); it != posted_.end();) {
      std::optional<Status> result;
      int done = 0;
      int rc = MPI_SUCCESS;
      {
        auto entry = process_.enter();
        if (!entry) {
          result = finalizedCause();
        } else {
          rc = MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
        }
      }
      if (result) {
        // MPI is gone: nothing to cancel.
      } else if (rc != MPI_SUCCESS) {
        result = mpiStatus(rc, "MPI_Test", __FILE__, __LINE__, StatusCode::kPeerLost);
      } else if (done) {
        result = okStatus();
      } else if (aborted_) {
        dropPosted(*it);
        result = abortCause();
      } else if (Clock::now() >= it->deadline) {
        dropPosted(*it);
        result = timedOut(it->work->what(),
                          it->is_recv ? fmt::format("rank {} sent nothing to match it", it->peer)
                                      : fmt::format("rank {} did not receive it", it->peer));
      }
      if (result) {
        it->work->complete(result->ok() ? *result : inContext(it->work->what(), *result));
        it = posted_.erase(it);
        any = true;
      } else {
        ++it;
      }
    }
    return any;
  }

  // A send or recv given up: a recv is cancelled; either is freed (a send MPI already started goes
  // on reading its buffer until the peer takes it).
  void dropPosted(Posted& p) {
    auto entry = process_.enter();
    if (!entry) return;
    if (p.is_recv) MPI_Cancel(&p.request);
    MPI_Request_free(&p.request);
  }

  void execute(Task& task) {
    const std::string& what = task.work->what();
    if (aborted_) {
      task.work->complete(inContext(what, abortCause()));
      return;
    }
    task.work->markStarted();
    Status s;
    try {
      if (task.post) {
        MPI_Request req = MPI_REQUEST_NULL;
        s = task.post(&req);
        if (s.ok()) {
          posted_.push_back(
              Posted{req, task.work, Clock::now() + options_.op_timeout, task.is_recv, task.peer});
          return;
        }
      } else {
        s = task.run(what);
      }
    } catch (const std::exception& e) {
      s = internalError(e.what());
    }
    task.work->complete(s.ok() ? s : inContext(what, s));
  }

  // The executor: runs the queued operations one at a time in issue order and completes posted
  // send/recv. Ends once stopping and nothing is queued or posted.
  void run() {
    Backoff idle;
    std::unique_lock lock(mu_);
    for (;;) {
      if (!queue_.empty()) {
        Task task = std::move(queue_.front());
        queue_.pop_front();
        lock.unlock();
        execute(task);
        task = Task{};  // release what it holds (a split's result) outside the lock
        idle.reset();
        lock.lock();
        continue;
      }
      if (posted_.empty()) {
        if (stopping_) return;
        cv_.wait(lock);
        continue;
      }
      lock.unlock();
      const bool progressed = pollPosted();
      lock.lock();
      if (progressed || !queue_.empty() || posted_.empty()) {
        idle.reset();
        continue;
      }
      const microseconds d = idle.next();
      if (d.count() == 0) {
        lock.unlock();
        std::this_thread::yield();
        lock.lock();
      } else {
        cv_.wait_for(lock, d);
      }
    }
  }

  MpiProcess& process_;
  MPI_Comm comm_;
  const CommunicatorOptions options_;
  std::atomic<std::uint64_t> splits_{0};

  std::mutex mu_;
  std::condition_variable cv_;  // new tasks, abort(), stopping
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::atomic<bool> aborted_{false};
  std::string abort_reason_;  // guarded by mu_

  // The executor's own.
  std::vector<Posted> posted_;
  std::vector<AbandonedRequest> abandoned_;
  std::thread executor_;
};

// Takes ownership of `comm`: errors returned, not fatal; rank and size from MPI.
Result<std::unique_ptr<Communicator>> makeCommunicator(MpiProcess& process, MPI_Comm comm,
                                                       CommunicatorOptions options) {
  Status s = RALLY_MPI_CALL(process, MPI_Comm_set_errhandler, (comm, MPI_ERRORS_RETURN));
  if (s.ok()) s = RALLY_MPI_CALL(process, MPI_Comm_rank, (comm, &options.rank));
  if (s.ok()) s = RALLY_MPI_CALL(process, MPI_Comm_size, (comm, &options.size));
  if (!s.ok()) {
    if (auto entry = process.enter()) MPI_Comm_free(&comm);
    return s.addContext(fmt::format("while setting up MPI communicator '{}'", options.name));
  }
  return std::unique_ptr<Communicator>(new MpiCommunicator(process, comm, std::move(options)));
}

}  // namespace

bool launchedByMpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

Result<CommunicatorOptions> mpiWorldOptions() {
  RALLY_ASSIGN_OR_RETURN(MpiProcess * process, MpiProcess::get());
  CommunicatorOptions options;
  RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(*process, MPI_Comm_rank, (MPI_COMM_WORLD, &options.rank)));
  RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(*process, MPI_Comm_size, (MPI_COMM_WORLD, &options.size)));
  return options;
}

Result<std::unique_ptr<Communicator>> createMpiCommunicator(const CommunicatorOptions& options) {
  RALLY_ASSIGN_OR_RETURN(MpiProcess * process, MpiProcess::get());
  process->sweep();  // communicators destroyed earlier whose requests have completed since
  int world_rank = -1, world_size = 0;
  RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(*process, MPI_Comm_rank, (MPI_COMM_WORLD, &world_rank)));
  RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(*process, MPI_Comm_size, (MPI_COMM_WORLD, &world_size)));
  if (options.size != 0 && options.size != world_size) {
    return invalidArgument(fmt::format(
        "createMpiCommunicator('{}'): options.size is {}, but the job has {} processes (the size "
        "of MPI_COMM_WORLD, which mpirun/srun decides); pass {}, or 0 to take MPI's "
        "(mpiWorldOptions() fills both rank and size)",
        options.name, options.size, world_size, world_size));
  }
  if (options.rank != -1 && options.rank != world_rank) {
    return invalidArgument(fmt::format(
        "createMpiCommunicator('{}'): options.rank is {}, but this process is rank {} of "
        "MPI_COMM_WORLD (mpirun/srun decides); pass {}, or -1 to take MPI's (mpiWorldOptions() "
        "fills both rank and size)",
        options.name, options.rank, world_rank, world_rank));
  }
  // A non-blocking duplicate, so that a process that never comes is a Timeout, not a hang. The
  // handle is shared: an abandoned MPI_Comm_idup still writes it when it completes.
  auto dup = std::make_shared<MPI_Comm>(MPI_COMM_NULL);
  MPI_Request req = MPI_REQUEST_NULL;
  RALLY_RETURN_IF_ERROR(RALLY_MPI_CALL(*process, MPI_Comm_idup, (MPI_COMM_WORLD, dup.get(), &req)))
      << "while creating MPI communicator '" << options.name << "'";
  const auto deadline = Clock::now() + options.connect_timeout;
  Backoff backoff;
  for (int done = 0; !done;) {
    RALLY_RETURN_IF_ERROR(
        RALLY_MPI_CALL(*process, MPI_Test, (&req, &done, MPI_STATUS_IGNORE))
            .addContext(fmt::format("while creating MPI communicator '{}'", options.name)));
    if (done) break;
    if (Clock::now() >= deadline) {
      process->retire(dup, {AbandonedRequest{req, dup}});
      return timeoutError(fmt::format(
          "createMpiCommunicator('{}') on rank {} of {}, generation {}: not every process of "
          "MPI_COMM_WORLD called it within {} (CommunicatorOptions::connect_timeout); every "
          "process must create its communicators in the same order",
          options.name, world_rank, world_size, options.generation,
          formatDuration(options.connect_timeout)));
    }
    const microseconds d = backoff.next();
    if (d.count() == 0) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(d);
    }
  }
  return makeCommunicator(*process, *dup, options);
}

}  // namespace rally::collectives
