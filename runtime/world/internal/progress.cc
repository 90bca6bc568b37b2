#include "runtime/world/internal/progress.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace rally::internal {
namespace {

using collectives::Communicator;
using collectives::Work;

class TrackedWork final : public Work {
 public:
  TrackedWork(std::shared_ptr<Work> inner, std::shared_ptr<ProgressTracker> t)
      : inner_(std::move(inner)), tracker_(std::move(t)) {}
  Status wait(Milliseconds timeout) override {
    tracker_->waiting.fetch_add(1);
    Status s = inner_->wait(timeout);
    tracker_->waiting.fetch_sub(1);
    return s;
  }
  bool done() const override { return inner_->done(); }

 private:
  std::shared_ptr<Work> inner_;
  std::shared_ptr<ProgressTracker> tracker_;
};

class TrackedCommunicator final : public Communicator {
 public:
  TrackedCommunicator(std::unique_ptr<Communicator> inner, std::shared_ptr<ProgressTracker> t)
      : inner_(std::move(inner)), tracker_(std::move(t)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::uint64_t generation() const override { return inner_->generation(); }
  std::string_view backend() const override { return inner_->backend(); }
  collectives::Capabilities capabilities() const override { return inner_->capabilities(); }
  std::shared_ptr<Work> allreduce(void* data, size_t count, collectives::DataType type,
                                  collectives::ReduceOp op) override {
    return wrap(inner_->allreduce(data, count, type, op));
  }
  std::shared_ptr<Work> reduceScatter(const void* in, void* out, size_t count,
                                      collectives::DataType type,
                                      collectives::ReduceOp op) override {
    return wrap(inner_->reduceScatter(in, out, count, type, op));
  }
  std::shared_ptr<Work> allgather(const void* in, void* out, size_t count,
                                  collectives::DataType type) override {
    return wrap(inner_->allgather(in, out, count, type));
  }
  std::shared_ptr<Work> broadcast(void* data, size_t count, collectives::DataType type,
                                  int root) override {
    return wrap(inner_->broadcast(data, count, type, root));
  }
  std::shared_ptr<Work> alltoall(const void* in, void* out, size_t count,
                                 collectives::DataType type) override {
    return wrap(inner_->alltoall(in, out, count, type));
  }
  std::shared_ptr<Work> send(const void* data, size_t count, collectives::DataType type,
                             int peer) override {
    return wrap(inner_->send(data, count, type, peer));
  }
  std::shared_ptr<Work> recv(void* data, size_t count, collectives::DataType type,
                             int peer) override {
    return wrap(inner_->recv(data, count, type, peer));
  }
  std::shared_ptr<Work> barrier() override { return wrap(inner_->barrier()); }
  Status waitForEvent(void* event) override { return inner_->waitForEvent(event); }
  void abort(const std::string& reason) override { inner_->abort(reason); }
  bool aborted() const override { return inner_->aborted(); }
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    tracker_->waiting.fetch_add(1);  // split is collective: it waits for the others
    auto sub = inner_->split(color, key);
    tracker_->waiting.fetch_sub(1);
    if (!sub.ok()) return sub.status();
    return trackWaits(std::move(*sub), tracker_);
  }
  Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>& excluded) override {
    tracker_->waiting.fetch_add(1);
    auto sub = inner_->shrink(excluded);
    tracker_->waiting.fetch_sub(1);
    if (!sub.ok()) return sub.status();
    return trackWaits(std::move(*sub), tracker_);
  }

 private:
  std::shared_ptr<Work> wrap(std::shared_ptr<Work> w) {
    return std::make_shared<TrackedWork>(std::move(w), tracker_);
  }
  std::unique_ptr<Communicator> inner_;
  std::shared_ptr<ProgressTracker> tracker_;
};

// An abstract Unix socket address ("@name" or "name": the kernel's namespace, no file).
socklen_t abstractAddress(const std::string& name, sockaddr_un* a) {
  std::memset(a, 0, sizeof(*a));
  a->sun_family = AF_UNIX;
  const std::string n = !name.empty() && name[0] == '@' ? name.substr(1) : name;
  const size_t len = std::min(n.size(), sizeof(a->sun_path) - 1);
  std::memcpy(a->sun_path + 1, n.data(), len);
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + len);
}

}  // namespace

std::unique_ptr<Communicator> trackWaits(std::unique_ptr<Communicator> inner,
                                         std::shared_ptr<ProgressTracker> tracker) {
  return std::make_unique<TrackedCommunicator>(std::move(inner), std::move(tracker));
}

Result<std::unique_ptr<ProgressReporter>> ProgressReporter::start(
    const std::string& socket_name, Milliseconds interval,
    std::shared_ptr<ProgressTracker> tracker) {
  std::unique_ptr<ProgressReporter> r(new ProgressReporter());
  r->fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (r->fd_ < 0) return errnoStatus("socket(AF_UNIX, SOCK_DGRAM)", errno);
  sockaddr_un a{};
  const socklen_t len = abstractAddress(socket_name, &a);
  if (::connect(r->fd_, reinterpret_cast<sockaddr*>(&a), len) != 0) {
    const int err = errno;
    ::close(r->fd_);
    r->fd_ = -1;
    return errnoStatus(fmt::format("connecting to the agent's progress socket '{}'", socket_name),
                       err);
  }
  r->interval_ = interval;
  r->tracker_ = std::move(tracker);
  ProgressReporter* self = r.get();
  r->thread_ = std::thread([self] { self->loop(); });
  return r;
}

ProgressReporter::~ProgressReporter() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) ::close(fd_);
}

void ProgressReporter::loop() {
  std::unique_lock lock(mu_);
  while (!stop_) {
    const std::string msg =
        fmt::format("{} {}\n", tracker_->step.load(), tracker_->waiting.load() > 0 ? 1 : 0);
    // Never blocks: a report that does not fit is dropped (the next one follows).
    (void)!::send(fd_, msg.data(), msg.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    cv_.wait_for(lock, interval_, [&] { return stop_; });
  }
}

}  // namespace rally::internal
