#include "collectives/nccl/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <iterator>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "collectives/nccl/internal/nccl_support.h"

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "rally's NCCL backend needs NCCL 2.18 or newer (non-blocking communicators, ncclCommSplit)"
#endif

// ncclCommShrink (NCCL 2.27) and ncclCommRevoke arrived together with their flag macros in nccl.h;
// testing for the macros reads the header actually compiled against instead of guessing versions.
#if defined(NCCL_SHRINK_ABORT)
#define RALLY_NCCL_HAS_SHRINK 1
#else
#define RALLY_NCCL_HAS_SHRINK 0
#endif
#if defined(NCCL_REVOKE_DEFAULT)
#define RALLY_NCCL_HAS_REVOKE 1
#else
#define RALLY_NCCL_HAS_REVOKE 0
#endif

namespace rally::collectives {
namespace {

using Clock = std::chrono::steady_clock;
using internal::Backoff;
using internal::checkCuda;
using internal::checkDeviceBuffer;
using internal::checkNccl;
using internal::cudaFailure;
using internal::DeviceGuard;
using internal::lateStatus;
using internal::limit;
using internal::Limit;
using internal::ncclFailure;
using internal::nonBlockingConfig;
using internal::settle;
using internal::toNccl;

// What a communicator and its Works share (a Work may outlive its communicator).
struct State {
  State(const CommunicatorOptions& o, int dev) : options(o), device(dev) {}
  ~State() {
    // Children whose initialisation was abandoned (abort or timeout in split/shrink) and that
    // NCCL completed anyway.
    DeviceGuard guard(device);
    for (const auto& slot : child_slots) {
      if (*slot != nullptr) (void)ncclCommAbort(*slot);
    }
  }

  std::string context(std::string_view what) const {
    return fmt::format(
        "{} on rank {} of {}, generation {}, communicator '{}' (NCCL, CUDA device {})", what,
        options.rank, options.size, options.generation, options.name, device);
  }
  Status abortedStatus(std::string_view what) const {
    std::lock_guard lock(status_mu);
    return ::rally::aborted(
        fmt::format("{}: the communicator was aborted: {}", context(what), abort_reason));
  }
  // The first error NCCL reported: the communicator is unusable after it.
  Status failureStatus() const {
    std::lock_guard lock(status_mu);
    return failure;
  }
  void recordFailure(const Status& s) {
    std::lock_guard lock(status_mu);
    if (failure.ok()) failure = s;
  }
  Status failedEarlier(std::string_view what, const Status& f) const {
    return Status(f.code(), fmt::format("{}: the communicator failed earlier; shrink() the "
                                        "survivors or build a new one: {}",
                                        context(what), f.message()));
  }

  // The communicator's abort(); any thread, idempotent.
  void abort(const std::string& reason) {
    if (!markAborted(reason)) return;
    std::lock_guard lock(nccl_mu);
    stopLocked();
  }
  // The same, for a caller that holds nccl_mu.
  void abortLocked(const std::string& reason) {
    if (markAborted(reason)) stopLocked();
  }
  // Sets the flag every poll watches; false if it was set already.
  bool markAborted(const std::string& reason) {
    std::lock_guard lock(status_mu);
    if (aborted.load()) return false;
    abort_reason = reason;
    aborted.store(true);
    return true;
  }
  // Under nccl_mu: stops the GPU side. ncclCommRevoke keeps the communicator for shrink() and
  // returns at once (it settles in NCCL's own thread; the next NCCL call on it waits for that).
  // A communicator left ncclInProgress by an abandoned poll may only be ncclCommAbort'ed.
  void stopLocked() {
    if (comm == nullptr || revoked) return;
    DeviceGuard guard(device);
#if RALLY_NCCL_HAS_REVOKE
    ncclResult_t state = ncclSuccess;
    if (!in_progress && ncclCommGetAsyncError(comm, &state) == ncclSuccess &&
        state != ncclInProgress) {
      const ncclResult_t r = ncclCommRevoke(comm, NCCL_REVOKE_DEFAULT);
      if (r == ncclSuccess || r == ncclInProgress) {
        revoked = true;
        return;
      }
    }
#endif
    (void)ncclCommAbort(comm);
    comm = nullptr;
  }

  const CommunicatorOptions options;
  const int device;

  // NCCL allows one thread at a time per communicator. Held for non-blocking NCCL calls and for
  // polls that watch `aborted`, so abort() gets it within a poll interval.
  std::mutex nccl_mu;
  ncclComm_t comm = nullptr;  // nullptr once destroyed or aborted with ncclCommAbort
  bool revoked = false;       // ncclCommRevoke was called (it may still be settling)
  bool in_progress = false;   // a poll was abandoned with the communicator ncclInProgress
  // Where ncclCommSplit/ncclCommShrink write the child: NCCL writes it from its own thread when
  // the child is ready, so it must outlive an abandoned poll.
  std::vector<std::unique_ptr<ncclComm_t>> child_slots;
  std::atomic<cudaStream_t> stream{nullptr};  // where operations are enqueued (setStream())

