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

__global__ void __launch_bounds__(256) readWords(const uint4* data, size_t n, std::uint64_t* sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  std::uint64_t acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += 4 * stride) {
    uint4 w[4];
    for (int k = 0; k < 4; ++k) w[k] = i + k * stride < n ? data[i + k * stride] : uint4{};
    for (int k = 0; k < 4; ++k)
      acc ^= (static_cast<std::uint64_t>(w[k].x ^ w[k].z) << 32) ^ (w[k].y ^ w[k].w);
  }
  for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0)
    atomicXor(reinterpret_cast<unsigned long long*>(&sink[blockIdx.x]), acc);
}

}  // namespace

cudaError_t readOnce(const void* data, size_t bytes, std::uint64_t* sink, cudaStream_t stream) {
  const size_t n = bytes / 16, threads = (n + 3) / 4;
  const size_t blocks = (threads + 255) / 256;
  readWords<<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0, stream>>>(
      static_cast<const uint4*>(data), n, sink);
  return cudaGetLastError();
}

cudaError_t adamwOneTensor(const AdamWTensor& t, const AdamWOptions& o, cudaStream_t stream) {
  if (t.count == 0) return cudaSuccess;
  const p::AdamWStep s = p::adamwStep(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.step);
  const size_t blocks = (t.count + 255) / 256;
  adamwOne<<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0, stream>>>(
      t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.bf16_param, t.count, s);
  return cudaGetLastError();
}

}  // namespace rally::kernels::bench
