#include "runtime/rendezvous/coordinator_client.h"

#include <fmt/format.h>
#include <grpcpp/create_channel.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <thread>

#include "runtime/rendezvous/grpc_status.h"

namespace rally::rendezvous {

namespace v1 = rally::v1;

Result<ClientOptions> ClientOptions::fromTunables(const Tunables& t, std::string endpoint,
                                                  std::string token) {
  ClientOptions o;
  o.endpoint = std::move(endpoint);
  o.token = std::move(token);
  RALLY_ASSIGN_OR_RETURN(o.rpc_timeout, t.duration("rpc_timeout"));
  RALLY_ASSIGN_OR_RETURN(o.connect_timeout, t.duration("connect_timeout"));
  RALLY_ASSIGN_OR_RETURN(o.max_message_bytes, t.bytes("max_message_bytes"));
  RALLY_ASSIGN_OR_RETURN(const Milliseconds heartbeat, t.duration("heartbeat_interval"));
  o.keepalive = 2 * heartbeat;
  return o;
}

Result<std::string> readTokenFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return errnoStatus(fmt::format("cannot read the token file {}", path), errno);
  std::string line;
  std::getline(in, line);
  const auto b = line.find_first_not_of(" \t\r\n");
  const auto e = line.find_last_not_of(" \t\r\n");
  if (b == std::string::npos) {
    return invalidArgument(
        fmt::format("the token file {} is empty: it must hold the job token", path));
  }
  return line.substr(b, e - b + 1);
}

CoordinatorConnection::CoordinatorConnection(ClientOptions options)
    : options_(std::move(options)) {}

namespace {

Status checkEndpoint(const std::string& endpoint) {
  if (endpoint.empty() || endpoint.find(':') == std::string::npos) {
    return invalidArgument(fmt::format(
        "coordinator endpoint '{}' is not HOST:PORT (for example 127.0.0.1:29400)", endpoint));
  }
  return okStatus();
}

}  // namespace

Result<std::shared_ptr<CoordinatorConnection>> CoordinatorConnection::open(ClientOptions options) {
  RALLY_RETURN_IF_ERROR(checkEndpoint(options.endpoint));
  if (options.token.empty()) {
    return invalidArgument("no job token for the coordinator: give the coordinator's token file");
  }
  std::shared_ptr<CoordinatorConnection> conn(new CoordinatorConnection(std::move(options)));
  conn->target_ = conn->makeTarget(conn->options_.endpoint, conn->options_.keepalive);
  return conn;
}

std::shared_ptr<CoordinatorConnection::Target> CoordinatorConnection::makeTarget(
    const std::string& endpoint, Milliseconds keepalive) const {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  // Reconnect quickly after a coordinator restart: the default backoff grows to 120 s. The
  // backoff's minimum is also gRPC's minimum for one connection attempt (ClientOptions).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::clamp<std::int64_t>(options_.connect_attempt.count(), 1,
                                                        std::int64_t{1} << 30)));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  if (options_.dedicated_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (keepalive.count() > 0) {
    const int ms = static_cast<int>(std::min<std::int64_t>(keepalive.count(), 1 << 30));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, ms);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms);
    // A generation watch sends nothing after its request: keep pinging all the same.
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  auto t = std::make_shared<Target>();
  t->endpoint = endpoint;
  t->keepalive = keepalive;
  t->channel = grpc::CreateCustomChannel(endpoint, grpc::InsecureChannelCredentials(), args);
  t->stub = v1::Coordinator::NewStub(t->channel);
  return t;
}

std::shared_ptr<CoordinatorConnection::Target> CoordinatorConnection::target() const {
  std::lock_guard lock(mu_);
  return target_;
}

ClientOptions CoordinatorConnection::options() const {
  ClientOptions o = options_;
  const auto t = target();
  o.endpoint = t->endpoint;
  o.keepalive = t->keepalive;
  return o;
}

std::string CoordinatorConnection::endpoint() const { return target()->endpoint; }

std::shared_ptr<v1::Coordinator::Stub> CoordinatorConnection::stub() const {
  auto t = target();
  return std::shared_ptr<v1::Coordinator::Stub>(t, t->stub.get());
}

std::shared_ptr<grpc::Channel> CoordinatorConnection::channel() const { return target()->channel; }

Status CoordinatorConnection::retarget(const std::string& endpoint,
                                       std::optional<Milliseconds> keepalive) {
  RALLY_RETURN_IF_ERROR(checkEndpoint(endpoint)) << "retargeting the coordinator connection";
  auto t = makeTarget(endpoint, keepalive.value_or(target()->keepalive));
  std::shared_ptr<Target> old;
  {
    std::lock_guard lock(mu_);
    old = std::exchange(target_, std::move(t));
    ++target_serial_;
    lost_ = false;
    // Calls waiting on the old endpoint end now; callWithRetry sends them again to the new one.
    for (grpc::ClientContext* ctx : calls_) ctx->TryCancel();
  }
  return okStatus();  // `old` goes when its last call ends
}

