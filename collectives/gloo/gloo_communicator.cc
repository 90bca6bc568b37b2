#include "collectives/gloo/gloo_communicator.h"

#include <fmt/format.h>
#include <gloo/allgather.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <signal.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "collectives/gloo/tcp_collectives.h"
#include "collectives/internal/call_check.h"
#include "collectives/internal/completable_work.h"
#include "collectives/internal/reduce.h"
#include "collectives/internal/shm_group.h"
#include "kernels/base/logging.h"

namespace rally::collectives {
namespace {

// Gloo's rendezvous talks to a store that throws; ours returns Status.
class StoreAdapter : public gloo::rendezvous::Store {
 public:
  StoreAdapter(BootstrapStore& store, std::string prefix, Milliseconds timeout)
      : store_(store), prefix_(std::move(prefix)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    check(store_.set(prefix_ + key, std::string(data.begin(), data.end())));
  }
  std::vector<char> get(const std::string& key) override {
    wait({key}, timeout_);
    auto v = store_.get(prefix_ + key);
    check(v.status());
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& t) override {
    std::vector<std::string> full;
    for (const auto& k : keys) full.push_back(prefix_ + k);
    check(store_.wait(full, t.count() > 0 ? Milliseconds(t.count()) : timeout_));
  }

 private:
  static void check(const Status& s) {
    if (!s.ok()) throw gloo::IoException(s.toString());
  }
  BootstrapStore& store_;
  std::string prefix_;
  Milliseconds timeout_;
};

using WorkImpl = internal::CompletableWork;

using internal::CallDesc;
using namespace internal;  // the CallKind values

// Thrown inside an operation when the ranks disagree about it.
struct CallMismatch : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A failed shared-memory step inside an operation: its status, to be prefixed with the
// operation and the rank.
struct OpFailed : std::runtime_error {
  explicit OpFailed(Status s) : std::runtime_error(s.message()), status(std::move(s)) {}
  Status status;
};
void throwIfError(Status s) {
  if (!s.ok()) throw OpFailed(std::move(s));
}

// Slots for send/recv, apart from those of the collectives (tcp_collectives.cc) and of Gloo's
// own algorithms (used while connecting).
constexpr std::uint64_t kP2pSlotBase = 0x5241ull << 48;

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(BootstrapStore& store, const CommunicatorOptions& o,
                   std::shared_ptr<gloo::rendezvous::Context> ctx,
                   std::unique_ptr<internal::ShmGroup> shm)
      : store_(store),
        options_(o),
        context_(std::move(ctx)),
        shm_(std::move(shm)),
        tcp_(context_, o.op_timeout),
        sent_(o.size, 0),
        received_(o.size, 0) {
    worker_ = std::thread([this] { run(); });
    p2p_waiter_ = std::thread([this] { waitP2p(); });
  }
  ~GlooCommunicator() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
    p2p_cv_.notify_all();
    p2p_waiter_.join();
  }

  int rank() const override { return options_.rank; }
  int size() const override { return options_.size; }
  std::uint64_t generation() const override { return options_.generation; }
  std::string_view backend() const override { return "gloo"; }
  Capabilities capabilities() const override {
    return {.host_memory = true, .can_shrink = true, .elastic = true};
  }
  // Whether collectives go through shared memory (every rank on this host) rather than TCP.
  bool usesSharedMemory() const { return shm_ != nullptr; }
  bool aborted() const override { return aborted_.load(); }

  std::shared_ptr<Work> allreduce(void* data, size_t count, DataType type, ReduceOp op) override {
    return submit(
        fmt::format("allreduce({} x {}, {})", count, dataTypeName(type), reduceOpName(op)),
        [=, this] {
          checkCall({kAllreduce, static_cast<std::uint32_t>(type), count, -1,
                     static_cast<std::int32_t>(op)});
          allreduceNow(data, count, type, op);
        });
  }

