// An ordered, non-blocking outgoing message queue for a gRPC callback-API stream reactor.
//
// gRPC allows one outstanding write per stream. Messages are enqueued in order (under the caller's
// lock, so that every stream sees events in the order the coordinator produced them) and written
// one at a time; kick() starts the next write and must be called without the caller's lock held,
// since gRPC may run reactions inline. finishAfterQueued() ends the stream once what is queued is
// written.
//
// Coalescing: a message enqueued with a non-zero key replaces every unsent message with the same
// key. The coordinator keys round and generation messages, so a slow stream receives the newest
// state rather than a backlog of superseded rounds, and a burst of failures costs each stream at
// most one write in flight plus one pending.
//
// Lifetime: the owning reactor keeps itself alive through `self_` until gRPC calls OnDone, and
// other holders keep shared_ptrs; after OnDone, enqueue and kick do nothing.
#pragma once

#include <grpcpp/support/status.h>

#include <list>
#include <memory>
#include <mutex>
#include <optional>

namespace rally::coordinator::internal {

template <typename Msg>
class OutboundStream {
 public:
  virtual ~OutboundStream() = default;

  void enqueue(Msg message, int coalesce_key = 0) {
    std::lock_guard lock(mu_);
    if (done_ || finish_status_) return;
    if (coalesce_key != 0) {
      auto it = queue_.begin();
      if (writing_ && it != queue_.end()) ++it;  // the message being written stays
      while (it != queue_.end()) {
        it = it->key == coalesce_key ? queue_.erase(it) : std::next(it);
      }
    }
    queue_.push_back(Entry{coalesce_key, std::move(message)});
  }

  void kick() {
    std::unique_lock lock(mu_);
    if (done_ || finished_ || writing_) return;
    if (!queue_.empty()) {
      writing_ = true;
      const Msg* next = &queue_.front().message;
      lock.unlock();
      startWrite(next);
    } else if (finish_status_) {
      finished_ = true;
      const grpc::Status status = *finish_status_;
      lock.unlock();
      finish(status);
    }
  }

  void finishAfterQueued(grpc::Status status) {
    {
      std::lock_guard lock(mu_);
      if (!finish_status_) finish_status_ = std::move(status);
    }
    kick();
  }

 protected:
  void writeDone(bool ok) {
    {
      std::lock_guard lock(mu_);
      writing_ = false;
      if (!queue_.empty()) queue_.pop_front();
      if (!ok) {
        queue_.clear();
        if (!finish_status_)
          finish_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "peer gone");
      }
    }
    kick();
  }

  void markDone() {
    std::lock_guard lock(mu_);
    done_ = true;
    queue_.clear();
  }

  virtual void startWrite(const Msg* message) = 0;
  virtual void finish(const grpc::Status& status) = 0;

 private:
  struct Entry {
    int key;
    Msg message;
  };
  std::mutex mu_;
  std::list<Entry> queue_;  // a list: erasing coalesced entries keeps the written one in place
  bool writing_ = false;
  bool finished_ = false;
  bool done_ = false;
  std::optional<grpc::Status> finish_status_;
};

}  // namespace rally::coordinator::internal
