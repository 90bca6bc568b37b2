// The MPI backend's process-wide state (MpiProcess: MPI's initialisation, thread level, the lock
// around MPI calls, the f16/bf16 reductions, abandoned requests) and its call wrappers. Private to
// collectives/mpi.
#pragma once

#include <fmt/format.h>

// The C API only: without these, mpi.h in a C++ file pulls in the deprecated C++ bindings, which
// live in a library (libmpi_cxx) that MPI::MPI_C does not link.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string_view>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives::internal {

// The one wrapper for MPI's return codes: the call, file:line and MPI's own error string. Errors
// MPI does not classify further get `fallback`: Internal where rally posts an operation (it checked
// the arguments), PeerLost where an operation the other ranks took part in completes with an error.
Status mpiStatus(int rc, std::string_view call, const char* file, int line, StatusCode fallback);

// A request MPI may still complete, and the buffers it may still write: an operation that was
// aborted or timed out cannot be cancelled (a collective) or freed before it completes.
struct AbandonedRequest {
  MPI_Request request = MPI_REQUEST_NULL;
  std::shared_ptr<void> buffers;
};

// Indexed by ReduceOp (kSum, kAvg, kMin, kMax, kProd); internal::reduce sums for kAvg.
constexpr size_t kReduceOps = 5;
static_assert(static_cast<size_t>(ReduceOp::kProd) == kReduceOps - 1, "the tables follow ReduceOp");

// MPI as this process has it. MPI can be initialised once per process and finalized once, so this
// is the backend's one process-wide object, and it holds only MPI's process state: the thread
// level, the lock that serialises MPI calls where MPI asks for it, the f16/bf16 operations and the
// requests communicators abandoned. Created by the first createMpiCommunicator() or
// mpiWorldOptions(); never destroyed (MPI_Finalize runs at exit, see mpi_communicator.h).
class MpiProcess {
 public:
  // Held around each MPI call: shared under MPI_THREAD_MULTIPLE, exclusive under
  // MPI_THREAD_SERIALIZED. False once MPI_Finalize ran: then nothing may be called.
  class Entry {
   public:
    explicit Entry(MpiProcess& p) {
      if (p.serialized_) {
        exclusive_ = std::unique_lock(p.mu_);
      } else {
        shared_ = std::shared_lock(p.mu_);
      }
      ok_ = !p.finalized_;
    }
    explicit operator bool() const { return ok_; }

   private:
    std::unique_lock<std::shared_mutex> exclusive_;
    std::shared_lock<std::shared_mutex> shared_;
    bool ok_ = false;
  };

  static Result<MpiProcess*> get() {
    static const Result<MpiProcess*> process = initialise();  // once, thread-safe
    return process;
  }

  Entry enter() { return Entry(*this); }

  MPI_Op op16(DataType type, ReduceOp op) const {
    return ops16_[type == DataType::kF16 ? 0 : 1][static_cast<size_t>(op)];
  }

  // Frees `comm` (if not null) once the requests a communicator abandoned have completed: Open MPI
  // does not keep a communicator alive for its pending non-blocking collectives, and would progress
  // them on a freed one. Until then MPI progresses them whenever any MPI call runs; each retire()
  // and sweep() tests every pending request and frees what it can. (At exit MPI_Finalize cleans up
  // what is left.)
  void retire(std::shared_ptr<MPI_Comm> comm, std::vector<AbandonedRequest> requests) {
    std::lock_guard lock(retired_mu_);
    retired_.push_back(Retired{std::move(comm), std::move(requests)});
    sweepLocked();
  }
  void sweep() {
    std::lock_guard lock(retired_mu_);
    sweepLocked();
  }

 private:
  explicit MpiProcess(int thread_level) : serialized_(thread_level < MPI_THREAD_MULTIPLE) {
    for (auto& ops : ops16_) std::fill(std::begin(ops), std::end(ops), MPI_OP_NULL);
  }

  static Result<MpiProcess*> initialise();

  // Runs at exit if rally initialised MPI. Communicators still alive stop calling MPI: their
  // operations fail with Aborted.
  static void finalizeAtExit();

  static inline MpiProcess* instance_ = nullptr;  // set once, read at exit

  const bool serialized_;
  std::shared_mutex mu_;
  bool finalized_ = false;       // guarded by mu_
  MPI_Op ops16_[2][kReduceOps];  // [f16, bf16][ReduceOp]
  // Communicators destroyed with requests still pending, and what the requests may still write.
  struct Retired {
    std::shared_ptr<MPI_Comm> comm;  // written by an abandoned MPI_Comm_idup when it completes
    std::vector<AbandonedRequest> requests;
  };
  void sweepLocked();
  std::mutex retired_mu_;
  std::vector<Retired> retired_;  // guarded by retired_mu_
};

inline Status finalizedCause() {
  return aborted("MPI was finalized (the process is exiting), so no operation can run");
}

// Calls one MPI function while holding MpiProcess::Entry, through mpiStatus.
template <typename F>
Status callMpi(MpiProcess& process, const char* name, const char* file, int line, F&& f) {
  auto entry = process.enter();
  if (!entry) return finalizedCause();
  return mpiStatus(f(), name, file, line, StatusCode::kInternal);
}
#define RALLY_MPI_CALL(process, fn, args) \
  callMpi(process, #fn, __FILE__, __LINE__, [&] { return fn args; })

// The MPI type a DataType travels as (16-bit floats as 16-bit words).
MPI_Datatype mpiType(DataType t);
// kAvg is a sum here; the division follows (internal::finishAverage).
MPI_Op mpiOp(const MpiProcess& process, DataType t, ReduceOp op);

}  // namespace rally::collectives::internal
