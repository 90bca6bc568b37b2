#include "collectives/registry.h"

#include <fmt/format.h>

#include "rally/config.h"
#if RALLY_HAVE_GLOO
#include "collectives/gloo/gloo_communicator.h"
#endif
#if RALLY_HAVE_MPI
#include "collectives/mpi/mpi_communicator.h"
#endif
#if RALLY_HAVE_NCCL
#include <cuda_runtime_api.h>

#include "collectives/nccl/nccl_communicator.h"
#endif

namespace rally::collectives {
namespace {

BackendInfo glooInfo() {
  BackendInfo b{.name = "gloo",
                .capabilities = {.host_memory = true, .can_shrink = true, .elastic = true}};
#if RALLY_HAVE_GLOO
  b.available = true;
#else
  b.unavailable_because = "rally was built without Gloo (install libgloo-dev and rebuild)";
#endif
  return b;
}

BackendInfo ncclInfo() {
  BackendInfo b{.name = "nccl", .capabilities = {.device_memory = true, .elastic = true}};
#if RALLY_HAVE_NCCL
  b.capabilities = ncclCapabilities();
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    b.unavailable_because =
        fmt::format("no CUDA device here ({})",
                    err != cudaSuccess ? cudaGetErrorString(err) : "the driver reports none");
  } else {
    b.available = true;
  }
#else
  b.unavailable_because =
      "rally was built without NCCL (it needs the CUDA toolkit and NCCL at build time)";
#endif
  return b;
}

BackendInfo mpiInfo() {
  BackendInfo b{.name = "mpi", .capabilities = {.host_memory = true, .needs_launcher = true}};
#if RALLY_HAVE_MPI
  if (launchedByMpi()) {
    b.available = true;
  } else {
    b.unavailable_because =
        "this process was not started by mpirun or srun (the MPI backend serves only such "
        "fixed-size jobs)";
  }
#else
  b.unavailable_because = "rally was built without MPI (install libopenmpi-dev and rebuild)";
#endif
  return b;
}

// Why `b` does not meet `needs`, or "" when it does.
std::string misfit(const BackendInfo& b, const Requirements& needs) {
  const bool host = needs.host_memory || !needs.device_memory;
  if (needs.device_memory && !b.capabilities.device_memory) return "no device memory";
  if (host && !b.capabilities.host_memory) return "no host memory";
  if (needs.can_shrink && !b.capabilities.can_shrink) return "cannot shrink";
  if (needs.elastic && !b.capabilities.elastic) return "not elastic";
  return "";
}

}  // namespace

std::vector<BackendInfo> listBackends() { return {ncclInfo(), glooInfo(), mpiInfo()}; }

Result<std::string> chooseBackend(std::string_view name, const Requirements& needs) {
  const auto all = listBackends();
  if (name != "auto") {
    for (const auto& b : all) {
      if (b.name != name) continue;
      if (!b.available) {
        return unavailable(fmt::format("collectives backend '{}' is unavailable: {}", name,
                                       b.unavailable_because));
      }
      if (const std::string why = misfit(b, needs); !why.empty()) {
        return invalidArgument(
            fmt::format("collectives backend '{}' does not fit this job: {}", name, why));
      }
      return b.name;
    }
    return invalidArgument(
        fmt::format("unknown collectives backend '{}': use gloo, nccl, mpi or auto", name));
  }
  std::string reasons;
  for (const auto& b : all) {
    std::string why = b.available ? misfit(b, needs) : b.unavailable_because;
    if (why.empty()) return b.name;
    reasons += fmt::format("{}{}: {}", reasons.empty() ? "" : "; ", b.name, why);
  }
  return unavailable(fmt::format("no collectives backend fits this job ({})", reasons));
}

Result<std::unique_ptr<Communicator>> createCommunicator(std::string_view name,
                                                         BootstrapStore& store,
                                                         const CommunicatorOptions& options,
                                                         const Requirements& needs) {
  RALLY_ASSIGN_OR_RETURN(const std::string chosen, chooseBackend(name, needs));
#if RALLY_HAVE_NCCL
  if (chosen == "nccl") return createNcclCommunicator(store, options);
#endif
#if RALLY_HAVE_GLOO
  if (chosen == "gloo") return createGlooCommunicator(store, options);
#endif
#if RALLY_HAVE_MPI
  if (chosen == "mpi") return createMpiCommunicator(options);
#endif
  return internalError(fmt::format("backend '{}' was chosen but is not built", chosen));
}

}  // namespace rally::collectives
