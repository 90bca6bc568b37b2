// The coordinator service's stream and call reactors (gRPC callback API). Private to the service.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "launcher/coordinator/coordinator_service.h"
#include "launcher/coordinator/internal/outbound_stream.h"

namespace rally::coordinator {

namespace v1 = rally::v1;
using internal::OutboundStream;

class CoordinatorService::SessionReactor final
    : public grpc::ServerBidiReactor<v1::AgentMessage, v1::CoordinatorMessage>,
      public OutboundStream<v1::CoordinatorMessage>,
      public std::enable_shared_from_this<SessionReactor> {
 public:
  explicit SessionReactor(CoordinatorService* service) : service_(service) {}

  void begin(const grpc::Status& admitted) {
    self_ = shared_from_this();
    if (!admitted.ok()) {
      finishAfterQueued(admitted);
      return;
    }
    std::lock_guard lock(read_mu_);
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      service_->onSessionEnded(self_, "lost: its stream broke");
      finishAfterQueued(grpc::Status::OK);
      return;
    }
    service_->onAgentMessage(self_, in_);
    std::lock_guard lock(read_mu_);
    if (!finish_called_) StartRead(&in_);
  }
  void OnWriteDone(bool ok) override { writeDone(ok); }
  void OnCancel() override {
    service_->onSessionEnded(self_, "lost: its stream was cancelled");
    finishAfterQueued(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }
  void OnDone() override {
    markDone();
    service_->onSessionEnded(self_, "lost: its stream closed");
    self_.reset();  // the last owner deletes the reactor
  }

  // Guarded by the service's lock.
  std::string node_id;
  bool rejoined = false;  // its Join had last_generation: it may send its copy of the job scope
  bool keeps = false;     // its Join said it keeps a copy of the job scope if named a holder
  bool holder = false;    // it holds a copy of the job scope
  bool lagging = false;   // a holder that missed an acknowledgement: writes do not wait for it
  std::uint64_t lagging_at = 0;  // the revision it missed: caught up when it acknowledges it
  std::uint64_t acked = 0;       // the newest job-scope revision it acknowledged

 protected:
  void startWrite(const v1::CoordinatorMessage* m) override { StartWrite(m); }
  void finish(const grpc::Status& status) override {
    std::lock_guard lock(read_mu_);
    finish_called_ = true;
    Finish(status);
  }

 private:
  CoordinatorService* const service_;
  std::shared_ptr<SessionReactor> self_;
  v1::AgentMessage in_;
  std::recursive_mutex read_mu_;  // gRPC may run a reaction inline from StartRead or Finish
  bool finish_called_ = false;
};

class CoordinatorService::WatchReactor final : public grpc::ServerWriteReactor<v1::GenerationEvent>,
                                               public OutboundStream<v1::GenerationEvent>,
                                               public std::enable_shared_from_this<WatchReactor> {
 public:
  explicit WatchReactor(CoordinatorService* service) : service_(service) {}
  void begin() { self_ = shared_from_this(); }
  void OnWriteDone(bool ok) override { writeDone(ok); }
  void OnCancel() override {
    finishAfterQueued(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }
  void OnDone() override {
    markDone();
    service_->onWatchEnded(this);
    self_.reset();
  }

 protected:
  void startWrite(const v1::GenerationEvent* m) override { StartWrite(m); }
  void finish(const grpc::Status& status) override { Finish(status); }

 private:
  CoordinatorService* const service_;
  std::shared_ptr<WatchReactor> self_;
};

class CoordinatorService::WaitReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit WaitReactor(CoordinatorService* service) : service_(service) {}
  void OnCancel() override {
    service_->runLocked([&] {
      if (waiter_ != 0) {
        service_->kv_.cancelWaiter(
            waiter_, aborted("the client cancelled the wait (its deadline passed or it exited)"));
      }
    });
  }
  void OnDone() override { delete this; }
  KvStore::WaiterId waiter_ = 0;  // guarded by the service's lock

 private:
  CoordinatorService* const service_;
};

}  // namespace rally::coordinator
