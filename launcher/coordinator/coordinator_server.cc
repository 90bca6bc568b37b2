#include "launcher/coordinator/coordinator_server.h"

#include <fmt/format.h>
#include <grpcpp/server_builder.h>
#include <sys/resource.h>

#include "kernels/base/logging.h"
#include "runtime/rendezvous/job_scope_replica.h"

namespace rally::coordinator {

std::uint64_t raiseOpenFileLimit() {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return 0;
  if (lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
    getrlimit(RLIMIT_NOFILE, &lim);
  }
  return lim.rlim_cur;
}

Result<std::unique_ptr<CoordinatorServer>> CoordinatorServer::start(CoordinatorOptions options,
                                                                    const ListenOptions& listen) {
  if (options.token.empty()) {
    return invalidArgument("the coordinator needs a job token: none was given");
  }
  if (listen.port < 0 || listen.port > 65535) {
    return invalidArgument(
        fmt::format("port {} is out of range: use 0 (a free port) to 65535", listen.port));
  }
  if (listen.max_message_bytes <= 0 || listen.max_message_bytes > (1LL << 31) - 1) {
    return invalidArgument(fmt::format("max message size {} is out of range: 1 byte to 2GiB",
                                       listen.max_message_bytes));
  }
  raiseOpenFileLimit();
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer());
  server->host_ = listen.host;
  options.job_scope_chunk_bytes = rendezvous::jobScopeChunkBytes(listen.max_message_bytes);
  server->service_ = std::make_unique<CoordinatorService>(std::move(options));

  const bool v6 = listen.host.find(':') != std::string::npos;
  const std::string target = v6 ? fmt::format("[{}]:{}", listen.host, listen.port)
                                : fmt::format("{}:{}", listen.host, listen.port);
  grpc::ServerBuilder builder;
  // One coordinator per port: gRPC would otherwise let a second one share it silently.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // Clients ping every 2 heartbeat intervals to find a silent coordinator (ClientOptions::
  // keepalive); sessions and watches carry little data from here, so gRPC's default policy would
  // take those pings for abuse and close the connection.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 100);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.SetMaxReceiveMessageSize(static_cast<int>(listen.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(listen.max_message_bytes));
  builder.AddListeningPort(target, grpc::InsecureServerCredentials(), &server->port_);
  builder.RegisterService(server->service_.get());
  server->server_ = builder.BuildAndStart();
  if (!server->server_ || server->port_ == 0) {
    return ioError(fmt::format(
        "cannot listen on {}: the port is taken (another coordinator or program uses it) or the "
        "address is not one of this host's; pick another --port, or 0 for a free one",
        target));
  }
  server->service_->start();
  rally::log::get("rendezvous")->info("listening on {}", server->address());
  return server;
}

std::string CoordinatorServer::address() const {
  const bool v6 = host_.find(':') != std::string::npos;
  return v6 ? fmt::format("[{}]:{}", host_, port_) : fmt::format("{}:{}", host_, port_);
}

void CoordinatorServer::shutdown(const std::string& reason, Milliseconds grace) {
  stop(reason, grace, /*handover=*/false);
}

void CoordinatorServer::handOver(const std::string& reason, Milliseconds grace) {
  stop(reason, grace, /*handover=*/true);
}

void CoordinatorServer::stop(const std::string& reason, Milliseconds grace, bool handover) {
  std::lock_guard lock(mu_);
  if (stopped_) return;
  stopped_ = true;
  if (service_) service_->shutdown(reason, handover);
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + grace);
}

CoordinatorServer::~CoordinatorServer() { shutdown("the coordinator is stopping"); }

}  // namespace rally::coordinator
