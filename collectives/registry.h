// Backends chosen at run time, by name or by what the job needs.
//
//   RALLY_ASSIGN_OR_RETURN(auto comm, createCommunicator("auto", store, options,
//                                                        {.device_memory = true}));
//
// Names: "gloo" (CPU, TCP or shared memory, elastic), "nccl" (CUDA devices, elastic, shrinks
// where NCCL can), "mpi" (Open MPI, fixed-size jobs started by mpirun or srun; cannot shrink), and
// "auto": the first backend, in that order of preference for the memory asked for (nccl for
// device memory; gloo, then mpi for host memory), that is available here and has every capability
// asked for. A backend is available when it was built (its library was found at build time) and
// can run now (nccl: a CUDA device; mpi: started by an MPI launcher).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives {

struct BackendInfo {
  std::string name;
  Capabilities capabilities;
  bool available = false;
  std::string unavailable_because;  // when !available: why, and what would make it available
};

// Every backend rally knows, built here or not.
std::vector<BackendInfo> listBackends();

// What the caller needs; "auto" picks a backend that has all of it.
struct Requirements {
  bool device_memory = false;  // CUDA buffers
  bool host_memory = false;    // host buffers (the default when device_memory is false)
  bool can_shrink = false;
  bool elastic = false;
};

// The backend `name` resolves to ("auto" resolved as above). InvalidArgument for an unknown name;
// Unavailable, naming every backend and why it does not fit, when none can serve.
Result<std::string> chooseBackend(std::string_view name, const Requirements& needs = {});

// Creates a communicator of the backend `name` resolves to. `store` bootstraps it (MPI ignores it).
Result<std::unique_ptr<Communicator>> createCommunicator(std::string_view name,
                                                         BootstrapStore& store,
                                                         const CommunicatorOptions& options,
                                                         const Requirements& needs = {});

}  // namespace rally::collectives