  std::atomic<bool> aborted{false};
  mutable std::mutex status_mu;
  std::string abort_reason;  // guarded by status_mu
  Status failure;            // guarded by status_mu
};

// An operation decided before reaching the GPU: zero counts, refused arguments, aborted.
class DoneWork final : public Work {
 public:
  explicit DoneWork(Status s) : status_(std::move(s)) {}
  Status wait(Milliseconds) override { return status_; }
  bool done() const override { return true; }

 private:
  const Status status_;
};

std::shared_ptr<Work> done(Status s) { return std::make_shared<DoneWork>(std::move(s)); }

// An operation on the GPU: complete when the event recorded behind it is.
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<State> state, std::string what, cudaEvent_t event)
      : state_(std::move(state)), what_(std::move(what)), event_(event), issued_(Clock::now()) {}
  ~NcclWork() override {
    DeviceGuard guard(state_->device);
    (void)cudaEventDestroy(event_);
  }

  Status wait(Milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    for (Backoff backoff;; backoff.pause()) {
      if (auto s = poll()) return *s;
      if (Clock::now() >= deadline) {
        return timeoutError(fmt::format(
            "{}: still running after {} (it goes on; abort() the communicator to stop it)",
            state_->context(what_), formatDuration(timeout)));
      }
    }
  }

  bool done() const override { return poll().has_value(); }

 private:
  // The final status once known, nullopt while the operation runs.
  std::optional<Status> poll() const {
    std::lock_guard lock(mu_);
    if (final_) return final_;
    // Invariant: OK only for an event seen complete while the communicator was not aborted
    // (ncclCommRevoke and ncclCommAbort complete the events of unfinished kernels too).
    if (state_->aborted) return final_ = state_->abortedStatus(what_);
    DeviceGuard guard(state_->device);
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaSuccess) {
      return final_ = state_->aborted ? state_->abortedStatus(what_) : okStatus();
    }
    if (e != cudaErrorNotReady) {
      Status s = cudaFailure(e, "cudaEventQuery", state_->context(what_));
      state_->recordFailure(s);
      return final_ = s;
    }
    if (Status s = asyncError(); !s.ok()) return final_ = s;
    if (Clock::now() - issued_ > state_->options.op_timeout) {
      Status s = timeoutError(fmt::format(
          "{}: not complete {} after it was issued (op_timeout): a peer is missing or stuck; the "
          "communicator was aborted to release its stream",
          state_->context(what_), formatDuration(state_->options.op_timeout)));
      state_->abort(s.message());
      return final_ = s;
    }
    return std::nullopt;
  }

  // An error NCCL reported in the background (a peer gone, the network), or one another
  // operation saw first. Skipped while another thread is inside NCCL: the next poll looks again.
  Status asyncError() const {
    if (Status f = state_->failureStatus(); !f.ok()) return state_->failedEarlier(what_, f);
    std::unique_lock lock(state_->nccl_mu, std::try_to_lock);
    if (!lock.owns_lock() || state_->comm == nullptr || state_->in_progress) return okStatus();
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(state_->comm, &async);
    if (r == ncclSuccess && (async == ncclSuccess || async == ncclInProgress)) return okStatus();
    Status s = r != ncclSuccess
                   ? ncclFailure(r, state_->comm, "ncclCommGetAsyncError", state_->context(what_))
                   : ncclFailure(async, state_->comm, "the operation", state_->context(what_));
    state_->recordFailure(s);
    return s;
  }

  const std::shared_ptr<State> state_;
  const std::string what_;
  const cudaEvent_t event_;
  const Clock::time_point issued_;
  mutable std::mutex mu_;
  mutable std::optional<Status> final_;
};

// Buffers an operation reads or writes, with their names for errors.
using Buffers = std::vector<std::pair<const void*, std::string>>;
// Makes the NCCL calls of one operation on (comm, stream); returns the first failure.
using Enqueue = std::function<ncclResult_t(ncclComm_t, cudaStream_t)>;
// Starts a child communicator of `parent` (ncclCommSplit/ncclCommShrink) into `slot`.
using LaunchChild = std::function<ncclResult_t(ncclComm_t parent, ncclComm_t* slot, ncclConfig_t*)>;

class NcclCommunicatorImpl final : public NcclCommunicator {
 public:
  NcclCommunicatorImpl(std::shared_ptr<State> state, cudaStream_t own_stream, void* barrier)
      : state_(std::move(state)), own_stream_(own_stream), barrier_(barrier) {
    state_->stream = own_stream_;
  }