  std::shared_ptr<Work> reduceScatter(const void* in, void* out, size_t count, DataType type,
                                      ReduceOp op) override {
    return submit(
        fmt::format("reduce_scatter({} x {}, {})", count, dataTypeName(type), reduceOpName(op)),
        [=, this] {
          checkCall({kReduceScatter, static_cast<std::uint32_t>(type), count, -1,
                     static_cast<std::int32_t>(op)});
          if (shm_) {
            throwIfError(shm_->reduceScatter(in, out, count, type, op));
          } else {
            tcp_.reduceScatter(in, out, count, type, op);
          }
        });
  }

  std::shared_ptr<Work> allgather(const void* in, void* out, size_t count, DataType type) override {
    return submit(fmt::format("allgather({} x {})", count, dataTypeName(type)), [=, this] {
      checkCall({kAllgather, static_cast<std::uint32_t>(type), count, -1, -1});
      const size_t bytes = count * dataTypeSize(type);
      if (bytes == 0) return;
      if (shm_) return throwIfError(shm_->allgather(in, out, bytes));
      tcp_.allgather(in, out, bytes);
    });
  }

  std::shared_ptr<Work> broadcast(void* data, size_t count, DataType type, int root) override {
    if (root < 0 || root >= size()) {
      return failed(invalidArgument(
          fmt::format("broadcast root {} is not a rank of {} ({})", root, size(), where())));
    }
    return submit(fmt::format("broadcast({} x {}, root {})", count, dataTypeName(type), root),
                  [=, this] {
                    checkCall({kBroadcast, static_cast<std::uint32_t>(type), count, root, -1});
                    const size_t bytes = count * dataTypeSize(type);
                    if (bytes == 0 || size() == 1) return;
                    if (shm_) return throwIfError(shm_->broadcast(data, bytes, root));
                    tcp_.broadcast(data, bytes, root);
                  });
  }

  std::shared_ptr<Work> alltoall(const void* in, void* out, size_t count, DataType type) override {
    return submit(fmt::format("alltoall({} x {})", count, dataTypeName(type)), [=, this] {
      checkCall({kAlltoall, static_cast<std::uint32_t>(type), count, -1, -1});
      const size_t bytes = count * dataTypeSize(type) * size();
      if (bytes == 0) return;
      if (shm_) return throwIfError(shm_->alltoall(in, out, bytes / size()));
      tcp_.alltoall(in, out, bytes / size());
    });
  }

  std::shared_ptr<Work> send(const void* data, size_t count, DataType type, int peer) override {
    return pointToPoint(const_cast<void*>(data), count, type, peer, /*is_send=*/true);
  }

  std::shared_ptr<Work> recv(void* data, size_t count, DataType type, int peer) override {
    return pointToPoint(data, count, type, peer, /*is_send=*/false);
  }

