#include <fmt/format.h>

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

Status checkCudaKernelsOptions(const CudaKernelsOptions& options) {
  const size_t c = options.chunk_elements;
  if (c < 256 || c > (1u << 20) || c % 8 != 0) {
    return invalidArgument(fmt::format(
        "CudaKernelsOptions::chunk_elements {}: expected a multiple of 8 from 256 to 1048576 "
        "(elements of one tensor per thread block; default 1024)",
        c));
  }
  return okStatus();
}

Result<std::unique_ptr<Kernels>> kernelsFor(Memory memory, const CudaKernelsOptions& options) {
  if (memory == Memory::kHost) return cpuKernels();
  return cudaKernels(options);
}

}  // namespace rally::kernels