void CoordinatorConnection::markLost(std::uint64_t serial) {
  std::lock_guard lock(mu_);
  if (serial != target_serial_) return;
  lost_ = true;
  for (grpc::ClientContext* ctx : calls_) ctx->TryCancel();
}

void CoordinatorConnection::clearLost() {
  std::lock_guard lock(mu_);
  lost_ = false;
}

bool CoordinatorConnection::lost() const {
  std::lock_guard lock(mu_);
  return lost_;
}

std::uint64_t CoordinatorConnection::targetSerial() const {
  std::lock_guard lock(mu_);
  return target_serial_;
}

std::uint64_t CoordinatorConnection::beginCall(grpc::ClientContext* ctx) const {
  std::lock_guard lock(mu_);
  calls_.insert(ctx);
  return target_serial_;
}

void CoordinatorConnection::endCall(grpc::ClientContext* ctx) const {
  std::lock_guard lock(mu_);
  calls_.erase(ctx);
}

void CoordinatorConnection::prepareContext(grpc::ClientContext* ctx, Milliseconds timeout) const {
  ctx->AddMetadata(std::string(kTokenMetadataKey), options_.token);
  ctx->set_deadline(std::chrono::system_clock::now() +
                    (timeout.count() > 0 ? timeout : options_.rpc_timeout));
  ctx->set_wait_for_ready(true);
}

std::unique_ptr<grpc::ClientContext> CoordinatorConnection::newContext(Milliseconds timeout) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  prepareContext(ctx.get(), timeout);
  return ctx;
}

Result<v1::RoundInfo> CoordinatorConnection::getRound() {
  v1::RoundInfo info;
  RALLY_RETURN_IF_ERROR(internal::callWithRetry(*this, "GetRound", true, [&](auto* ctx) {
    return stub()->GetRound(ctx, v1::GetRoundRequest(), &info);
  }));
  return info;
}

Result<v1::RoundInfo> probeRound(ClientOptions options, Milliseconds timeout) {
  options.dedicated_connection = true;
  options.keepalive = Milliseconds(0);
  options.connect_attempt = timeout;  // the one attempt it makes
  RALLY_ASSIGN_OR_RETURN(auto conn, CoordinatorConnection::open(std::move(options)));
  grpc::ClientContext ctx;
  conn->prepareContext(&ctx, timeout);
  ctx.set_wait_for_ready(false);  // a refused connection is an answer: none there
  v1::RoundInfo info;
  const grpc::Status s = conn->stub()->GetRound(&ctx, v1::GetRoundRequest(), &info);
  if (!s.ok()) return fromGrpcStatus(s, "GetRound");
  return info;
}

namespace internal {

Status callWithRetry(const CoordinatorConnection& conn, std::string_view what, bool idempotent,
                     const std::function<grpc::Status(grpc::ClientContext*)>& call,
                     Milliseconds timeout) {
  const auto give_up = std::chrono::steady_clock::now() + conn.options().connect_timeout;
  thread_local std::minstd_rand rng(std::random_device{}());
  Milliseconds backoff(50);
  for (int attempt = 1;; ++attempt) {
    if (conn.lost()) {
      return unavailable(
          fmt::format("in {}: the coordinator at {} was lost", what, conn.endpoint()));
    }
    grpc::ClientContext ctx;
    conn.prepareContext(&ctx, timeout);
    // A retry waits for the coordinator to come back, but not past the retry budget.
    if (attempt > 1) {
      const auto budget_left = std::chrono::duration_cast<std::chrono::system_clock::duration>(
          give_up - std::chrono::steady_clock::now());
      if (ctx.deadline() > std::chrono::system_clock::now() + budget_left) {
        ctx.set_deadline(std::chrono::system_clock::now() + budget_left);
      }
    }
    const std::uint64_t serial = conn.beginCall(&ctx);
    const grpc::Status s = call(&ctx);
    conn.endCall(&ctx);
    if (s.ok()) return okStatus();
    // Retargeted while it waited on the old endpoint: send it to the new one at once.
    if (idempotent && conn.targetSerial() != serial && !isFinal(s) &&
        std::chrono::steady_clock::now() < give_up) {
      continue;
    }
    const bool retryable =
        idempotent && s.error_code() == grpc::StatusCode::UNAVAILABLE && !isFinal(s);
    if (!retryable || std::chrono::steady_clock::now() + backoff > give_up) {
      Status out = fromGrpcStatus(s, what);
      if (attempt > 1) out.addContext(fmt::format("after {} attempts", attempt));
      return out.addContext(fmt::format("coordinator {}", conn.endpoint()));
    }
    const auto jitter = Milliseconds(
        std::uniform_int_distribution<int>(0, static_cast<int>(backoff.count() / 2))(rng));
    std::this_thread::sleep_for(backoff + jitter);
    backoff = std::min(backoff * 2, Milliseconds(2000));
  }
}

}  // namespace internal

StoreClient::StoreClient(std::shared_ptr<CoordinatorConnection> connection)
    : conn_(std::move(connection)) {}

StoreClient::StoreClient(std::shared_ptr<CoordinatorConnection> c, std::string prefix,
                         std::uint64_t gen)
    : conn_(std::move(c)), prefix_(std::move(prefix)), generation_(gen) {}