  std::shared_ptr<Work> barrier() override {
    return submit("barrier", [this] {
      checkCall({kBarrier, 0, 0, -1, -1});
      if (size() == 1) return;
      if (shm_) return throwIfError(shm_->barrier());
      tcp_.barrier();
    });
  }

  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    auto result =
        std::make_shared<Result<std::unique_ptr<Communicator>>>(internalError("split did not run"));
    const std::uint64_t seq = splits_++;
    auto work = submit(fmt::format("split(color {}, key {})", color, key), [=, this] {
      checkCall({kSplit, 0, 0, -1, -1});
      // Every rank's (color, key), by rank.
      std::vector<std::int32_t> mine = {color, key};
      std::vector<std::int32_t> all(2 * static_cast<size_t>(size()));
      if (shm_) {
        throwIfError(shm_->allgather(mine.data(), all.data(), sizeof(std::int32_t) * mine.size()));
      } else {
        tcp_.allgather(mine.data(), all.data(), sizeof(std::int32_t) * mine.size());
      }
      std::vector<std::pair<std::int32_t, int>> members;  // (key, rank) of my color
      for (int r = 0; r < size(); ++r) {
        if (all[2 * r] == color) members.emplace_back(all[2 * r + 1], r);
      }
      std::sort(members.begin(), members.end());
      CommunicatorOptions sub = options_;
      sub.name = fmt::format("{}/split{}/color{}", options_.name, seq, color);
      sub.size = static_cast<int>(members.size());
      for (size_t i = 0; i < members.size(); ++i) {
        if (members[i].second == rank()) sub.rank = static_cast<int>(i);
      }
      *result = createGlooCommunicator(store_, sub);
    });
    RALLY_RETURN_IF_ERROR(work->wait(options_.connect_timeout + options_.op_timeout));
    return std::move(*result);
  }

  Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>& excluded) override {
    std::vector<bool> out(size(), false);
    for (int r : excluded) {
      if (r < 0 || r >= size()) {
        return invalidArgument(
            fmt::format("shrink: rank {} is not a rank of {} ({})", r, size(), where()));
      }
      if (r == rank()) {
        return invalidArgument(fmt::format(
            "shrink: rank {} cannot exclude itself; only the surviving ranks call shrink ({})", r,
            where()));
      }
      out[r] = true;
    }
    CommunicatorOptions sub = options_;
    sub.name = fmt::format("{}/shrink{}", options_.name, shrinks_++);
    sub.size = static_cast<int>(std::count(out.begin(), out.end(), false));
    sub.rank = static_cast<int>(std::count(out.begin(), out.begin() + rank(), false));
    // Bootstraps afresh through the store (also after abort(): the old connections play no part).
    return createGlooCommunicator(store_, sub);
  }

  // Gloo reads host buffers when an operation runs: nothing enqueued on a device to wait for.
  Status waitForEvent(void*) override { return okStatus(); }

  void abort(const std::string& reason) override {
    {
      std::lock_guard lock(mu_);
      if (aborted_) return;
      abort_reason_ = reason;
      aborted_ = true;
    }
    {
      std::lock_guard lock(p2p_mu_);
      if (waiting_p2p_ != nullptr) {
        waiting_p2p_->abortWaitSend();
        waiting_p2p_->abortWaitRecv();
      }
    }
    if (shm_) shm_->abort();  // wakes this rank's waiter; the peers see PeerLost
    tcp_.abort();             // interrupts a wait for a peer at once
    // Closing the connections makes an operation blocked on a peer fail at once.
    for (int i = 0; i < size(); ++i) {
      if (i == rank()) continue;
      try {
        auto& pair = context_->getPair(i);
        if (pair) pair->close();
      } catch (const std::exception&) {
        // already closed or broken: nothing left to wake
      }
    }
    cv_.notify_all();
  }

 private:
  struct Task {
    std::function<void()> fn;
    std::shared_ptr<WorkImpl> work;
    bool completes_elsewhere = false;  // posted send/recv: the p2p waiter completes it
  };
  struct PostedP2p {
    std::unique_ptr<gloo::transport::UnboundBuffer> buf;
    bool is_send;
    std::shared_ptr<WorkImpl> work;
  };

  std::shared_ptr<Work> pointToPoint(void* data, size_t count, DataType type, int peer,
                                     bool is_send) {
    const char* verb = is_send ? "send" : "recv";
    const char* dir = is_send ? "to" : "from";
    if (peer < 0 || peer >= size() || peer == rank()) {
      return failed(invalidArgument(fmt::format("{} {} rank {}: not another rank of {} ({})", verb,
                                                dir, peer, size(), where())));
    }
    return submitP2p(
        fmt::format("{}({} x {} {} rank {})", verb, count, dataTypeName(type), dir, peer),
        [=, this] {
          // The n-th send from a to b matches the n-th recv by b from a.
          auto& counter = is_send ? sent_[peer] : received_[peer];
          const std::uint64_t slot = kP2pSlotBase + counter++;
          auto buf = context_->createUnboundBuffer(data, count * dataTypeSize(type));
          if (is_send) {
            buf->send(peer, slot);
          } else {
            buf->recv(peer, slot);
          }
          return buf;
        },
        is_send);
  }

  // Send and recv are posted in issue order by the worker without waiting (a send completes only
  // when the peer posts its recv, which may come after the peer's own send), and completed here.
  std::shared_ptr<Work> submitP2p(
      std::string what, std::function<std::unique_ptr<gloo::transport::UnboundBuffer>()> post,
      bool is_send) {
    auto w = std::make_shared<WorkImpl>(std::move(what));
    return enqueue(
        w,
        [this, post = std::move(post), is_send, w] {
          auto buf = post();
          {
            std::lock_guard p2p_lock(p2p_mu_);
            p2p_queue_.push_back(PostedP2p{std::move(buf), is_send, w});
          }
          p2p_cv_.notify_all();
        },
        /*completes_elsewhere=*/true);
  }

  void waitP2p() {
    for (;;) {
      PostedP2p p;
      {
        std::unique_lock lock(p2p_mu_);
        p2p_cv_.wait(lock, [&] { return !p2p_queue_.empty() || worker_done_.load(); });
        if (p2p_queue_.empty()) return;
        p = std::move(p2p_queue_.front());
        p2p_queue_.pop_front();
        waiting_p2p_ = p.buf.get();
      }
      bool ok = false;
      std::string error;
      if (!aborted_) {
        try {
          ok = p.is_send ? p.buf->waitSend(options_.op_timeout)
                         : p.buf->waitRecv(options_.op_timeout);
          if (!ok) error = "Timed out waiting for the peer";
        } catch (const std::exception& e) {
          error = e.what();
        }
      }
      {
        std::lock_guard lock(p2p_mu_);
        waiting_p2p_ = nullptr;
      }
      const std::string& what = p.work->what();
      if (aborted_) {
        p.work->complete(abortedStatus(what));
      } else if (ok) {
        p.work->complete(okStatus());
      } else if (error.find("Timed out") != std::string::npos) {
        p.work->complete(timeoutError(fmt::format("{} on {}: no answer within {}", what, where(),
                                                  formatDuration(options_.op_timeout))));
      } else {
        p.work->complete(
            peerLost(fmt::format("{} on {}: a peer is gone: {}", what, where(), error)));
      }
    }
  }

  std::string where() const {
    return fmt::format("rank {} of {}, generation {}, communicator '{}'", rank(), size(),
                       generation(), options_.name);
  }

  Status abortedStatus(const std::string& what) {
    std::lock_guard lock(mu_);
    return ::rally::aborted(
        fmt::format("{} on {}: the communicator was aborted: {}", what, where(), abort_reason_));
  }

  std::shared_ptr<Work> failed(Status s) {
    auto w = std::make_shared<WorkImpl>();
    w->complete(std::move(s));
    return w;
  }

  std::shared_ptr<Work> submit(std::string what, std::function<void()> fn) {
    auto w = std::make_shared<WorkImpl>(std::move(what));
    return enqueue(w, std::move(fn), /*completes_elsewhere=*/false);
  }

  // Queues `fn` for the worker, or fails `w` at once if the communicator was aborted.
  std::shared_ptr<Work> enqueue(const std::shared_ptr<WorkImpl>& w, std::function<void()> fn,
                                bool completes_elsewhere) {
    if (aborted_) {
      w->complete(abortedStatus(w->what()));
      return w;
    }
    {
      std::lock_guard lock(mu_);
      queue_.push_back(Task{std::move(fn), w, completes_elsewhere});
    }
    cv_.notify_all();
    return w;
  }

  // Exchanges what every rank is about to do and throws CallMismatch, naming them, if they differ.
  void checkCall(const CallDesc& mine) {
    if (!options_.check_calls || size() == 1) return;
    std::vector<CallDesc> all(static_cast<size_t>(size()));
    if (shm_) {
      throwIfError(shm_->exchange(&mine, sizeof(CallDesc), all.data()));
    } else {
      tcp_.allgather(&mine, all.data(), sizeof(CallDesc));
    }
    if (std::string problem = internal::mismatch(mine, all); !problem.empty()) {
      throw CallMismatch(problem);
    }
  }

  void allreduceNow(void* data, size_t count, DataType type, ReduceOp op) {
    if (count == 0) return;
    if (shm_) return throwIfError(shm_->allreduce(data, count, type, op));
    tcp_.allreduce(data, count, type, op);
  }

  void run() {
    for (;;) {
      Task task;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) {
          worker_done_ = true;
          lock.unlock();
          std::lock_guard p2p_lock(p2p_mu_);  // so that the waiter sees worker_done_
          p2p_cv_.notify_all();
          return;
        }
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      const std::string& what = task.work->what();
      if (aborted_) {
        task.work->complete(abortedStatus(what));
        continue;
      }
      task.work->markStarted();
      try {
        task.fn();
        if (!task.completes_elsewhere) task.work->complete(okStatus());
      } catch (const gloo::IoException& e) {
        const std::string msg = e.what();
        if (aborted_) {
          task.work->complete(abortedStatus(what));
        } else if (msg.find("Timed out") != std::string::npos) {
          task.work->complete(
              timeoutError(fmt::format("{} on {}: no peer answered within {}: {}", what, where(),
                                       formatDuration(options_.op_timeout), msg)));
        } else {
          task.work->complete(
              peerLost(fmt::format("{} on {}: a peer is gone: {}", what, where(), msg)));
        }
      } catch (const OpFailed& e) {
        task.work->complete(aborted_
                                ? abortedStatus(what)
                                : Status(e.status.code(), fmt::format("{} on {}: {}", what, where(),
                                                                      e.status.message())));
      } catch (const CallMismatch& e) {
        task.work->complete(invalidArgument(fmt::format("{} on {}: {}", what, where(), e.what())));
      } catch (const std::exception& e) {
        task.work->complete(
            aborted_ ? abortedStatus(what)
                     : internalError(fmt::format("{} on {}: {}", what, where(), e.what())));
      }
    }
  }

  BootstrapStore& store_;  // for split(); outlives the communicator (see the header)
  const CommunicatorOptions options_;
  std::atomic<std::uint64_t> splits_{0};
  std::atomic<std::uint64_t> shrinks_{0};
  std::shared_ptr<gloo::rendezvous::Context> context_;
  std::unique_ptr<internal::ShmGroup> shm_;  // every rank on this host: collectives go through it
  internal::TcpCollectives tcp_;             // otherwise these
  std::vector<std::uint64_t> sent_, received_;  // touched by the worker thread only
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::atomic<bool> aborted_{false};
  std::string abort_reason_;
  std::atomic<bool> worker_done_{false};  // the worker drained its queue and stopped
  std::mutex p2p_mu_;
  std::condition_variable p2p_cv_;
  std::deque<PostedP2p> p2p_queue_;
  gloo::transport::UnboundBuffer* waiting_p2p_ = nullptr;
  std::thread worker_;
  std::thread p2p_waiter_;
};

}  // namespace

