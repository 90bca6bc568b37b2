#include "runtime/rendezvous/agent_session.h"

#include <fmt/format.h>

#include <algorithm>
#include <deque>

#include "runtime/rendezvous/grpc_status.h"
#include "runtime/rendezvous/internal/keep_reactor.h"

namespace rally::rendezvous {

namespace v1 = rally::v1;

class AgentSession::Reactor final
    : public grpc::ClientBidiReactor<v1::AgentMessage, v1::CoordinatorMessage> {
 public:
  explicit Reactor(AgentSession* owner) : owner_(owner) {}

  void begin() {
    owner_->conn_->prepareContext(&ctx_, Milliseconds(0));
    // A session lives as long as the node: no deadline, only the token and wait-for-ready.
    ctx_.set_deadline(std::chrono::system_clock::time_point::max());
    stub_ = owner_->conn_->stub();  // the endpoint of this moment, for the stream's life
    stub_->async()->Session(&ctx_, this);
    StartRead(&in_);
    StartCall();
  }

  void write(v1::AgentMessage m) {
    std::unique_lock lock(mu_);
    if (done_ || writes_done_) return;
    queue_.push_back(std::move(m));
    if (writing_) return;
    writing_ = true;
    const v1::AgentMessage* next = &queue_.front();
    lock.unlock();
    StartWrite(next);
  }

  void writesDone() {
    std::unique_lock lock(mu_);
    if (done_ || writes_done_) return;
    writes_done_ = true;
    if (writing_) return;  // OnWriteDone will send it after the queue drains
    lock.unlock();
    StartWritesDone();
  }

  void cancel() { ctx_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream is ending; OnDone follows
    if (in_.has_welcome()) owner_->setInterval(in_.welcome().heartbeat_interval_ms());
    if (in_.has_shutdown() && in_.shutdown().handover()) handover_ = true;
    JobScopeReplica* replica = owner_->options_.replica.get();
    if (in_.has_job_scope()) {
      // Applied here, on the reader, so that the acknowledgement (which the coordinator's write
      // waits for) does not queue behind the agent's loop.
      const v1::JobScope& js = in_.job_scope();
      std::uint64_t revision = js.revision();
      if (replica != nullptr) revision = replica->apply(js);
      if (js.full()) snapshot_seen_ = true;
      if (js.release()) snapshot_seen_ = false;
      v1::AgentMessage ack;
      ack.mutable_job_scope_ack()->set_revision(revision);
      write(std::move(ack));
      StartRead(&in_);
      return;
    }
    if (in_.has_round_formed() && !snapshot_seen_ && replica != nullptr) replica->clear();
    if (owner_->options_.on_message) {
      owner_->options_.on_message(in_);
    } else {
      owner_->inbox_.push(in_);
    }
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock lock(mu_);
    if (!queue_.empty()) queue_.pop_front();
    if (!ok) queue_.clear();
    if (!queue_.empty()) {
      const v1::AgentMessage* next = &queue_.front();
      lock.unlock();
      StartWrite(next);
      return;
    }
    writing_ = false;
    const bool send_done = writes_done_ && ok;
    lock.unlock();
    if (send_done) StartWritesDone();
  }

  void OnDone(const grpc::Status& s) override {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    // Lost: the stream broke under us, or the coordinator said it is going and handed over.
    owner_->lost_coordinator_ =
        handover_ || (s.error_code() == grpc::StatusCode::UNAVAILABLE && !isFinal(s));
    const Status status = fromGrpcStatus(s, "the coordinator session");
    owner_->inbox_.end(status);
    if (owner_->options_.on_end) owner_->options_.on_end(status, owner_->lost_coordinator_.load());
    owner_->hb_cv_.notify_all();
    owner_->done_.signal();  // last: the owner may be destroyed from here on
  }

 private:
  AgentSession* const owner_;
  std::shared_ptr<v1::Coordinator::Stub> stub_;
  grpc::ClientContext ctx_;
  v1::CoordinatorMessage in_;
  std::mutex mu_;
  std::deque<v1::AgentMessage> queue_;
  bool writing_ = false;
  bool writes_done_ = false;
  bool done_ = false;
  bool handover_ = false;       // read on gRPC's reader callbacks, which run one at a time
  bool snapshot_seen_ = false;  // the same: a full JobScope came on this stream
};

AgentSession::AgentSession(std::shared_ptr<CoordinatorConnection> conn, JoinInfo join,
                           AgentSessionOptions options)
    : conn_(std::move(conn)), join_(std::move(join)), options_(std::move(options)) {}

Result<std::unique_ptr<AgentSession>> AgentSession::open(
    std::shared_ptr<CoordinatorConnection> conn, JoinInfo join, AgentSessionOptions options) {
  if (join.node_id.empty()) return invalidArgument("AgentSession needs a node id");
  std::unique_ptr<AgentSession> s(
      new AgentSession(std::move(conn), std::move(join), std::move(options)));
  // The copy to send after the Join (or none), taken before the stream starts: a round that this
  // Join completes may bring a new snapshot at once.
  std::vector<v1::JobScope> upload;
  if (JobScopeReplica* replica = s->options_.replica.get(); replica != nullptr) {
    if (s->join_.last_generation == 0) {
      replica->clear();  // a new node: what it held belongs to another round
    } else {
      upload = replica->chunks(jobScopeChunkBytes(s->conn_->options().max_message_bytes));
    }
  }
  s->reactor_ = std::make_unique<Reactor>(s.get());
  s->reactor_->begin();
  v1::AgentMessage m;
  auto* j = m.mutable_join();
  j->set_node_id(s->join_.node_id);
  j->set_job_id(s->join_.job_id);
  j->set_min_nodes(s->join_.min_nodes);
  j->set_max_nodes(s->join_.max_nodes);
  j->set_local_world_size(s->join_.local_world_size);
  j->set_address(s->join_.address);
  j->set_last_generation(s->join_.last_generation);
  j->set_last_node_rank(s->join_.last_node_rank);
  j->set_last_num_nodes(s->join_.last_num_nodes);
  j->set_standby_endpoint(s->join_.standby_endpoint);
  j->set_keeps_job_scope(s->options_.replica != nullptr);
  s->send(std::move(m));
  for (v1::JobScope& chunk : upload) {
    v1::AgentMessage u;
    *u.mutable_job_scope() = std::move(chunk);
    s->send(std::move(u));
  }
  if (s->options_.auto_heartbeat) {
    s->heartbeat_thread_ = std::thread([p = s.get()] { p->heartbeatLoop(); });
  }
  return s;
}

AgentSession::~AgentSession() {
  {
    std::lock_guard lock(hb_mu_);
    stopping_ = true;
  }
  hb_cv_.notify_all();
  if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
  if (!inbox_.ended()) reactor_->cancel();
  // gRPC calls OnDone exactly once; the reactor must outlive it.
  while (!done_.waitFor(Milliseconds(1000))) reactor_->cancel();
  // Kept, not destroyed: its ClientContext's destruction has, rarely, aborted the process
  // (internal/keep_reactor.h).
  internal::keepReactor(std::move(reactor_));
}

void AgentSession::setInterval(std::uint64_t ms) {
  {
    std::lock_guard lock(hb_mu_);
    heartbeat_interval_ = Milliseconds(std::max<std::uint64_t>(ms, 1));
  }
  hb_cv_.notify_all();
}

void AgentSession::heartbeatLoop() {
  std::unique_lock lock(hb_mu_);
  while (!stopping_ && !inbox_.ended()) {
    // Heartbeat twice per interval: one late heartbeat must not cost a node its place.
    hb_cv_.wait_for(lock, heartbeat_interval_ / 2);
    if (stopping_ || inbox_.ended()) break;
    lock.unlock();
    heartbeat();
    lock.lock();
  }
}

void AgentSession::send(v1::AgentMessage message) { reactor_->write(std::move(message)); }

Result<v1::CoordinatorMessage> AgentSession::next(Milliseconds timeout) {
  return inbox_.next(timeout, fmt::format("node '{}' session", join_.node_id));
}

Result<v1::CoordinatorMessage> AgentSession::waitFor(
    const std::function<bool(const v1::CoordinatorMessage&)>& pred, Milliseconds timeout) {
  return inbox_.waitFor(pred, timeout, fmt::format("node '{}' session", join_.node_id));
}

void AgentSession::heartbeat() {
  v1::AgentMessage m;
  m.mutable_heartbeat();
  send(std::move(m));
}

void AgentSession::leave(const std::string& reason) {
  v1::AgentMessage m;
  m.mutable_leave()->set_reason(reason);
  send(std::move(m));
  reactor_->writesDone();
}

void AgentSession::requestReform(const std::string& reason) {
  v1::AgentMessage m;
  m.mutable_request_reform()->set_reason(reason);
  send(std::move(m));
}

void AgentSession::close(const std::string& reason) {
  v1::AgentMessage m;
  m.mutable_close()->set_reason(reason);
  send(std::move(m));
}

void AgentSession::cancel() { reactor_->cancel(); }

std::optional<Status> AgentSession::endStatus(Milliseconds timeout) const {
  inbox_.waitEnded(timeout);
  return inbox_.endStatus();
}

}  // namespace rally::rendezvous
