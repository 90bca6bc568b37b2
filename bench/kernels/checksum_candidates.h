// Candidate arrangements of the block checksums (kernel_bodies.h: the layouts of a turn's loads,
// and checksum blocks per thread block), launched by the benchmark beside the
// kernels' own, so that one run on a device can choose between them; and random bytes to check
// that every candidate computes the same checksums.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace rally::kernels::bench {

enum class ChecksumLayout {
  kLanePairs,  // the kernels' own: ChecksumLanePairs
  kWarpRuns1,  // ChecksumWarpRuns<1>, <2>, <4>: segments per warp per turn
  kWarpRuns2,
  kWarpRuns4,
};

struct ChecksumCandidate {
  const char* name;  // a row of the benchmark
  ChecksumLayout layout;
  // Checksum blocks per thread block. 1: kernel_bodies.h's checksumBody, as the kernels launch it
  // (with this layout). More: checksumGroupBody, each block's chain and merge overlapping the next
  // block's loads. 0: checksumGroupBody with as many as make the launch one wave (every thread
  // block resident at once).
  unsigned per_thread_block;
};

// What the benchmark times, after the kernels' own (lane pairs, one block per thread block).
constexpr ChecksumCandidate kChecksumCandidates[] = {
    {"lane pairs x2", ChecksumLayout::kLanePairs, 2},
    {"lane pairs x4", ChecksumLayout::kLanePairs, 4},
    {"lane pairs, one wave", ChecksumLayout::kLanePairs, 0},
    {"warp runs 1", ChecksumLayout::kWarpRuns1, 1},
    {"warp runs 2", ChecksumLayout::kWarpRuns2, 1},
    {"warp runs 4", ChecksumLayout::kWarpRuns4, 1},
    {"warp runs 1 x2", ChecksumLayout::kWarpRuns1, 2},
    {"warp runs 4 x2", ChecksumLayout::kWarpRuns4, 2},
    {"warp runs 2, one wave", ChecksumLayout::kWarpRuns2, 0},
};

// Copies XXH3's secret to the device; once, before checksumsCandidate.
cudaError_t prepareChecksumCandidates();

// The XXH3-64 of each `block` bytes of `bytes` at `data` (device memory, 16-byte aligned; block a
// multiple of 16) into `out` (device memory, a word per block), as candidate `c` computes them.
// cudaErrorInvalidValue for anything else.
cudaError_t checksumsCandidate(const ChecksumCandidate& c, const void* data, size_t bytes,
                               size_t block, std::uint64_t* out, cudaStream_t stream);

// The first bytes / 8 words at `data` (8-byte aligned) made pseudo-random, from `seed`.
cudaError_t fillRandom(void* data, size_t bytes, std::uint64_t seed, cudaStream_t stream);

}  // namespace rally::kernels::bench