namespace {

// A dead peer's socket must fail the write (EPIPE), not kill the survivor (see the header).
void ignoreSigpipeIfDefault() {
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL &&
      (current.sa_flags & SA_SIGINFO) == 0) {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    sigaction(SIGPIPE, &ignore, nullptr);
  }
}

// Per-rank slot size: large enough that a step's synchronisation is small next to its copies,
// small enough that the segment (2 x size slots) stays within 16 MiB of /dev/shm.
size_t shmSlotBytes(int size) {
  const size_t budget = 16u << 20;
  return std::clamp<size_t>(budget / (2 * static_cast<size_t>(size)), 64u << 10, 2u << 20);
}

// Collective over the connected context: rank 0 creates a segment, the others try to open it,
// and all use it only if every rank could (otherwise TCP, and rank 0 says why).
std::unique_ptr<internal::ShmGroup> setUpSharedMemory(
    const std::shared_ptr<gloo::rendezvous::Context>& context, const CommunicatorOptions& o) {
  auto log = log::get("collectives");
  std::array<char, 128> name{};
  std::unique_ptr<internal::ShmGroup> group;
  std::string problem;
  if (o.rank == 0) {
    auto created = internal::ShmGroup::create(o.size, shmSlotBytes(o.size), o.op_timeout);
    if (created.ok()) {
      group = std::move(*created);
      std::snprintf(name.data(), name.size(), "%s", group->name().c_str());
    } else {
      problem = created.status().toString();
    }
  }
  gloo::BroadcastOptions bcast(context);
  bcast.setOutput(name.data(), name.size());
  bcast.setRoot(0);
  gloo::broadcast(bcast);
  if (o.rank != 0 && name[0] != '\0') {
    auto opened = internal::ShmGroup::open(name.data(), o.rank, o.size, o.op_timeout);
    if (opened.ok()) {
      group = std::move(*opened);
    } else {
      problem = opened.status().toString();
    }
  }
  std::uint8_t ok = group != nullptr;
  std::vector<std::uint8_t> all(static_cast<size_t>(o.size));
  gloo::AllgatherOptions gather(context);
  gather.setInput(&ok, 1);
  gather.setOutput(all.data(), all.size());
  gloo::allgather(gather);
  std::string without;
  for (int r = 0; r < o.size; ++r) {
    if (!all[r]) without += fmt::format("{}{}", without.empty() ? "" : ", ", r);
  }
  if (!without.empty()) {
    if (!problem.empty()) {
      log->info("communicator '{}' rank {}: no shared memory: {}", o.name, o.rank, problem);
    }
    if (o.rank == 0) {
      log->info(
          "communicator '{}' (generation {}): rank(s) {} cannot share memory with rank 0; "
          "collectives go over TCP",
          o.name, o.generation, without);
    }
    return nullptr;  // rank 0's segment is removed with its group
  }
  group->ready();  // every rank has opened it: the name can go
  return group;
}

}  // namespace

