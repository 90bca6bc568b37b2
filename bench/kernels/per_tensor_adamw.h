// The bench's baselines. For the fused multi-tensor AdamW: one plain launch per tensor, with the
// tensor's pointers as kernel arguments (no chunk table to upload), the shape of a framework's
// per-tensor optimizer step. A framework's non-foreach AdamW launches several kernels per tensor,
// so this baseline is the faster one, and the fused kernel's speedup over it an understatement.
#pragma once

#include <cuda_runtime.h>

#include "kernels/ops/kernels.h"

namespace rally::kernels::bench {

// One AdamW step on one tensor (as Kernels::adamw computes it), launched on `stream`.
cudaError_t adamwOneTensor(const AdamWTensor& t, const AdamWOptions& o, cudaStream_t stream);

// A second reference beside the copy, for the kernels that only read (the checksums): `bytes`
// (a multiple of 16, 16-byte aligned) read once in 16-byte loads, four in flight per thread, and
// folded into one word per block at `sink` (device memory, a word per block of 256 threads: at
// most 65535 x 8 blocks), so that no load can be left out.
cudaError_t readOnce(const void* data, size_t bytes, std::uint64_t* sink, cudaStream_t stream);

}  // namespace rally::kernels::bench
