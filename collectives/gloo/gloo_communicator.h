// The Gloo backend (CPU, TCP): the communicator the elastic tests run on. Bootstrapped through a
// BootstrapStore (the coordinator's store in a job) under "gloo/<generation>/<name>/"; abort()
// closes every connection, so an operation blocked on a peer returns at once; a dead peer surfaces
// as PeerLost when its connection breaks, and never later than CommunicatorOptions::op_timeout.
//
//   RALLY_ASSIGN_OR_RETURN(auto comm, createGlooCommunicator(store, {.rank = r, .size = n,
//                                                                    .generation = g}));
#pragma once

#include <memory>

#include "collectives/communicator.h"

namespace rally::collectives {

// Every rank calls this with the same size, generation and name; it returns once all are connected
// (or fails after options.connect_timeout, naming the ranks that did not come).
//
// `store` must outlive the communicator (split() bootstraps sub-communicators through it).
//
// It sets SIGPIPE to ignored if it is at its default: otherwise a write to the socket of a peer
// that just died kills this process instead of failing the operation with PeerLost (Python already
// ignores SIGPIPE; a handler the program installed is left alone).
//
// When every rank is on this host (and options.shared_memory), collectives go through one
// shared-memory segment (collectives/internal/shm_group.h) instead of TCP; send and recv stay on
// TCP. The segment's name is removed from /dev/shm as soon as every rank has opened it.
Result<std::unique_ptr<Communicator>> createGlooCommunicator(BootstrapStore& store,
                                                             const CommunicatorOptions& options);

// Whether `comm` (a Gloo communicator) moves collective data through shared memory.
bool usesSharedMemory(const Communicator& comm);

}  // namespace rally::collectives
