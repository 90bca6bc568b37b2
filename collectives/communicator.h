// The one collective API rally's training code uses, whatever the backend: allreduce,
// reduce-scatter, allgather, broadcast, all-to-all, send/recv and barrier, asynchronous, abortable.
//
//   RALLY_ASSIGN_OR_RETURN(auto comm, createGlooCommunicator(store, {.rank = r, .size = n,
//                                                                    .generation = g}));
//   auto work = comm->allreduce(grads.data(), grads.size(), DataType::kF32, ReduceOp::kAvg);
//   ... overlap other work ...
//   RALLY_RETURN_IF_ERROR(work->wait(Milliseconds(60'000)));
//
// Contracts:
// - Every rank calls the same collectives in the same order with the same counts and types.
// - Operations of one communicator run in the order they were issued, one at a time.
// - abort(), from any thread, makes every in-flight and later operation fail at once with Aborted;
//   a peer that dies makes in-flight operations fail with PeerLost (never a silent hang: each
//   operation also has a timeout).
// - Errors name the rank, the operation and the generation.
//
// Thread-safety: all methods may be called from any thread; buffers must stay valid and untouched
// until their Work completes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally::collectives {

enum class DataType { kF32, kF64, kF16, kBF16, kI32, kI64, kU8 };
enum class ReduceOp { kSum, kAvg, kMin, kMax, kProd };

size_t dataTypeSize(DataType t);
std::string_view dataTypeName(DataType t);
std::string_view reduceOpName(ReduceOp op);

// What a backend can do; the registry (collectives/registry.h) chooses backends by these.
struct Capabilities {
  bool host_memory = false;     // buffers in host memory
  bool device_memory = false;   // buffers in CUDA device memory (stream-ordered)
  bool can_shrink = false;      // shrink(): survivors drop ranks without a full re-initialisation
  bool elastic = false;         // can be re-created with another size in the same processes
  bool needs_launcher = false;  // only in jobs started by mpirun or srun (fixed size)
};

// An operation in flight.
class Work {
 public:
  virtual ~Work() = default;
  // Waits up to `timeout`: OK, the operation's error, or Timeout (the operation goes on; abort()
  // the communicator to stop it).
  virtual Status wait(Milliseconds timeout) = 0;
  virtual bool done() const = 0;

  // What a backend can tell of an operation's life as it happens, for tracing
  // (collectives/recorder.h): `started` when its worker takes it from the queue and begins,
  // `completed` with the final status. Each is called once, on the backend's thread, or at once
  // from observe() for what has already happened; `started` may never come (an operation failed
  // before it began). Both must be quick and must not call into the communicator.
  struct Observer {
    std::function<void()> started;
    std::function<void(const Status&)> completed;
  };
  // Installs `observer` (at most one per Work). False, and nothing will be called, where this Work
  // cannot tell (the caller then learns of completion only from wait() and done()).
  virtual bool observe(Observer observer) {
    (void)observer;
    return false;
  }
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::uint64_t generation() const = 0;
  virtual std::string_view backend() const = 0;
  virtual Capabilities capabilities() const = 0;

  // In place: every rank ends with the reduction of all ranks' `data`.
  virtual std::shared_ptr<Work> allreduce(void* data, size_t count, DataType type, ReduceOp op) = 0;
  // `in` holds size() * count elements; rank r ends with block r of the reduction in `out`.
  virtual std::shared_ptr<Work> reduceScatter(const void* in, void* out, size_t count,
                                              DataType type, ReduceOp op) = 0;
  // `out` holds size() * count elements: block r is rank r's `in`.
  virtual std::shared_ptr<Work> allgather(const void* in, void* out, size_t count,
                                          DataType type) = 0;
  // In place: every rank ends with `root`'s data.
  virtual std::shared_ptr<Work> broadcast(void* data, size_t count, DataType type, int root) = 0;
  // `in` and `out` hold size() * count elements: block j of `in` goes to rank j, block j of `out`
  // comes from rank j.
  virtual std::shared_ptr<Work> alltoall(const void* in, void* out, size_t count,
                                         DataType type) = 0;
  virtual std::shared_ptr<Work> send(const void* data, size_t count, DataType type, int peer) = 0;
  virtual std::shared_ptr<Work> recv(void* data, size_t count, DataType type, int peer) = 0;
  virtual std::shared_ptr<Work> barrier() = 0;

