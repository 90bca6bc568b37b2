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

// One checksum block per thread block, checksumBody as the kernels launch it: registers for eight
// blocks per multiprocessor with lane pairs or one segment per warp; with more segments per warp,
// a thread holds 8 registers of loads per segment across the chain, and asks for fewer blocks so
// as not to spill (six with two, four with four).
template <class Layout>
constexpr int kBlocksPerSm = 8;
template <>
constexpr int kBlocksPerSm<ChecksumWarpRuns<2>> = 6;
template <>
constexpr int kBlocksPerSm<ChecksumWarpRuns<4>> = 4;

template <class Layout>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<Layout>)
    single(const std::uint8_t* data, size_t bytes, size_t block, size_t, std::uint64_t* out) {
  __shared__ ChecksumShared<Layout> shared;
  checksumBody<16, Layout>(DeviceBlock{}, shared, kSecret, data, bytes, block, out);
}

// Several checksum blocks per thread block (checksumGroupBody): half the thread blocks at two per
// thread block already, so registers for four per multiprocessor (enough for one wave of 64 MiB
// at two per thread block on an H100 or H200), where it needs more than 32 not to spill.
template <class Layout>
__global__ void __launch_bounds__(kThreads, 4)
    group(const std::uint8_t* data, size_t bytes, size_t block, size_t per_thread_block,
          std::uint64_t* out) {
  __shared__ ChecksumShared<Layout, 2> shared;
  checksumGroupBody<16, Layout>(DeviceBlock{}, shared, kSecret, data, bytes, block,
                                per_thread_block, out);
}

using Kernel = void (*)(const std::uint8_t*, size_t, size_t, size_t, std::uint64_t*);

template <class Layout>
cudaError_t launch(const std::uint8_t* in, size_t bytes, size_t block, size_t blocks,
                   unsigned per_thread_block, std::uint64_t* out, cudaStream_t stream) {
  const Kernel kernel = per_thread_block == 1 ? single<Layout> : group<Layout>;
  size_t per = per_thread_block;
  if (per == 0) {  // one wave: as many thread blocks as are resident at once
    int device = 0, sms = 0, resident = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, 0);
    }
    if (e != cudaSuccess) return e;
    const size_t wave = std::max<size_t>(1, static_cast<size_t>(sms) * resident);
    per = (blocks + wave - 1) / wave;
  }
  const size_t grid = (blocks + per - 1) / per;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(in, bytes, block, per, out);
  return cudaGetLastError();
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

cudaError_t checksumsCandidate(const ChecksumCandidate& c, const void* data, size_t bytes,
                               size_t block, std::uint64_t* out, cudaStream_t stream) {
  const auto* in = static_cast<const std::uint8_t*>(data);
  if (block == 0 || checksumAlignment(in, block) != 16) return cudaErrorInvalidValue;
  const size_t blocks = (bytes + block - 1) / block;
  if (blocks == 0) return cudaSuccess;
  const unsigned per = c.per_thread_block;
  switch (c.layout) {
    case ChecksumLayout::kLanePairs:
      return launch<ChecksumLanePairs>(in, bytes, block, blocks, per, out, stream);
    case ChecksumLayout::kWarpRuns1:
      return launch<ChecksumWarpRuns<1>>(in, bytes, block, blocks, per, out, stream);
    case ChecksumLayout::kWarpRuns2:
      return launch<ChecksumWarpRuns<2>>(in, bytes, block, blocks, per, out, stream);
    case ChecksumLayout::kWarpRuns4:
      return launch<ChecksumWarpRuns<4>>(in, bytes, block, blocks, per, out, stream);
  }
  return cudaErrorInvalidValue;
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
