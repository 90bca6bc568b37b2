// The NCCL backend (CUDA devices): the Communicator contract on device buffers, with the CUDA
// stream exposed so that collectives are ordered with the caller's kernels. Bootstrapped through a
// BootstrapStore: rank 0 publishes NCCL's unique id under "nccl/<generation>/<name>/id"; every
// NCCL call is non-blocking (ncclConfig_t::blocking = 0) and polled, so abort() from another thread
// or a timeout ends it; abort() revokes the communicator (ncclCommRevoke) where this NCCL has it,
// so that shrink() can follow.
//
//   RALLY_ASSIGN_OR_RETURN(auto comm, NcclCommunicator::create(store, {.rank = r, .size = n,
//                                                                      .generation = g,
//                                                                      .device = local_rank}));
//   RALLY_RETURN_IF_ERROR(comm->setStream(compute_stream));  // after the caller's kernels
//   auto work = comm->allreduce(grads_on_device, count, DataType::kBF16, ReduceOp::kAvg);
//   launchOptimizerStep(compute_stream);  // runs after the allreduce, without a host wait
//   RALLY_RETURN_IF_ERROR(work->wait(Milliseconds(60'000)));  // the host waits (and sees errors)
//
// Stream ordering: each operation is enqueued on stream() at the moment it is issued, after
// everything the caller enqueued on that stream before, and before everything enqueued after; a
// CUDA event recorded behind it is what Work::wait() and Work::done() poll. So the caller may
// consume results on the GPU without waiting on the host; wait() is for the host (and for errors).
// Work on other streams is not followed by itself: waitForEvent() with an event recorded there
// makes the next operations wait for it on the GPU (how librally_torch follows torch's stream).
// Capturing operations into a CUDA graph is not supported.
//
// Differences from the Gloo backend, all forced by NCCL:
// - Buffers must be CUDA device (or managed) memory on device(); host memory is refused with
//   InvalidArgument before anything is enqueued (capabilities().host_memory is false).
// - send() and recv() are enqueued at once, in issue order, each on its own: a rank that sends to
//   a peer which is itself blocked in a send to this rank deadlocks on the GPU (as in NCCL). Pairs
//   that depend on each other (a ring exchange) go in one sendRecv() call, which NCCL runs as one
//   group. send()/recv() to this rank itself are refused; inside sendRecv() they are allowed.
// - CommunicatorOptions::check_calls is not honoured (off on NCCL for now): comparing the ranks'
//   calls needs the gathered descriptors back on the host before the operation is enqueued, i.e. a
//   stream synchronisation per operation, which defeats stream ordering; a check made later, when
//   wait() runs, would come after a mismatched operation had already hung or corrupted data. A
//   mismatch shows as a hang that ends at op_timeout (see below) or as wrong results.
// - An issuing call returns once NCCL has put the operation on the stream. On first use NCCL may
//   connect to the peers before that, and the call then blocks until they join (at most
//   op_timeout, or until abort()); abort() during that wait tears the communicator down with
//   ncclCommAbort, so shrink() cannot follow.
// - After an error reported by NCCL (a peer lost, a network failure) the communicator is unusable:
//   every later operation fails with that error; shrink() survivors or build a new communicator.
// - op_timeout is enforced by wait(): an operation still running op_timeout after it was issued
//   makes wait() return Timeout and aborts the communicator (a stuck NCCL kernel holds its stream
//   forever otherwise). There is no watchdog thread: a Work nobody waits on is never timed out.
// - abort() stops the GPU side (ncclCommRevoke, or ncclCommAbort where this NCCL has no revoke);
//   an operation whose completion wait()/done() had not yet observed reports Aborted, even if its
//   kernel had in fact finished: after abort() no buffer of an unobserved operation is trusted.
//
// Thread-safety: every method may be called from any thread; NCCL calls on one communicator are
// serialised inside. The calling thread's current CUDA device is switched to device() for each NCCL
// or CUDA call and restored afterwards.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <stop_token>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives {

// What this build's NCCL can do (decided when rally was compiled, from nccl.h): device memory,
// elastic; can_shrink when nccl.h declares both ncclCommShrink (NCCL_SHRINK_ABORT, NCCL 2.27) and
// ncclCommRevoke (NCCL_REVOKE_DEFAULT): shrinking after an abort needs the parent communicator
// revoked, not destroyed.
Capabilities ncclCapabilities();

class NcclCommunicator : public Communicator {
 public:
  // Every rank calls this with the same size, generation and name (and distinct devices: NCCL
  // refuses two ranks on one GPU). Rank 0 creates NCCL's unique id and publishes it in `store`;
  // the others wait for it. Fails with Timeout after options.connect_timeout (the id never came,
  // or NCCL's initialisation did not finish: a rank missing or unreachable), with Aborted when
  // `stop` is requested (from any thread), FailedPrecondition where there is no CUDA device, and
  // InvalidArgument for a rank, size or device that does not exist. `store` is used only during
  // this call. options.device: the CUDA device of this rank; -1: the calling thread's current one.
  static Result<std::unique_ptr<NcclCommunicator>> create(BootstrapStore& store,
                                                          const CommunicatorOptions& options,
                                                          std::stop_token stop = {});

  // The CUDA device this rank runs on.
  virtual int device() const = 0;

  // The stream the next operations are enqueued on: the communicator's own (created non-blocking
  // on device(), destroyed with the communicator) unless setStream() chose another.
  virtual cudaStream_t stream() const = 0;
  // Enqueues the operations issued from now on on `stream`, which must belong to device() and
  // outlive its use here; nullptr: back to the communicator's own stream. Operations issued
  // before keep their stream. Do not switch streams while other threads issue operations if their
  // relative order matters.
  virtual Status setStream(cudaStream_t stream) = 0;

  // One side of a point-to-point transfer, for sendRecv().
  struct PeerTransfer {
    enum class Direction { kSend, kRecv };
    Direction direction = Direction::kSend;
    void* data = nullptr;  // read for kSend, written for kRecv
    size_t count = 0;
    DataType type = DataType::kF32;
    int peer = 0;  // may be this rank (a local copy through NCCL)
  };
  // Sends and receives as one NCCL group (ncclGroupStart/End): none waits for the others to be
  // posted, so exchanges that depend on each other cannot deadlock. The n-th send from a to b
  // matches the n-th recv by b from a, counting send()/recv() too. One Work for all of them.
  virtual std::shared_ptr<Work> sendRecv(const std::vector<PeerTransfer>& transfers) = 0;
};

// The Communicator interface of NcclCommunicator::create(). The communicators that split() and
// shrink() return are NcclCommunicators too (asNccl() gives that view).
Result<std::unique_ptr<Communicator>> createNcclCommunicator(BootstrapStore& store,
                                                             const CommunicatorOptions& options);

// `comm` as an NcclCommunicator, or nullptr when it belongs to another backend.
NcclCommunicator* asNccl(Communicator& comm);

}  // namespace rally::collectives
