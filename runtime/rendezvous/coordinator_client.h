// The client side of rally's coordinator: a connection (channel + job token + deadlines) and the
// key-value store over it. Used by agents, by workers through librally, and by tools.
//
//   RALLY_ASSIGN_OR_RETURN(auto conn, CoordinatorConnection::open({.endpoint = "10.0.0.1:29400",
//                                                                  .token = token}));
//   StoreClient store(conn);                            // the job scope
//   StoreClient gen = store.scoped("gloo/", generation);  // keys dropped when the generation ends
//   RALLY_RETURN_IF_ERROR(gen.set("rank0/addr", addr));
//   RALLY_RETURN_IF_ERROR(gen.wait({"rank1/addr"}, 10s));
//
// Deadlines: every call has one (ClientOptions::rpc_timeout unless given). Calls wait for the
// connection to come up within their deadline (gRPC's wait-for-ready), so a coordinator that is
// still starting is not an error. Retries: calls that are safe to repeat (get, set, wait, delete,
// list) are retried with exponential backoff and jitter when the connection breaks mid-call, for at
// most ClientOptions::connect_timeout; add and compare-and-set are never retried, since a lost
// reply does not tell whether they took effect.
//
// Thread-safety: CoordinatorConnection and StoreClient are thread-safe.
#pragma once

#include <grpcpp/channel.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/tunables.h"
#include "rally/v1/coordinator.grpc.pb.h"

