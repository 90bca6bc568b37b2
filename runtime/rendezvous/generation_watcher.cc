#include "runtime/rendezvous/generation_watcher.h"

#include "runtime/rendezvous/grpc_status.h"
#include "runtime/rendezvous/internal/keep_reactor.h"

namespace rally::rendezvous {

namespace v1 = rally::v1;

class GenerationWatcher::Reactor final : public grpc::ClientReadReactor<v1::GenerationEvent> {
 public:
  explicit Reactor(GenerationWatcher* owner) : owner_(owner) {}

  void begin() {
    owner_->conn_->prepareContext(&ctx_, Milliseconds(0));
    ctx_.set_deadline(std::chrono::system_clock::time_point::max());
    stub_ = owner_->conn_->stub();  // the endpoint of this moment, for the stream's life
    stub_->async()->WatchGeneration(&ctx_, &request_, this);
    StartRead(&event_);
    StartCall();
  }
  void cancel() { ctx_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    std::uint64_t seen = owner_->latest_.load();
    while (event_.generation() > seen &&
           !owner_->latest_.compare_exchange_weak(seen, event_.generation())) {
    }
    if (owner_->on_event_) {
      owner_->on_event_(event_);
    } else {
      owner_->inbox_.push(event_);
    }
    StartRead(&event_);
  }
  void OnDone(const grpc::Status& s) override {
    const Status end = fromGrpcStatus(s, "the generation watch");
    if (owner_->on_end_)
      owner_->on_end_(end.ok() ? unavailable("the generation watch ended") : end);
    owner_->inbox_.end(end);
    owner_->done_.signal();  // last: the owner may be destroyed from here on
  }

 private:
  std::shared_ptr<v1::Coordinator::Stub> stub_;
  GenerationWatcher* const owner_;
  grpc::ClientContext ctx_;
  v1::WatchGenerationRequest request_;
  v1::GenerationEvent event_;
};

GenerationWatcher::GenerationWatcher(std::shared_ptr<CoordinatorConnection> conn, OnEvent on_event,
                                     OnEnd on_end)
    : conn_(std::move(conn)), on_event_(std::move(on_event)), on_end_(std::move(on_end)) {}

Result<std::unique_ptr<GenerationWatcher>> GenerationWatcher::start(
    std::shared_ptr<CoordinatorConnection> conn, OnEvent on_event, OnEnd on_end) {
  std::unique_ptr<GenerationWatcher> w(
      new GenerationWatcher(std::move(conn), std::move(on_event), std::move(on_end)));
  w->reactor_ = std::make_unique<Reactor>(w.get());
  w->reactor_->begin();
  return w;
}

GenerationWatcher::~GenerationWatcher() {
  if (!inbox_.ended()) reactor_->cancel();
  while (!done_.waitFor(Milliseconds(1000))) reactor_->cancel();
  // Kept, not destroyed: its ClientContext's destruction has, rarely, aborted the process
  // (internal/keep_reactor.h).
  internal::keepReactor(std::move(reactor_));
}

Result<v1::GenerationEvent> GenerationWatcher::next(Milliseconds timeout) {
  return inbox_.next(timeout, "generation watch");
}

Result<v1::GenerationEvent> GenerationWatcher::waitFor(
    const std::function<bool(const v1::GenerationEvent&)>& pred, Milliseconds timeout) {
  return inbox_.waitFor(pred, timeout, "generation watch");
}

}  // namespace rally::rendezvous
