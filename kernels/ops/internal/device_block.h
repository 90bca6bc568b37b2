// A GPU's thread block as internal/kernel_bodies.h's bodies see it (the emulated one is
// tests/unit/kernels/emulated_grid.h). CUDA code only: cuda_kernels.cu, and the benchmark's
// launches of candidate layouts (bench/kernels).
#pragma once

#include <cuda_runtime.h>

namespace rally::kernels::internal {

struct DeviceBlock {
  __device__ unsigned index() const { return blockIdx.x; }
  __device__ unsigned count() const { return gridDim.x; }
  __device__ unsigned size() const { return blockDim.x; }
  template <class F>
  __device__ void each(F&& f) const {
    f(threadIdx.x);
  }
  __device__ void sync() const { __syncthreads(); }
  __device__ void flagIfAny(bool bad, int* flag) const {
    // A plain store: every writer writes 1, and the flag is host memory (no atomics over PCIe).
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0)
      *static_cast<volatile int*>(flag) = 1;
  }
};

}  // namespace rally::kernels::internal
