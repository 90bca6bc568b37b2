// Candidate layouts of the block checksums' loads (kernel_bodies.h: ChecksumWarpRuns), launched
// by the benchmark beside the kernels' own, so that one run on a device can choose between them;
// and random bytes to check that every layout computes the same checksums.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace rally::kernels::bench {

// The segments per warp per turn the candidates are built for.
constexpr unsigned kWarpRunsSegments[] = {1, 2, 4};

// Copies XXH3's secret to the device; once, before checksumsWarpRuns.
cudaError_t prepareChecksumCandidates();

// The XXH3-64 of each `block` bytes of `bytes` at `data` (device memory, 16-byte aligned; block a
// multiple of 16) into `out` (device memory, a word per block), with ChecksumWarpRuns of
// `segments_per_warp` (one of kWarpRunsSegments). cudaErrorInvalidValue for anything else.
cudaError_t checksumsWarpRuns(unsigned segments_per_warp, const void* data, size_t bytes,
                              size_t block, std::uint64_t* out, cudaStream_t stream);

// The first bytes / 8 words at `data` (8-byte aligned) made pseudo-random, from `seed`.
cudaError_t fillRandom(void* data, size_t bytes, std::uint64_t seed, cudaStream_t stream);

}  // namespace rally::kernels::bench
