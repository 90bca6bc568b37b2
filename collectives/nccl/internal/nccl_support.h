// The NCCL backend's support: wrappers that turn CUDA and NCCL errors into Statuses with their
// context, the DataType and ReduceOp maps, a device guard, and polling with a deadline
// (settle). Private to collectives/nccl.
#pragma once

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "collectives/communicator.h"

namespace rally::collectives::internal {

using Clock = std::chrono::steady_clock;

// Polls with a short back-off: NCCL's non-blocking calls and CUDA events mostly settle within
// microseconds, so the first rounds only yield; later ones sleep up to 1 ms, which bounds how
// late a poll notices abort().
class Backoff {
 public:
  void pause() {
    if (++rounds_ <= 64) return std::this_thread::yield();
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, std::chrono::microseconds(1000));
  }

 private:
  int rounds_ = 0;
  std::chrono::microseconds sleep_{20};
};

// The wrappers for CUDA and NCCL calls: the call, where in this file, and the library's own words.
// `context` is "<operation> on <rank, generation, communicator>"; `file` and `line` default to the
// caller's (the GCC and Clang builtins under std::source_location, which Clang 14 with libstdc++
// lacks).
inline std::string fileLine(std::string_view file, int line) {
  return fmt::format("{}:{}", file.substr(file.rfind('/') + 1), line);
}

inline Status cudaFailure(cudaError_t e, std::string_view call, std::string_view context,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  (void)cudaGetLastError();  // a non-sticky error must not surface in a later, unrelated call
  const StatusCode code = e == cudaErrorInvalidDevice || e == cudaErrorInvalidValue ||
                                  e == cudaErrorInvalidResourceHandle
                              ? StatusCode::kInvalidArgument
                              : (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver
                                     ? StatusCode::kFailedPrecondition
                                     : StatusCode::kInternal);
  return Status(code, fmt::format("{}: {} failed ({}): {}: {}", context, call, fileLine(file, line),
                                  cudaGetErrorName(e), cudaGetErrorString(e)));
}

inline Status checkCuda(cudaError_t e, std::string_view call, std::string_view context,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return e == cudaSuccess ? okStatus() : cudaFailure(e, call, context, file, line);
}

// A dead peer or a broken network is PeerLost; a refused argument leaves the communicator usable
// (NCCL: "the call had no effect"); the rest are NCCL, or CUDA inside NCCL, failing.
inline Status ncclFailure(ncclResult_t r, ncclComm_t comm, std::string_view call,
                          std::string_view context, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  StatusCode code = StatusCode::kInternal;
  if (r == ncclRemoteError || r == ncclSystemError) code = StatusCode::kPeerLost;
  if (r == ncclInvalidArgument || r == ncclInvalidUsage) code = StatusCode::kInvalidArgument;
  std::string detail =
      fmt::format("{} (ncclResult_t {})", ncclGetErrorString(r), static_cast<int>(r));
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') detail += fmt::format("; NCCL's last error: {}", last);
  return Status(code,
                fmt::format("{}: {} failed ({}): {}", context, call, fileLine(file, line), detail));
}

inline Status checkNccl(ncclResult_t r, ncclComm_t comm, std::string_view call,
                        std::string_view context, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return r == ncclSuccess ? okStatus() : ncclFailure(r, comm, call, context, file, line);
}

// Indexed by DataType and by ReduceOp. ncclAvg divides floats before summing and integers after
// (truncating), as the contract wants.
inline constexpr ncclDataType_t kNcclTypes[] = {ncclFloat32, ncclFloat64, ncclFloat16, ncclBfloat16,
                                                ncclInt32,   ncclInt64,   ncclUint8};
inline constexpr ncclRedOp_t kNcclOps[] = {ncclSum, ncclAvg, ncclMin, ncclMax, ncclProd};
static_assert(static_cast<int>(DataType::kBF16) == 3 && static_cast<int>(DataType::kU8) == 6 &&
                  std::size(kNcclTypes) == 7,
              "kNcclTypes follows the order of DataType");
static_assert(static_cast<int>(ReduceOp::kAvg) == 1 && static_cast<int>(ReduceOp::kProd) == 4 &&
                  std::size(kNcclOps) == 5,
              "kNcclOps follows the order of ReduceOp");
inline ncclDataType_t toNccl(DataType t) { return kNcclTypes[static_cast<int>(t)]; }
inline ncclRedOp_t toNccl(ReduceOp op) { return kNcclOps[static_cast<int>(op)]; }

inline ncclConfig_t nonBlockingConfig() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// Makes `device` current on this thread for its lifetime and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device_) error_ = cudaSetDevice(device_);
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  Status status(std::string_view context) const {
    return checkCuda(error_, fmt::format("cudaSetDevice({})", device_), context);
  }

 private:
  int device_;
  int previous_ = -1;
  cudaError_t error_ = cudaSuccess;
};

// How long a poll may go on, and what ends it early.
struct Limit {
  Clock::time_point deadline;
  std::string_view name;  // "op_timeout", "connect_timeout"
  Milliseconds length;
  std::function<bool()> cancelled = [] { return false; };
};
inline Limit limit(std::string_view name, Milliseconds length) {
  return {Clock::now() + length, name, length};
}

// Polls ncclCommGetAsyncError(comm) until the communicator leaves ncclInProgress (NCCL's rule for
// non-blocking communicators: nothing else may be called on it before), the deadline passes or
// limit.cancelled(). nullopt when it gave up with the communicator still ncclInProgress (then only
// ncclCommAbort may touch it); otherwise OK or `call`'s error.
inline std::optional<Status> settle(ncclComm_t comm, const Limit& limit, std::string_view call,
                                    std::string_view context, bool* timed_out = nullptr) {
  Backoff backoff;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return ncclFailure(r, comm, "ncclCommGetAsyncError", context);
    if (state != ncclInProgress) return checkNccl(state, comm, call, context);
    const bool late = Clock::now() >= limit.deadline;
    if (timed_out != nullptr) *timed_out = late;
    if (late || limit.cancelled()) return std::nullopt;
    backoff.pause();
  }
}

inline Status lateStatus(std::string_view call, std::string_view context, const Limit& limit,
                         std::string_view why) {
  return timeoutError(fmt::format("{}: {} did not finish within {} ({}): {}", context, call,
                                  formatDuration(limit.length), limit.name, why));
}

// Device (or managed) memory of `device`; anything else would fault inside an NCCL kernel, which
// takes the whole CUDA context with it, so it is refused before anything is enqueued.
inline Status checkDeviceBuffer(const void* p, std::string_view name, int device,
                                std::string_view context) {
  cudaPointerAttributes attr{};
  if (const cudaError_t e = cudaPointerGetAttributes(&attr, p); e != cudaSuccess) {
    (void)cudaGetLastError();
    return invalidArgument(fmt::format("{}: {} ({}) is not memory CUDA knows ({})", context, name,
                                       fmt::ptr(p), cudaGetErrorString(e)));
  }
  if (attr.type == cudaMemoryTypeManaged) return okStatus();
  if (attr.type != cudaMemoryTypeDevice) {
    return invalidArgument(fmt::format(
        "{}: {} ({}) is host memory; the NCCL backend moves CUDA device memory only (of CUDA "
        "device {}): copy it to the device first",
        context, name, fmt::ptr(p), device));
  }
  if (attr.device == device) return okStatus();
  return invalidArgument(
      fmt::format("{}: {} ({}) is memory of CUDA device {}, but this rank runs on CUDA device {}",
                  context, name, fmt::ptr(p), attr.device, device));
}

}  // namespace rally::collectives::internal