StoreClient StoreClient::scoped(const std::string& prefix, std::uint64_t generation) const {
  return StoreClient(conn_, prefix_ + prefix, generation);
}

Status StoreClient::set(const std::string& key, const std::string& value) {
  v1::SetRequest req;
  req.set_generation(generation_);
  req.set_key(full(key));
  req.set_value(value);
  v1::SetResponse resp;
  return internal::callWithRetry(*conn_, fmt::format("Set('{}')", req.key()), true,
                                 [&](auto* ctx) { return conn_->stub()->Set(ctx, req, &resp); });
}

Result<std::optional<std::string>> StoreClient::get(const std::string& key) {
  v1::GetRequest req;
  req.set_generation(generation_);
  req.set_key(full(key));
  v1::GetResponse resp;
  RALLY_RETURN_IF_ERROR(
      internal::callWithRetry(*conn_, fmt::format("Get('{}')", req.key()), true,
                              [&](auto* ctx) { return conn_->stub()->Get(ctx, req, &resp); }));
  if (!resp.found()) return std::optional<std::string>();
  return std::optional<std::string>(std::move(*resp.mutable_value()));
}

Status StoreClient::wait(const std::vector<std::string>& keys, Milliseconds timeout) {
  v1::WaitRequest req;
  req.set_generation(generation_);
  for (const auto& k : keys) req.add_keys(full(k));
  req.set_timeout_ms(static_cast<std::uint64_t>(timeout.count()));
  v1::WaitResponse resp;
  // The server enforces `timeout`; the call's own deadline leaves it room to answer.
  return internal::callWithRetry(
      *conn_, fmt::format("Wait({} key(s))", keys.size()), true,
      [&](auto* ctx) { return conn_->stub()->Wait(ctx, req, &resp); },
      timeout + Milliseconds(5000));
}

Result<std::int64_t> StoreClient::add(const std::string& key, std::int64_t delta) {
  v1::AddRequest req;
  req.set_generation(generation_);
  req.set_key(full(key));
  req.set_delta(delta);
  v1::AddResponse resp;
  RALLY_RETURN_IF_ERROR(
      internal::callWithRetry(*conn_, fmt::format("Add('{}')", req.key()), false,
                              [&](auto* ctx) { return conn_->stub()->Add(ctx, req, &resp); }));
  return resp.value();
}

Result<CompareAndSetResult> StoreClient::compareAndSet(const std::string& key,
                                                       const std::optional<std::string>& expected,
                                                       const std::string& desired) {
  v1::CompareAndSetRequest req;
  req.set_generation(generation_);
  req.set_key(full(key));
  req.set_expect_present(expected.has_value());
  if (expected) req.set_expected(*expected);
  req.set_desired(desired);
  v1::CompareAndSetResponse resp;
  RALLY_RETURN_IF_ERROR(internal::callWithRetry(
      *conn_, fmt::format("CompareAndSet('{}')", req.key()), false,
      [&](auto* ctx) { return conn_->stub()->CompareAndSet(ctx, req, &resp); }));
  return CompareAndSetResult{resp.swapped(), resp.present(), std::move(*resp.mutable_value())};
}

Result<bool> StoreClient::claim(const std::string& key, const std::string& owner) {
  v1::CompareAndSetRequest req;
  req.set_generation(generation_);
  req.set_key(full(key));
  req.set_expect_present(false);
  req.set_desired(owner);
  v1::CompareAndSetResponse resp;
  // Idempotent as retried: a second attempt after a first that was made finds `owner` there.
  RALLY_RETURN_IF_ERROR(internal::callWithRetry(
      *conn_, fmt::format("claiming '{}'", req.key()), true,
      [&](auto* ctx) { return conn_->stub()->CompareAndSet(ctx, req, &resp); }));
  return resp.swapped() || (resp.present() && resp.value() == owner);
}

Result<bool> StoreClient::remove(const std::string& key) {
  v1::DeleteRequest req;
  req.set_generation(generation_);
  req.set_key(full(key));
  v1::DeleteResponse resp;
  RALLY_RETURN_IF_ERROR(
      internal::callWithRetry(*conn_, fmt::format("Delete('{}')", req.key()), true,
                              [&](auto* ctx) { return conn_->stub()->Delete(ctx, req, &resp); }));
  return resp.existed();
}

Result<std::vector<std::string>> StoreClient::list(const std::string& prefix) {
  std::vector<std::string> keys;
  v1::ListRequest req;
  req.set_generation(generation_);
  req.set_prefix(full(prefix));
  for (;;) {
    v1::ListResponse resp;
    RALLY_RETURN_IF_ERROR(
        internal::callWithRetry(*conn_, fmt::format("List('{}')", req.prefix()), true,
                                [&](auto* ctx) { return conn_->stub()->List(ctx, req, &resp); }));
    for (const auto& k : resp.keys()) keys.push_back(k.substr(prefix_.size()));
    if (!resp.more() || resp.keys().empty()) break;
    req.set_start_after(resp.keys(resp.keys_size() - 1));
  }
  return keys;
}

}  // namespace rally::rendezvous