  // A healthy communicator is finalised (its operations flushed, within op_timeout) and
  // destroyed; an aborted, revoked or failed one is aborted.
  ~NcclCommunicatorImpl() override {
    std::lock_guard lock(state_->nccl_mu);
    DeviceGuard guard(state_->device);
    if (ncclComm_t comm = state_->comm; comm != nullptr) {
      const std::string context = state_->context("destroying the communicator");
      bool healthy = !state_->aborted && !state_->in_progress && state_->failureStatus().ok();
      if (healthy) {
        // An abort() through the shared state (a Work's, while this runs) ends the wait for the
        // flush; the communicator is then aborted below.
        Limit l = limit("op_timeout", state_->options.op_timeout);
        l.cancelled = [this] { return state_->aborted.load(); };
        const ncclResult_t r = ncclCommFinalize(comm);
        healthy = (r == ncclSuccess || r == ncclInProgress) &&
                  settle(comm, l, "ncclCommFinalize", context).value_or(timeoutError("")).ok();
      }
      if (healthy) {
        (void)ncclCommDestroy(comm);
      } else {
        // Works still running must not read the aborted kernels' events as success.
        state_->markAborted("the communicator was destroyed");
        if (state_->revoked && !state_->in_progress) {
          // Let the revoke finish in NCCL's thread before tearing the communicator down.
          (void)settle(comm, limit("connect_timeout", state_->options.connect_timeout),
                       "ncclCommRevoke", context);
        }
        (void)ncclCommAbort(comm);
      }
      state_->comm = nullptr;
    }
    (void)cudaFree(barrier_);
    (void)cudaStreamDestroy(own_stream_);
  }

  int rank() const override { return state_->options.rank; }
  int size() const override { return state_->options.size; }
  std::uint64_t generation() const override { return state_->options.generation; }
  std::string_view backend() const override { return "nccl"; }
  Capabilities capabilities() const override { return ncclCapabilities(); }
  int device() const override { return state_->device; }
  cudaStream_t stream() const override { return state_->stream.load(); }

  Status setStream(cudaStream_t stream) override {
    if (stream == nullptr) stream = own_stream_;
#if CUDART_VERSION >= 12080
    DeviceGuard guard(state_->device);
    int stream_device = -1;
    if (const cudaError_t e = cudaStreamGetDevice(stream, &stream_device); e != cudaSuccess) {
      return cudaFailure(e, "cudaStreamGetDevice", state_->context("setStream"));
    }
    if (stream_device != state_->device) {
      return invalidArgument(fmt::format(
          "{}: the stream belongs to CUDA device {}; operations of this rank run on device {}",
          state_->context("setStream"), stream_device, state_->device));
    }
#endif
    state_->stream = stream;
    return okStatus();
  }

  Status waitForEvent(void* event) override {
    const std::string context = state_->context("waitForEvent");
    if (event == nullptr) {
      return invalidArgument(
          fmt::format("{}: no event (a cudaEvent_t recorded on the stream "
                      "whose work the operations must follow)",
                      context));
    }
    DeviceGuard guard(state_->device);
    RALLY_RETURN_IF_ERROR(guard.status(context));
    return checkCuda(cudaStreamWaitEvent(state_->stream.load(), static_cast<cudaEvent_t>(event), 0),
                     "cudaStreamWaitEvent", context);
  }

  std::shared_ptr<Work> allreduce(void* data, size_t count, DataType type, ReduceOp op) override {
    return issue(fmt::format("allreduce({} x {}, {})", count, dataTypeName(type), reduceOpName(op)),
                 count, {{data, "data"}}, "ncclAllReduce", [=](ncclComm_t c, cudaStream_t s) {
                   return ncclAllReduce(data, data, count, toNccl(type), toNccl(op), c, s);
                 });
  }

  std::shared_ptr<Work> reduceScatter(const void* in, void* out, size_t count, DataType type,
                                      ReduceOp op) override {
    return issue(
        fmt::format("reduce_scatter({} x {}, {})", count, dataTypeName(type), reduceOpName(op)),
        count, {{in, "in"}, {out, "out"}}, "ncclReduceScatter", [=](ncclComm_t c, cudaStream_t s) {
          return ncclReduceScatter(in, out, count, toNccl(type), toNccl(op), c, s);
        });
  }

  std::shared_ptr<Work> allgather(const void* in, void* out, size_t count, DataType type) override {
    return issue(fmt::format("allgather({} x {})", count, dataTypeName(type)), count,
                 {{in, "in"}, {out, "out"}}, "ncclAllGather", [=](ncclComm_t c, cudaStream_t s) {
                   return ncclAllGather(in, out, count, toNccl(type), c, s);
                 });
  }

