// Hosts the coordinator service on a gRPC server: `rally coordinator` alone, or embedded in the
// agent whose address matches the rendezvous endpoint.
//
//   RALLY_ASSIGN_OR_RETURN(auto server, CoordinatorServer::start(options, {.host = "127.0.0.1"}));
//   std::cout << "listening on port " << server->port() << "\n";
//   ...
//   server->shutdown("SIGTERM");  // clients are told, then the server stops
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <grpcpp/server.h>

#include <memory>
#include <string>

#include "kernels/base/status.h"
#include "launcher/coordinator/coordinator_service.h"

namespace rally::coordinator {

struct ListenOptions {
  std::string host = "0.0.0.0";
  int port = 29400;  // 0: a free port, see port()
  std::int64_t max_message_bytes = 4 << 20;
};

class CoordinatorServer {
 public:
  // Fails with a message naming the address when it cannot listen (port taken, bad host).
  static Result<std::unique_ptr<CoordinatorServer>> start(CoordinatorOptions options,
                                                          const ListenOptions& listen);
  ~CoordinatorServer();

  int port() const { return port_; }
  std::string address() const;
  CoordinatorService& service() { return *service_; }

  // Tells every client why, fails pending calls, then stops the server (waiting at most `grace`
  // for calls in flight). Idempotent.
  void shutdown(const std::string& reason, Milliseconds grace = Milliseconds(2000));
  // As shutdown(), but the job goes on: the agents' Shutdown message says to hand the coordinator
  // over to the round's successors.
  void handOver(const std::string& reason, Milliseconds grace = Milliseconds(2000));

 private:
  CoordinatorServer() = default;
  void stop(const std::string& reason, Milliseconds grace, bool handover);
  std::unique_ptr<CoordinatorService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string host_;
  int port_ = 0;
  std::mutex mu_;
  bool stopped_ = false;
};

// Raises this process's open-file limit to its hard limit (a coordinator holds one socket per
// agent). Returns the new soft limit.
std::uint64_t raiseOpenFileLimit();

}  // namespace rally::coordinator