namespace rally::rendezvous {

struct ClientOptions {
  std::string endpoint;  // host:port
  std::string token;
  Milliseconds rpc_timeout{30'000};
  Milliseconds connect_timeout{60'000};
  std::int64_t max_message_bytes = 4 << 20;
  // Each connection gets its own TCP connection (instead of sharing one per process with other
  // connections to the same endpoint), as separate agents would.
  bool dedicated_connection = false;
  // HTTP/2 pings while a call is open, each to be answered within the same time: a coordinator
  // whose host went silent (powered off, cut off) breaks the streams within twice this, instead
  // of when TCP gives up (minutes). 0: off. fromTunables: twice the heartbeat interval.
  Milliseconds keepalive{2000};
  // How long one attempt to set up the connection (TCP and HTTP/2's handshake) may take before
  // it is given up and tried again. gRPC takes it from the reconnect backoff's minimum, kept short
  // so that a restarted coordinator is reconnected to quickly; later attempts get longer, up to
  // the backoff's maximum (2 s). A probe gives its one attempt its whole timeout.
  Milliseconds connect_attempt{100};

  // rpc_timeout, connect_timeout and max_message_bytes from the tunables.
  static Result<ClientOptions> fromTunables(const Tunables& tunables, std::string endpoint,
                                            std::string token);
};

// Reads a job token from a file: the first line, without surrounding whitespace; empty is an error.
Result<std::string> readTokenFile(const std::string& path);

class CoordinatorConnection {
 public:
  static Result<std::shared_ptr<CoordinatorConnection>> open(ClientOptions options);

  // A copy: the endpoint changes when the connection is retargeted.
  ClientOptions options() const;
  std::string endpoint() const;
  // The stub of the current endpoint; it keeps its channel alive while a call uses it.
  std::shared_ptr<rally::v1::Coordinator::Stub> stub() const;
  std::shared_ptr<grpc::Channel> channel() const;
  // A context with the token and a deadline `timeout` from now (rpc_timeout if zero).
  std::unique_ptr<grpc::ClientContext> newContext(Milliseconds timeout = Milliseconds(0)) const;
  void prepareContext(grpc::ClientContext* ctx, Milliseconds timeout = Milliseconds(0)) const;

  // Points every later call (and every retry of a call in progress) at another endpoint: the
  // job's coordinator moved to a successor after its host was lost. Streams already open stay on
  // the old channel until they end. InvalidArgument if `endpoint` is not HOST:PORT.
  // `keepalive`: the new endpoint's (ClientOptions::keepalive), if not the current one's: an agent
  // pings no coordinator of its own, but does ping one elsewhere.
  Status retarget(const std::string& endpoint,
                  std::optional<Milliseconds> keepalive = std::nullopt);
  // The coordinator at the current endpoint is known to be gone (an agent's session broke): calls
  // in flight are cancelled and later ones fail at once (Unavailable) instead of waiting out their
  // deadlines, until retarget(). `serial`: the targetSerial() the evidence is about; a no-op if
  // the connection was retargeted since (the evidence is about an endpoint no longer used).
  void markLost(std::uint64_t serial);
  // Calls go through again (the coordinator answered: an agent's session was welcomed).
  void clearLost();
  bool lost() const;
  // Counts retargets: a call that began before the count moved went to the old endpoint.
  std::uint64_t targetSerial() const;

  // For internal::callWithRetry: a unary call in flight, cancelled by retarget() (a call waiting
  // for a lost coordinator would otherwise wait out its whole deadline there). beginCall returns
  // the target serial the call goes to; endCall must follow before `ctx` is destroyed.
  std::uint64_t beginCall(grpc::ClientContext* ctx) const;
  void endCall(grpc::ClientContext* ctx) const;

  Result<rally::v1::RoundInfo> getRound();

 private:
  struct Target {
    std::string endpoint;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<rally::v1::Coordinator::Stub> stub;
    Milliseconds keepalive{0};
  };
  explicit CoordinatorConnection(ClientOptions options);
  std::shared_ptr<Target> makeTarget(const std::string& endpoint, Milliseconds keepalive) const;
  std::shared_ptr<Target> target() const;

  ClientOptions options_;  // options_.endpoint: the first endpoint; target_ has the current one
  mutable std::mutex mu_;
  std::shared_ptr<Target> target_;
  std::uint64_t target_serial_ = 0;
  bool lost_ = false;
  mutable std::unordered_set<grpc::ClientContext*> calls_;  // in flight, with mu_
};

// Asks the coordinator at `options.endpoint` for its round once, on a connection of its own,
// without keepalive and without waiting for the connection to come up (a refused connection is an
// answer: none there), within `timeout`, which also bounds the connection's one attempt (a
// coordinator slow to finish the handshake still answers). Only a served call is a round: a
// coordinator shutting down, or a transport that resets the call, gives an error (Unauthenticated:
// one that refuses the token). For finding a coordinator (agents, `rally status`), not for a job's
// own calls.
Result<rally::v1::RoundInfo> probeRound(ClientOptions options, Milliseconds timeout);

struct CompareAndSetResult {
  bool swapped = false;
  bool present = false;
  std::string value;  // the key's value now
};

class StoreClient {
 public:
  explicit StoreClient(std::shared_ptr<CoordinatorConnection> connection);

  // A view whose keys all start with `prefix` (added to this view's) in `generation` (0: the job
  // scope, kept for the job's life; otherwise the current generation, dropped when it ends).
  StoreClient scoped(const std::string& prefix, std::uint64_t generation) const;
  std::uint64_t generation() const { return generation_; }
  const std::string& prefix() const { return prefix_; }

  Status set(const std::string& key, const std::string& value);
  // The value, or nullopt if the key does not exist.
  Result<std::optional<std::string>> get(const std::string& key);
  // Blocks until every key exists. Timeout after `timeout`; Aborted if the generation ends first.
  Status wait(const std::vector<std::string>& keys, Milliseconds timeout);
  // Adds `delta` to an integer key (created at 0) and returns the new value. Not retried.
  Result<std::int64_t> add(const std::string& key, std::int64_t delta);
  // Sets `desired` if the key holds `expected` (or, with expected = nullopt, if it is absent).
  // Not retried.
  Result<CompareAndSetResult> compareAndSet(const std::string& key,
                                            const std::optional<std::string>& expected,
                                            const std::string& desired);
  // Claims `key` for `owner` (a value no other caller uses): sets it if it is absent. True if this
  // call, or an earlier attempt of it, set it. Unlike compareAndSet, retried while the
  // coordinator is away (restarted, or taken over) or moves: an attempt that was made before the
  // answer was lost shows as the key holding `owner`.
  Result<bool> claim(const std::string& key, const std::string& owner);
  // True if the key existed.
  Result<bool> remove(const std::string& key);
  // Every key under `prefix` in this view (keys returned without the view's prefix), in order.
  Result<std::vector<std::string>> list(const std::string& prefix = "");

 private:
  StoreClient(std::shared_ptr<CoordinatorConnection> c, std::string prefix, std::uint64_t gen);
  std::string full(const std::string& key) const { return prefix_ + key; }

  std::shared_ptr<CoordinatorConnection> conn_;
  std::string prefix_;
  std::uint64_t generation_ = 0;
};

namespace internal {
// Runs `call` (which returns a grpc::Status) with retries for idempotent calls, as described above.
Status callWithRetry(const CoordinatorConnection& conn, std::string_view what, bool idempotent,
                     const std::function<grpc::Status(grpc::ClientContext*)>& call,
                     Milliseconds timeout = Milliseconds(0));
}  // namespace internal

}  // namespace rally::rendezvous
