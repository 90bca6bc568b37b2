// The Open MPI backend (CPU): for fixed-size jobs started by mpirun/mpiexec or by srun with
// PMI/PMIx, where MPI's own transports (shared memory between the ranks of a node, TCP, InfiniBand)
// carry the data. It cannot shrink or change size: a job that must survive the loss of a rank uses
// the gloo (CPU) or nccl (GPU) backend instead.
//
//   // started as: mpirun -n 4 ./train
//   if (launchedByMpi()) {
//     RALLY_ASSIGN_OR_RETURN(CommunicatorOptions options, mpiWorldOptions());
//     options.generation = g;
//     RALLY_ASSIGN_OR_RETURN(auto comm, createMpiCommunicator(options));
//     RALLY_RETURN_IF_ERROR(comm->allreduce(grads.data(), grads.size(), DataType::kF32,
//                                           ReduceOp::kAvg)->wait(Milliseconds(60'000)));
//   }
//
// How it works: each communicator owns a duplicate of MPI_COMM_WORLD (or, after split(), a
// communicator from MPI_Comm_split) with MPI_ERRORS_RETURN, and one executor thread that runs its
// operations one at a time in issue order through non-blocking MPI calls (MPI_Iallreduce, ...),
// completed by polling MPI_Test (a short spin, then sleeps of at most 200 us), so that abort() and
// CommunicatorOptions::op_timeout are noticed within a fraction of a millisecond. send() and recv()
// are posted in issue order without waiting for each other, so a rank may send and then receive.
// f16 and bf16, which MPI has no type for, are reduced by user-defined MPI_Ops that call
// internal::reduce; kAvg is a sum followed by internal::finishAverage.
//
// abort() and timeouts: MPI cannot cancel a collective that has started. abort(), from any thread,
// makes the in-flight operation and every later one fail at once with Aborted, but the MPI request
// of the in-flight operation is abandoned, not stopped: MPI may still read and write its buffers
// until the other ranks finish the operation. The communicator is unusable afterwards (destroy it;
// an MPI job restarts rather than recovers). An operation that runs past op_timeout fails with
// Timeout and aborts the communicator the same way, since its ranks no longer agree on which
// operation comes next.
//
// MPI in the process: the first createMpiCommunicator() or mpiWorldOptions() initialises MPI (once
// per process, with MPI_Init_thread asking for MPI_THREAD_MULTIPLE) unless the program already did,
// and then MPI_Finalize runs at process exit (std::atexit), after which no operation can run. If
// the program initialised MPI, the program finalizes it, after destroying every communicator. The
// backend calls MPI from its executor threads, so it needs at least MPI_THREAD_SERIALIZED: under
// MPI_THREAD_MULTIPLE (what it asks for, and what Open MPI gives) its threads call MPI freely;
// under MPI_THREAD_SERIALIZED (a program that initialised MPI itself at that level) it holds one
// process-wide lock around each of its MPI calls, and the program must not call MPI itself while
// a communicator has operations in flight, nor call split() on two communicators at once from two
// threads (MPI_Comm_split blocks while holding that lock). MPI_THREAD_SINGLE and
// MPI_THREAD_FUNNELED are refused with FailedPrecondition.
#pragma once

#include <memory>

#include "collectives/communicator.h"

namespace rally::collectives {

// True when this process was started by mpirun/mpiexec (Open MPI sets OMPI_COMM_WORLD_SIZE) or by
// srun with PMI/PMIx (PMI_SIZE, PMIX_RANK): the only jobs the MPI backend serves. Reads the
// environment only; MPI is not initialised.
bool launchedByMpi();

// Options whose rank and size are this process's rank and size in MPI_COMM_WORLD (initialising MPI
// if needed), the rest at their defaults. FailedPrecondition when the process was not started by an
// MPI launcher (and the program did not initialise MPI itself) or MPI's thread level is too low.
Result<CommunicatorOptions> mpiWorldOptions();

// A communicator over a duplicate of MPI_COMM_WORLD. Collective over MPI_COMM_WORLD: every process
// calls it, in the same order as its other createMpiCommunicator() calls, from one thread at a
// time; it fails with Timeout if not every process calls it within options.connect_timeout.
//
// options.rank: this process's rank in MPI_COMM_WORLD, or -1 to take MPI's; options.size: the size
// of MPI_COMM_WORLD, or 0 to take MPI's (mpiWorldOptions() fills both). A number that differs from
// MPI's is InvalidArgument naming both (MPI, not the caller, decides ranks in an MPI job).
// generation and name appear in every error message; op_timeout bounds each operation;
// check_calls is honoured; address, connect_timeout (beyond creation), shared_memory and device are
// not used (MPI chooses its transports).
Result<std::unique_ptr<Communicator>> createMpiCommunicator(const CommunicatorOptions& options);

}  // namespace rally::collectives