  std::shared_ptr<Work> broadcast(void* data, size_t count, DataType type, int root) override {
    const std::string what =
        fmt::format("broadcast({} x {}, root {})", count, dataTypeName(type), root);
    if (root < 0 || root >= size()) {
      return done(invalidArgument(fmt::format("{}: root {} is not a rank of {} (0..{})",
                                              state_->context(what), root, size(), size() - 1)));
    }
    return issue(what, count, {{data, "data"}}, "ncclBroadcast", [=](ncclComm_t c, cudaStream_t s) {
      return ncclBroadcast(data, data, count, toNccl(type), root, c, s);
    });
  }

  // One group of a send to and a recv from every rank, this one included.
  std::shared_ptr<Work> alltoall(const void* in, void* out, size_t count, DataType type) override {
    const size_t block = count * dataTypeSize(type);
    std::vector<PeerTransfer> transfers;
    for (int peer = 0; peer < size() && count > 0; ++peer) {
      void* from = const_cast<char*>(static_cast<const char*>(in)) + block * peer;
      void* to = static_cast<char*>(out) + block * peer;
      transfers.push_back({PeerTransfer::Direction::kSend, from, count, type, peer});
      transfers.push_back({PeerTransfer::Direction::kRecv, to, count, type, peer});
    }
    return transfer(fmt::format("alltoall({} x {})", count, dataTypeName(type)),
                    std::move(transfers), {{in, "in"}, {out, "out"}});
  }

  std::shared_ptr<Work> send(const void* data, size_t count, DataType type, int peer) override {
    return pointToPoint(PeerTransfer::Direction::kSend, const_cast<void*>(data), count, type, peer);
  }

  std::shared_ptr<Work> recv(void* data, size_t count, DataType type, int peer) override {
    return pointToPoint(PeerTransfer::Direction::kRecv, data, count, type, peer);
  }

  std::shared_ptr<Work> sendRecv(const std::vector<PeerTransfer>& transfers) override {
    const std::string what = fmt::format("send_recv({} transfers)", transfers.size());
    // Zero-length transfers are dropped on both sides alike (counts must match across a pair).
    std::vector<PeerTransfer> live;
    Buffers buffers;
    for (size_t i = 0; i < transfers.size(); ++i) {
      const PeerTransfer& t = transfers[i];
      if (Status s = checkPeer(fmt::format("{} (transfer {})", what, i), t.peer, true); !s.ok()) {
        return done(s);
      }
      if (t.count == 0) continue;
      live.push_back(t);
      buffers.emplace_back(t.data, fmt::format("the data of transfer {}", i));
    }
    return transfer(what, std::move(live), buffers);
  }

  // An allreduce of a one-element buffer of our own: complete on a rank once every rank joined.
  std::shared_ptr<Work> barrier() override {
    void* buffer = barrier_;
    return issue("barrier", 1, {}, "ncclAllReduce", [buffer](ncclComm_t c, cudaStream_t s) {
      return ncclAllReduce(buffer, buffer, 1, ncclFloat32, ncclSum, c, s);
    });
  }

  void abort(const std::string& reason) override { state_->abort(reason); }
  bool aborted() const override { return state_->aborted.load(); }

  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    const std::string what = fmt::format("split(color {}, key {})", color, key);
    if (color < 0) {
      return invalidArgument(
          fmt::format("{}: color {} is negative; NCCL needs a color >= 0 (every rank passes one)",
                      state_->context(what), color));
    }
    return makeChild(
        what, fmt::format("{}/split{}/color{}", state_->options.name, children_++, color),
        "ncclCommSplit",
        [=](ncclComm_t parent, ncclComm_t* slot, ncclConfig_t* config) {
          return ncclCommSplit(parent, color, key, slot, config);
        },
        /*after_abort=*/false);
  }

  Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>& excluded) override {
    const std::string what = fmt::format("shrink(excluding [{}])", fmt::join(excluded, ", "));
#if RALLY_NCCL_HAS_SHRINK && RALLY_NCCL_HAS_REVOKE
    std::vector<int> sorted = excluded;
    std::sort(sorted.begin(), sorted.end());
    for (int r : sorted) {
      if (r < 0 || r >= size() || r == rank()) {
        return invalidArgument(fmt::format(
            "{}: {} is not another rank of {} (0..{}, not {}: excluded ranks take no part)",
            state_->context(what), r, size(), size() - 1, rank()));
      }
    }
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      return invalidArgument(fmt::format("{}: a rank is excluded twice", state_->context(what)));
    }
    // A failed communicator is revoked first, so that it shrinks with NCCL_SHRINK_ABORT.
    if (Status f = state_->failureStatus(); !f.ok()) state_->abort(f.message());
    const bool after_abort = state_->aborted.load();
    const int flags = after_abort ? NCCL_SHRINK_ABORT : NCCL_SHRINK_DEFAULT;
    const std::string name = fmt::format("{}/shrink{}", state_->options.name, children_++);
    if (sorted.empty()) {
      // NCCL refuses an empty exclusion list; one color for every rank makes the same group.
      const int key = rank();
      return makeChild(
          what, name, "ncclCommSplit",
          [key](ncclComm_t parent, ncclComm_t* slot, ncclConfig_t* config) {
            return ncclCommSplit(parent, 0, key, slot, config);
          },
          after_abort);
    }
    return makeChild(
        what, name, "ncclCommShrink",
        [sorted, flags](ncclComm_t parent, ncclComm_t* slot, ncclConfig_t* config) mutable {
          return ncclCommShrink(parent, sorted.data(), static_cast<int>(sorted.size()), slot,
                                config, flags);
        },
        after_abort);