  // Device backends (NCCL): the operations issued from now on run after the work that `event` (a
  // cudaEvent_t of this rank's device) was recorded behind, with no host wait (their stream waits
  // for the event, as at the time of this call). For a buffer written by kernels on another
  // stream than the communicator's: record an event on that stream, then call this (DDP does,
  // for autograd's gradients). Host backends (Gloo, MPI) read their buffers when an operation
  // runs, after the host has them: nothing to wait for.
  virtual Status waitForEvent(void* event) = 0;

  // Fails every in-flight and later operation with Aborted, at once. Idempotent.
  virtual void abort(const std::string& reason) = 0;
  virtual bool aborted() const = 0;

  // A sub-communicator of the ranks that pass the same `color`, ranked by `key` (then by rank).
  // Collective: every rank calls it, in the same order as its other operations.
  virtual Result<std::unique_ptr<Communicator>> split(int color, int key) = 0;

  // A communicator of the ranks not in `excluded` (ranks of this communicator, e.g. the dead ones),
  // renumbered in order. Called by every surviving rank, also after abort(); the excluded ranks
  // take no part. Unimplemented where capabilities().can_shrink is false: the caller then builds a
  // new communicator from scratch.
  virtual Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>& excluded) = 0;
};

// What code that cannot return a Status (inside autograd, for instance) throws when a collective
// fails: the Status, kept whole. ElasticRun::run catches it and recovers as from a returned error.
class CollectiveError : public std::runtime_error {
 public:
  explicit CollectiveError(Status status)
      : std::runtime_error(status.toString()), status_(std::move(status)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

// A data-parallel x tensor-parallel grid: `tp` groups consecutive ranks (0..T-1, T..2T-1, ...);
// `dp` groups the ranks with the same position in their TP group.
struct Grid {
  std::unique_ptr<Communicator> dp;
  std::unique_ptr<Communicator> tp;
};
// Collective over `world`; its size must be a multiple of `tp_size`.
Result<Grid> makeGrid(Communicator& world, int tp_size);

// Where communicators exchange their bootstrap data (addresses, ids): the coordinator's store in a
// job, an in-memory store in tests. Keys are scoped by the caller.
class BootstrapStore {
 public:
  virtual ~BootstrapStore() = default;
  virtual Status set(const std::string& key, const std::string& value) = 0;
  // NotFound if absent.
  virtual Result<std::string> get(const std::string& key) = 0;
  virtual Status wait(const std::vector<std::string>& keys, Milliseconds timeout) = 0;
};

struct CommunicatorOptions {
  int rank = 0;
  int size = 1;
  std::uint64_t generation = 0;
  std::string name = "world";         // distinguishes communicators of one generation (sub-groups)
  std::string address = "127.0.0.1";  // this rank's address for its peers
  Milliseconds connect_timeout{60'000};
  Milliseconds op_timeout{300'000};  // no operation waits longer than this for a peer
  // Before each collective, the ranks exchange what they are about to do (operation, type, count,
  // root) and fail with InvalidArgument, naming the ranks, if it differs: a small extra exchange
  // per operation, instead of corrupted data or a hang. Off for the last microseconds.
  bool check_calls = true;
  // Ranks on one host exchange data through a shared-memory segment instead of TCP (Gloo; it
  // falls back to TCP, and logs why, when the ranks are not all on one host or /dev/shm refuses).
  bool shared_memory = true;
  // The CUDA device of this rank (NCCL); -1: the device current on the calling thread.
  int device = -1;
};

}  // namespace rally::collectives