Result<std::unique_ptr<Communicator>> createGlooCommunicator(BootstrapStore& store,
                                                             const CommunicatorOptions& o) {
  ignoreSigpipeIfDefault();
  if (o.size < 1 || o.rank < 0 || o.rank >= o.size) {
    return invalidArgument(fmt::format(
        "gloo communicator: rank {} of size {} is not a rank (0 <= rank < size)", o.rank, o.size));
  }
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = o.address;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(o.rank, o.size);
    ctx->setTimeout(o.connect_timeout);
    StoreAdapter adapter(store, fmt::format("gloo/{}/{}/", o.generation, o.name),
                         o.connect_timeout);
    ctx->connectFullMesh(adapter, device);
    ctx->setTimeout(o.op_timeout);
    std::unique_ptr<internal::ShmGroup> shm;
    if (o.shared_memory && o.size > 1) shm = setUpSharedMemory(ctx, o);
    return std::unique_ptr<Communicator>(
        new GlooCommunicator(store, o, std::move(ctx), std::move(shm)));
  } catch (const std::exception& e) {
    return unavailable(
        fmt::format("gloo communicator '{}' (rank {} of {}, generation {}) could not connect: {}",
                    o.name, o.rank, o.size, o.generation, e.what()));
  }
}

bool usesSharedMemory(const Communicator& comm) {
  const auto* gloo = dynamic_cast<const GlooCommunicator*>(&comm);
  return gloo != nullptr && gloo->usesSharedMemory();
}

}  // namespace rally::collectives