#else
    return unimplemented(fmt::format(
        "{}: shrink() needs ncclCommShrink and ncclCommRevoke, and this rally was built against "
        "NCCL {}.{}.{}, which lacks them; build a new communicator of the survivors instead",
        state_->context(what), NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH));
#endif
  }

  // Wraps an NCCL communicator that finished initialising: its own stream and barrier buffer.
  // `o.size` 0: rank and size come from NCCL (a child). On failure `comm` is aborted.
  static Result<std::unique_ptr<NcclCommunicator>> adopt(ncclComm_t comm, CommunicatorOptions o,
                                                         int device, const std::string& context) {
    DeviceGuard guard(device);
    cudaStream_t stream = nullptr;
    void* barrier = nullptr;
    int count = 0;
    int rank = 0;
    Status s = guard.status(context);
    if (s.ok()) s = checkNccl(ncclCommCount(comm, &count), comm, "ncclCommCount", context);
    if (s.ok()) s = checkNccl(ncclCommUserRank(comm, &rank), comm, "ncclCommUserRank", context);
    if (s.ok() && o.size > 0 && (count != o.size || rank != o.rank)) {
      s = internalError(fmt::format("{}: NCCL made rank {} of {}, not rank {} of {}", context, rank,
                                    count, o.rank, o.size));
    }
    if (s.ok()) {
      s = checkCuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                    "cudaStreamCreateWithFlags", context);
    }
    if (s.ok()) s = checkCuda(cudaMalloc(&barrier, sizeof(float)), "cudaMalloc", context);
    if (s.ok()) {
      s = checkCuda(cudaMemsetAsync(barrier, 0, sizeof(float), stream), "cudaMemsetAsync", context);
    }
    if (s.ok()) s = checkCuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", context);
    if (!s.ok()) {
      if (barrier != nullptr) (void)cudaFree(barrier);
      if (stream != nullptr) (void)cudaStreamDestroy(stream);
      (void)ncclCommAbort(comm);
      return s;
    }
    o.rank = rank;
    o.size = count;
    auto state = std::make_shared<State>(o, device);
    state->comm = comm;
    return std::unique_ptr<NcclCommunicator>(
        new NcclCommunicatorImpl(std::move(state), stream, barrier));
  }

 private:
  Status checkPeer(std::string_view what, int peer, bool self_allowed) const {
    if (peer >= 0 && peer < size() && (self_allowed || peer != rank())) return okStatus();
    return invalidArgument(fmt::format("{}: peer {} is not {} rank of {} (0..{}{})",
                                       state_->context(what), peer, self_allowed ? "a" : "another",
                                       size(), size() - 1,
                                       self_allowed ? "" : fmt::format(", not {}", rank())));
  }

  std::shared_ptr<Work> pointToPoint(PeerTransfer::Direction direction, void* data, size_t count,
                                     DataType type, int peer) {
    const bool is_send = direction == PeerTransfer::Direction::kSend;
    const std::string what = fmt::format("{}({} x {} {} rank {})", is_send ? "send" : "recv", count,
                                         dataTypeName(type), is_send ? "to" : "from", peer);
    if (Status s = checkPeer(what, peer, /*self_allowed=*/false); !s.ok()) return done(s);
    std::vector<PeerTransfer> one;
    if (count > 0) one.push_back({direction, data, count, type, peer});
    return transfer(what, std::move(one), {{data, "data"}});
  }

  // Sends and receives as one NCCL group, closed even after a failed call (a group of one is a
  // plain ncclSend or ncclRecv).
  std::shared_ptr<Work> transfer(const std::string& what, std::vector<PeerTransfer> transfers,
                                 const Buffers& buffers) {
    const size_t n = transfers.size();
    return issue(what, n, buffers, "ncclSend/ncclRecv in a group",
                 [transfers = std::move(transfers)](ncclComm_t c, cudaStream_t s) {
                   if (const ncclResult_t r = ncclGroupStart(); r != ncclSuccess) return r;
                   ncclResult_t first = ncclSuccess;
                   for (size_t i = 0; i < transfers.size() && first == ncclSuccess; ++i) {
                     const PeerTransfer& t = transfers[i];
                     first = t.direction == PeerTransfer::Direction::kSend
                                 ? ncclSend(t.data, t.count, toNccl(t.type), t.peer, c, s)
                                 : ncclRecv(t.data, t.count, toNccl(t.type), t.peer, c, s);
                   }
                   const ncclResult_t end = ncclGroupEnd();
                   return first != ncclSuccess ? first : end;
                 });
  }

  // Enqueues one operation on the current stream, then an event behind it for the Work to poll.
  // Checks, in order: aborted, a zero count (done at once), the buffers, an earlier failure.
  std::shared_ptr<Work> issue(const std::string& what, size_t count, const Buffers& buffers,
                              std::string_view call, const Enqueue& enqueue) {
    if (state_->aborted) return done(state_->abortedStatus(what));
    if (count == 0) return done(okStatus());
    const std::string context = state_->context(what);
    DeviceGuard guard(state_->device);
    if (Status s = guard.status(context); !s.ok()) return done(s);
    for (const auto& [pointer, name] : buffers) {
      if (Status s = checkDeviceBuffer(pointer, name, state_->device, context); !s.ok()) {
        return done(s);
      }
    }
    std::lock_guard lock(state_->nccl_mu);
    if (state_->aborted || state_->comm == nullptr) return done(state_->abortedStatus(what));
    if (Status f = state_->failureStatus(); !f.ok()) return done(state_->failedEarlier(what, f));
    ncclComm_t comm = state_->comm;
    cudaStream_t stream = state_->stream.load();
    cudaEvent_t event = nullptr;
    if (Status s = checkCuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                             "cudaEventCreateWithFlags", context);
        !s.ok()) {
      return done(s);
    }
    Status s = okStatus();
    if (const ncclResult_t r = enqueue(comm, stream); r == ncclInProgress) {
      // NCCL is still setting up (connections to peers, on first use): the operation is on the
      // stream only once the communicator settles, and nothing else may be called on it before.
      Limit l = limit("op_timeout", state_->options.op_timeout);
      l.cancelled = [this] { return state_->aborted.load(); };
      bool timed_out = false;
      std::optional<Status> settled = settle(comm, l, call, context, &timed_out);
      if (!settled) {
        (void)cudaEventDestroy(event);
        state_->in_progress = true;
        if (!timed_out) return done(state_->abortedStatus(what));
        Status late =
            lateStatus(call, context, l, "a peer did not join; the communicator was aborted");
        state_->abortLocked(late.message());
        return done(late);
      }
      s = *settled;
    } else {
      s = checkNccl(r, comm, call, context);
    }
    if (s.ok()) s = checkCuda(cudaEventRecord(event, stream), "cudaEventRecord", context);
    if (!s.ok()) {
      (void)cudaEventDestroy(event);
      if (s.code() != StatusCode::kInvalidArgument) state_->recordFailure(s);
      return done(s);
    }
    return std::make_shared<NcclWork>(state_, what, event);
  }

  // Runs ncclCommSplit/ncclCommShrink non-blocking and polls the parent, then the child, until
  // both settle, within connect_timeout; abort() ends it too, unless the parent was aborted before
  // (shrink after abort).
  Result<std::unique_ptr<Communicator>> makeChild(const std::string& what, std::string name,
                                                  std::string_view call, const LaunchChild& launch,
                                                  bool after_abort) {
    const std::string context = state_->context(what);
    Limit l = limit("connect_timeout", state_->options.connect_timeout);
    if (!after_abort) {
      if (state_->aborted) return state_->abortedStatus(what);
      if (Status f = state_->failureStatus(); !f.ok()) return state_->failedEarlier(what, f);
      l.cancelled = [this] { return state_->aborted.load(); };
    }
    DeviceGuard guard(state_->device);
    RALLY_RETURN_IF_ERROR(guard.status(context));
    ncclComm_t child = nullptr;
    {
      std::lock_guard lock(state_->nccl_mu);
      if (l.cancelled()) return state_->abortedStatus(what);
      if (state_->comm == nullptr) {
        return failedPrecondition(fmt::format(
            "{}: the NCCL communicator is gone (abort() came while NCCL was still busy with a "
            "call, so it was destroyed with ncclCommAbort, not revoked); build a new one",
            context));
      }
      ncclComm_t parent = state_->comm;
      if (state_->revoked) {
        // A revoked communicator may split or shrink once the revoke has settled.
        std::optional<Status> revoke = settle(parent, l, "ncclCommRevoke", context);
        if (!revoke) return lateStatus("ncclCommRevoke", context, l, "the GPU did not let go");
        RALLY_RETURN_IF_ERROR(*revoke);
      }
      auto& slots = state_->child_slots;
      ncclComm_t* slot = slots.emplace_back(std::make_unique<ncclComm_t>(nullptr)).get();
      ncclConfig_t config = nonBlockingConfig();
      Status s = okStatus();
      // On a non-blocking parent, ncclCommSplit and ncclCommShrink return ncclSuccess (their own
      // checks' result, not ncclGroupEnd's ncclInProgress) while NCCL's thread still makes the
      // child: the parent reads ncclInProgress until it is done, and the child is written into
      // the slot at the end (NCCL 2.28). So the parent is polled either way.
      if (const ncclResult_t r = launch(parent, slot, &config);
          r == ncclInProgress || r == ncclSuccess) {
        bool timed_out = false;
        std::optional<Status> settled = settle(parent, l, call, context, &timed_out);
        if (!settled) {
          // The slot stays: NCCL may still write the child into it (~State aborts it then).
          state_->in_progress = true;
          if (!timed_out) return state_->abortedStatus(what);
          Status late =
              lateStatus(call, context, l, "a rank did not call it; the communicator was aborted");
          state_->abortLocked(late.message());
          return late;
        }
        s = *settled;
      } else {
        s = checkNccl(r, parent, call, context);
      }
      // The child should be in the slot once the parent has settled; should it not be, the slot
      // stays until it is (freed, NCCL would write into freed memory), within connect_timeout.
      if (s.ok()) {
        Backoff backoff;
        while ((child = __atomic_load_n(slot, __ATOMIC_ACQUIRE)) == nullptr) {
          if (Clock::now() >= l.deadline || l.cancelled()) break;
          backoff.pause();
        }
        if (child == nullptr) {
          return l.cancelled() ? state_->abortedStatus(what)
                               : lateStatus(call, context, l,
                                            "NCCL reported it done but gave no communicator");
        }
      } else {
        child = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
        // The parent's error may be an earlier operation's while NCCL still makes the child:
        // without a child the slot stays (~State aborts what NCCL may yet write into it).
        if (child == nullptr) return s;
      }
      slots.erase(std::find_if(slots.begin(), slots.end(),
                               [slot](const auto& p) { return p.get() == slot; }));
      if (!s.ok()) {
        if (child != nullptr) (void)ncclCommAbort(child);
        return s;
      }
    }
    // The child's own initialisation state.
    std::optional<Status> ready = settle(child, l, call, context);
    if (!ready || !ready->ok()) {
      (void)ncclCommAbort(child);
      if (!ready && l.cancelled()) return state_->abortedStatus(what);
      return ready ? *ready : lateStatus(call, context, l, "the new communicator did not start");
    }
    CommunicatorOptions o = state_->options;
    o.name = std::move(name);
    o.size = 0;
    auto adopted = adopt(child, o, state_->device, context);
    if (!adopted.ok()) return adopted.status();
    return std::unique_ptr<Communicator>(std::move(*adopted));
  }

  const std::shared_ptr<State> state_;
  const cudaStream_t own_stream_;
  void* const barrier_;
  std::atomic<std::uint64_t> children_{0};  // numbers split/shrink results for their names
};

