#include "bench/kernels/per_tensor_adamw.h"
#include "kernels/ops/portable.h"

namespace rally::kernels::bench {
namespace {

namespace p = portable;

__global__ void adamwOne(float* param, const float* grad, float* m, float* v, std::uint16_t* bf16,
                         size_t n, p::AdamWStep s) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p::adamwElement(&param[i], grad[i], &m[i], &v[i], s);
    if (bf16 != nullptr) bf16[i] = p::toBf16(param[i]);
  }
}

}  // namespace

cudaError_t adamwOneTensor(const AdamWTensor& t, const AdamWOptions& o, cudaStream_t stream) {
  if (t.count == 0) return cudaSuccess;
  const p::AdamWStep s = p::adamwStep(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.step);
  const size_t blocks = (t.count + 255) / 256;
  adamwOne<<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0, stream>>>(
      t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.bf16_param, t.count, s);
  return cudaGetLastError();
}

}  // namespace rally::kernels::bench
