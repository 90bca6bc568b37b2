#include "runtime/rendezvous/grpc_status.h"

#include <fmt/format.h>
#include <grpc/grpc.h>
#include <grpc/support/log.h>
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <cstdlib>

#include "kernels/base/logging.h"

namespace rally::rendezvous {

grpc::Status toGrpcStatus(const Status& s) {
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (s.code()) {
    case StatusCode::kOk:
      return grpc::Status::OK;
    case StatusCode::kInvalidArgument:
      code = grpc::StatusCode::INVALID_ARGUMENT;
      break;
    case StatusCode::kNotFound:
      code = grpc::StatusCode::NOT_FOUND;
      break;
    case StatusCode::kAlreadyExists:
      code = grpc::StatusCode::ALREADY_EXISTS;
      break;
    case StatusCode::kFailedPrecondition:
      code = grpc::StatusCode::FAILED_PRECONDITION;
      break;
    case StatusCode::kResourceExhausted:
      code = grpc::StatusCode::RESOURCE_EXHAUSTED;
      break;
    case StatusCode::kUnauthenticated:
      code = grpc::StatusCode::UNAUTHENTICATED;
      break;
    case StatusCode::kTimeout:
      code = grpc::StatusCode::DEADLINE_EXCEEDED;
      break;
    case StatusCode::kPeerLost:
      code = grpc::StatusCode::UNAVAILABLE;
      break;
    case StatusCode::kAborted:
      code = grpc::StatusCode::ABORTED;
      break;
    case StatusCode::kUnavailable:
      code = grpc::StatusCode::UNAVAILABLE;
      break;
    case StatusCode::kIo:
      code = grpc::StatusCode::INTERNAL;
      break;
    case StatusCode::kInternal:
      code = grpc::StatusCode::INTERNAL;
      break;
    case StatusCode::kUnimplemented:
      code = grpc::StatusCode::UNIMPLEMENTED;
      break;
  }
  return grpc::Status(code, s.message());
}

namespace {
constexpr char kFinalMarker[] = "rally:final";
}  // namespace

namespace {
// gRPC logs from its own threads, also while the process exits (grpc_shutdown from a transport's
// destructor); by then spdlog's registry may be destroyed. An exit handler registered after the
// registry exists runs before the registry is destroyed, and stops the forwarding.
std::atomic<bool> forward_grpc_logs{false};
}  // namespace

GrpcLifetime::GrpcLifetime() {
  // The threads gRPC starts now inherit this thread's signal mask: with every signal blocked they
  // never take the process's signals, which the program handles itself (rally's agent waits for
  // them on a thread of its own, having blocked them before it starts any thread).
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  grpc_init();
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}
GrpcLifetime::~GrpcLifetime() { grpc_shutdown_blocking(); }

void routeGrpcLogs() {
  (void)rally::log::get("grpc");  // the registry exists before the exit handler below
  static const bool registered = [] {
    std::atexit([] { forward_grpc_logs = false; });
    return true;
  }();
  (void)registered;
  forward_grpc_logs = true;
  gpr_set_log_verbosity(GPR_LOG_SEVERITY_DEBUG);
  gpr_set_log_function([](gpr_log_func_args* args) {
    if (!forward_grpc_logs.load()) return;
    rally::log::get("grpc")->debug("{}:{}: {}", args->file, args->line, args->message);
  });
}

grpc::Status finalStatus(grpc::StatusCode code, const std::string& message) {
  return grpc::Status(code, message, kFinalMarker);
}

bool isFinal(const grpc::Status& status) { return status.error_details() == kFinalMarker; }

Status fromGrpcStatus(const grpc::Status& s, std::string_view what) {
  if (s.ok()) return okStatus();
  StatusCode code = StatusCode::kInternal;
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
      code = StatusCode::kInvalidArgument;
      break;
    case grpc::StatusCode::NOT_FOUND:
      code = StatusCode::kNotFound;
      break;
    case grpc::StatusCode::ALREADY_EXISTS:
      code = StatusCode::kAlreadyExists;
      break;
    case grpc::StatusCode::FAILED_PRECONDITION:
      code = StatusCode::kFailedPrecondition;
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      code = StatusCode::kResourceExhausted;
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      code = StatusCode::kUnauthenticated;
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      code = StatusCode::kTimeout;
      break;
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::CANCELLED:
      code = StatusCode::kAborted;
      break;
    case grpc::StatusCode::UNAVAILABLE:
      code = StatusCode::kUnavailable;
      break;
    default:
      code = StatusCode::kInternal;
      break;
  }
  std::string message = s.error_message();
  if (message.empty()) message = fmt::format("gRPC status {}", static_cast<int>(s.error_code()));
  Status out(code, std::move(message));
  out.addContext(fmt::format("in {}", what));
  return out;
}

}  // namespace rally::rendezvous