// Waits for rank 0's unique id; in slices when `stop` can be requested, so that it is noticed.
Result<std::string> waitForId(BootstrapStore& store, const std::string& key, const Limit& limit,
                              const std::stop_token& stop, const std::string& who) {
  for (;;) {
    if (stop.stop_requested()) {
      return ::rally::aborted(fmt::format("{}: stopped while waiting for rank 0's NCCL id", who));
    }
    const auto left = std::chrono::duration_cast<Milliseconds>(limit.deadline - Clock::now());
    if (left <= Milliseconds(0)) {
      return timeoutError(fmt::format(
          "{}: rank 0 did not publish NCCL's unique id under '{}' within {} (connect_timeout)", who,
          key, formatDuration(limit.length)));
    }
    Status s = store.wait({key}, stop.stop_possible() ? std::min(left, Milliseconds(100)) : left);
    if (s.ok()) break;
    if (s.code() != StatusCode::kTimeout) {
      RALLY_RETURN_IF_ERROR(s) << "while " << who << " waited for rank 0's NCCL id";
    }
  }
  auto value = store.get(key);
  RALLY_RETURN_IF_ERROR(value.status()) << "while " << who << " read rank 0's NCCL id";
  return std::move(*value);
}

}  // namespace

Capabilities ncclCapabilities() {
  return {.host_memory = false,
          .device_memory = true,
          .can_shrink = RALLY_NCCL_HAS_SHRINK && RALLY_NCCL_HAS_REVOKE,
          .elastic = true,
          .needs_launcher = false};
}

