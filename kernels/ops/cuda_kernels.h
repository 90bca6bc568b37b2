// The CUDA implementation of rally::kernels::Kernels (kernels.h), and the choice at run time:
// CUDA where this build has it and a device exists, the CPU references otherwise. Every kernel
// takes device pointers and runs on the given stream; each multi-tensor operation is one launch
// driven by a table with one entry per tensor, whatever the number of tensors.
//
//   RALLY_ASSIGN_OR_RETURN(auto k, rally::kernels::cudaKernels({.device = local_rank}));
//   auto k = rally::kernels::kernelsFor(rally::kernels::Memory::kDevice);  // or the CPU ones
#pragma once

#include <memory>

#include "kernels/ops/kernels.h"

namespace rally::kernels {

struct CudaKernelsOptions {
  int device = 0;
  void* stream = nullptr;  // a cudaStream_t; nullptr: the legacy default stream
  // Elements of one tensor per thread block in pack, unpack and adamw: a multiple of 8 from 256
  // to 1,048,576. The benchmark's --chunks sweeps it (bench/README.md has the results).
  size_t chunk_elements = 1024;
};

// Unimplemented in a build without the CUDA toolkit; otherwise InvalidArgument for options out of
// range (checked first, device or not), and FailedPrecondition, naming why, when there is no
// usable device.
Result<std::unique_ptr<Kernels>> cudaKernels(const CudaKernelsOptions& options = {});
// The options' range checks alone (what cudaKernels checks first).
Status checkCudaKernelsOptions(const CudaKernelsOptions& options);

enum class Memory { kHost, kDevice };
// kHost: the CPU references. kDevice: the CUDA kernels, or the reason there are none.
Result<std::unique_ptr<Kernels>> kernelsFor(Memory memory, const CudaKernelsOptions& options = {});

}  // namespace rally::kernels
