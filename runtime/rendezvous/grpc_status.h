// Conversions between rally::Status and grpc::Status, shared by the coordinator (server) and its
// clients, and the metadata key that carries the job token.
#pragma once

#include <grpcpp/support/status.h>

#include <string_view>

#include "kernels/base/status.h"

namespace rally::rendezvous {

inline constexpr std::string_view kTokenMetadataKey = "x-rally-token";

grpc::Status toGrpcStatus(const Status& status);

// Holds the gRPC library for a program's main(): declared first in main, it makes the library's
// final clean-up run in main's thread, to completion, when main ends (grpc_shutdown_blocking).
// Without it the last gRPC object to go (a channel released on one of gRPC's own threads) starts
// that clean-up on a detached thread, which races the process's exit and its static destructors
// ("pure virtual method called" at exit, once in a while).
class GrpcLifetime {
 public:
  GrpcLifetime();
  ~GrpcLifetime();
  GrpcLifetime(const GrpcLifetime&) = delete;
  GrpcLifetime& operator=(const GrpcLifetime&) = delete;
};

// Sends gRPC's own log lines to rally's "grpc" log subsystem at debug level (rally reports every
// failure that matters with its own message; gRPC's raw lines would otherwise go to stderr).
// Call once at the start of main(). See them with RALLY_LOG_LEVEL=info,grpc=debug.
void routeGrpcLogs();

// A status the coordinator sends when it is shutting down: clients must not retry it (the same call
// would only wait for a coordinator that is gone). Marked in the status's error details.
grpc::Status finalStatus(grpc::StatusCode code, const std::string& message);
bool isFinal(const grpc::Status& status);
// `what` names the call for context: "Set('a')".
Status fromGrpcStatus(const grpc::Status& status, std::string_view what);

}  // namespace rally::rendezvous
