#include "kernels/ops/cuda_kernels.h"
#include "rally/config.h"

namespace rally::kernels {

#if !RALLY_HAVE_CUDA
Result<std::unique_ptr<Kernels>> cudaKernels(const CudaKernelsOptions&) {
  return unimplemented(
      "this build of rally has no CUDA kernels (the CUDA toolkit was not found when it was "
      "configured); the CPU references are kernelsFor(Memory::kHost)");
}
#endif

Result<std::unique_ptr<Kernels>> kernelsFor(Memory memory, const CudaKernelsOptions& options) {
  if (memory == Memory::kHost) return cpuKernels();
  return cudaKernels(options);
}

}  // namespace rally::kernels
