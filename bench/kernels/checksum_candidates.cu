#include "bench/kernels/checksum_candidates.h"

#define XXH_INLINE_ALL  // only for XXH3_kSecret, copied to the device
#include <xxhash.h>

#include <algorithm>

#include "kernels/ops/internal/device_block.h"
#include "kernels/ops/internal/kernel_bodies.h"

namespace rally::kernels::bench {
namespace {

using namespace internal;  // NOLINT(google-build-using-namespace): the kernel bodies

__device__ __align__(16) std::uint8_t kSecret[portable::kSecretSize];

// Registers for eight blocks per multiprocessor with one segment per warp, as cuda_kernels.cu
// launches its own layout; with more, a thread holds 8 registers of loads per segment across the
// chain, and asks for fewer blocks so as not to spill (six with two, four with four).
template <unsigned kSegmentsPerWarp>
__global__ void __launch_bounds__(kThreads, kSegmentsPerWarp == 1   ? 8
                                            : kSegmentsPerWarp == 2 ? 6
                                                                    : 4)
    warpRuns(const std::uint8_t* data, size_t bytes, size_t block, std::uint64_t* out) {
  using Layout = ChecksumWarpRuns<kSegmentsPerWarp>;
  __shared__ ChecksumShared<Layout> shared;
  checksumBody<16, Layout>(DeviceBlock{}, shared, kSecret, data, bytes, block, out);
}

__global__ void fillWords(std::uint64_t* data, size_t n, std::uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    data[i] = z ^ (z >> 31);
  }
}

}  // namespace

cudaError_t prepareChecksumCandidates() {
  return cudaMemcpyToSymbol(kSecret, XXH3_kSecret, portable::kSecretSize);
}

cudaError_t checksumsWarpRuns(unsigned segments_per_warp, const void* data, size_t bytes,
                              size_t block, std::uint64_t* out, cudaStream_t stream) {
  const auto* in = static_cast<const std::uint8_t*>(data);
  if (block == 0 || checksumAlignment(in, block) != 16) return cudaErrorInvalidValue;
  const size_t blocks = (bytes + block - 1) / block;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const auto grid = static_cast<unsigned>(blocks);
  switch (segments_per_warp) {
    case 1:
      warpRuns<1><<<grid, kThreads, 0, stream>>>(in, bytes, block, out);
      break;
    case 2:
      warpRuns<2><<<grid, kThreads, 0, stream>>>(in, bytes, block, out);
      break;
    case 4:
      warpRuns<4><<<grid, kThreads, 0, stream>>>(in, bytes, block, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t fillRandom(void* data, size_t bytes, std::uint64_t seed, cudaStream_t stream) {
  const size_t n = bytes / 8;
  const size_t blocks = std::min<size_t>((n + 255) / 256, 65535u * 8u);
  if (n == 0) return cudaSuccess;
  fillWords<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<std::uint64_t*>(data), n,
                                                               seed);
  return cudaGetLastError();
}

}  // namespace rally::kernels::bench