Result<std::unique_ptr<NcclCommunicator>> NcclCommunicator::create(BootstrapStore& store,
                                                                   const CommunicatorOptions& o,
                                                                   std::stop_token stop) {
  Limit l = limit("connect_timeout", o.connect_timeout);
  l.cancelled = [&stop] { return stop.stop_requested(); };
  const std::string who = fmt::format("NCCL communicator '{}' (rank {} of {}, generation {})",
                                      o.name, o.rank, o.size, o.generation);
  if (o.size < 1 || o.rank < 0 || o.rank >= o.size) {
    return invalidArgument(fmt::format("{}: rank {} of size {} is not a rank (0 <= rank < size)",
                                       who, o.rank, o.size));
  }
  int devices = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    return failedPrecondition(fmt::format(
        "{}: no CUDA device ({}): the NCCL backend needs a GPU for each rank", who,
        e != cudaSuccess ? fmt::format("{}: {}", cudaGetErrorName(e), cudaGetErrorString(e))
                         : std::string("cudaGetDeviceCount found none")));
  }
  int device = o.device;
  if (device == -1) {
    RALLY_RETURN_IF_ERROR(checkCuda(cudaGetDevice(&device), "cudaGetDevice", who));
  } else if (device < 0 || device >= devices) {
    return invalidArgument(
        fmt::format("{}: CUDA device {} does not exist; this machine has {} (0..{}); "
                    "CommunicatorOptions::device must be one of them, or -1 for the current device",
                    who, device, devices, devices - 1));
  }
  DeviceGuard guard(device);
  RALLY_RETURN_IF_ERROR(guard.status(who));

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  const std::string key = fmt::format("nccl/{}/{}/id", o.generation, o.name);
  if (o.rank == 0) {
    RALLY_RETURN_IF_ERROR(checkNccl(ncclGetUniqueId(&id), nullptr, "ncclGetUniqueId", who));
    RALLY_RETURN_IF_ERROR(store.set(key, std::string(id.internal, sizeof(id.internal))))
        << "while " << who << " published its NCCL id";
  } else {
    RALLY_ASSIGN_OR_RETURN(std::string value, waitForId(store, key, l, stop, who));
    if (value.size() != sizeof(id.internal)) {
      return invalidArgument(fmt::format(
          "{}: the NCCL id under '{}' has {} bytes, not {}: another program wrote that key", who,
          key, value.size(), sizeof(id.internal)));
    }
    std::memcpy(id.internal, value.data(), sizeof(id.internal));
  }

  ncclConfig_t config = nonBlockingConfig();
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, o.size, id, o.rank, &config);
  Status s = checkNccl(r == ncclInProgress ? ncclSuccess : r, comm, "ncclCommInitRankConfig", who);
  if (s.ok() && comm == nullptr) s = internalError(who + ": ncclCommInitRankConfig gave no comm");
  if (s.ok()) {
    std::optional<Status> settled = settle(comm, l, "ncclCommInitRankConfig", who);
    if (!settled && stop.stop_requested()) {
      s = ::rally::aborted(fmt::format("{}: stopped while NCCL initialised", who));
    } else if (!settled) {
      s = lateStatus("ncclCommInitRankConfig", who, l,
                     "a rank did not come, or cannot reach this one");
    } else {
      s = *settled;
    }
  }
  if (!s.ok()) {
    if (comm != nullptr) (void)ncclCommAbort(comm);
    if (o.size == 1 && s.code() == StatusCode::kPeerLost) {
      // A one-rank communicator has no peer to lose: NCCL's system error is local (sysfs or
      // topology detection refused, say, as under some sandboxes).
      return Status(StatusCode::kUnavailable,
                    s.message() + " (a local failure: this communicator has no other rank)");
    }
    return s;
  }
  return NcclCommunicatorImpl::adopt(comm, o, device, who);
}

Result<std::unique_ptr<Communicator>> createNcclCommunicator(BootstrapStore& store,
                                                             const CommunicatorOptions& options) {
  auto comm = NcclCommunicator::create(store, options);
  if (!comm.ok()) return comm.status();
  return std::unique_ptr<Communicator>(std::move(*comm));
}

NcclCommunicator* asNccl(Communicator& comm) { return dynamic_cast<NcclCommunicator*>(&comm); }

}  // namespace rally::collectives
