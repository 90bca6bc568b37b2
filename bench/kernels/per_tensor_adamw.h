// The bench's baseline for the fused multi-tensor AdamW: one plain launch per tensor, with the
// tensor's pointers as kernel arguments (no chunk table to upload), the shape of a framework's
// per-tensor optimizer step. A framework's non-foreach AdamW launches several kernels per tensor,
// so this baseline is the faster one, and the fused kernel's speedup over it an understatement.
#pragma once

#include <cuda_runtime.h>

#include "kernels/ops/kernels.h"

namespace rally::kernels::bench {

// One AdamW step on one tensor (as Kernels::adamw computes it), launched on `stream`.
cudaError_t adamwOneTensor(const AdamWTensor& t, const AdamWOptions& o, cudaStream_t stream);

}  // namespace rally::kernels::bench
