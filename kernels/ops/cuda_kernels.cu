// The CUDA kernels. Each multi-tensor operation is one launch over a table of chunks (at most
// kChunk elements of one tensor each, one thread block per chunk), uploaded with the launch from
// page-locked memory owned by this object; element math is portable.h's, shared with the CPU
// references, so both round the same way.
#include <cuda_runtime.h>
#include <fmt/format.h>

#define XXH_INLINE_ALL  // only for XXH3_kSecret, copied to the device
#include <xxhash.h>

#include <cmath>
#include <vector>

#include "kernels/ops/cuda_kernels.h"
#include "kernels/ops/portable.h"

namespace rally::kernels {
namespace {

namespace p = portable;

constexpr int kThreads = 256;
constexpr size_t kChunk = 16384;  // elements per thread block

__constant__ std::uint8_t kSecretOnDevice[p::kSecretSize];

Status cudaStatus(cudaError_t e, const char* what, const char* file, int line) {
  return unavailable(fmt::format("{}: {} ({}) at {}:{}", what, cudaGetErrorString(e),
                                 cudaGetErrorName(e), file, line));
}
#define RALLY_CUDA(call)                                                     \
  do {                                                                       \
    const cudaError_t rally_e = (call);                                      \
    if (rally_e != cudaSuccess) return cudaStatus(rally_e, #call, __FILE__, __LINE__); \
  } while (0)

struct CopyChunk {
  const unsigned char* src;
  unsigned char* dst;
  size_t bytes;
};

__global__ void copyChunks(const CopyChunk* chunks) {
  const CopyChunk c = chunks[blockIdx.x];
  const auto addr = reinterpret_cast<std::uintptr_t>(c.src) | reinterpret_cast<std::uintptr_t>(c.dst);
  size_t done = 0;
  if ((addr & 15) == 0) {  // both 16-byte aligned: vector loads and stores
    const size_t n = c.bytes / 16;
    const auto* s = reinterpret_cast<const uint4*>(c.src);
    auto* d = reinterpret_cast<uint4*>(c.dst);
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
    done = n * 16;
  } else if ((addr & 3) == 0) {
    const size_t n = c.bytes / 4;
    const auto* s = reinterpret_cast<const std::uint32_t*>(c.src);
    auto* d = reinterpret_cast<std::uint32_t*>(c.dst);
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
    done = n * 4;
  }
  for (size_t i = done + threadIdx.x; i < c.bytes; i += blockDim.x) c.dst[i] = c.src[i];
}

template <DType T>
__device__ float loadAs(const void* d, size_t i) {
  if constexpr (T == DType::kF32) return static_cast<const float*>(d)[i];
  if constexpr (T == DType::kF16) return p::fromF16(static_cast<const std::uint16_t*>(d)[i]);
  return p::fromBf16(static_cast<const std::uint16_t*>(d)[i]);
}
template <DType T>
__device__ void storeAs(void* d, size_t i, float v) {
  if constexpr (T == DType::kF32) {
    static_cast<float*>(d)[i] = v;
  } else if constexpr (T == DType::kF16) {
    static_cast<std::uint16_t*>(d)[i] = p::toF16(v);
  } else {
    static_cast<std::uint16_t*>(d)[i] = p::toBf16(v);
  }
}

template <DType T>
__global__ void scaleCheck(void* data, size_t n, float factor, int* nonfinite) {
  bool bad = false;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    storeAs<T>(data, i, loadAs<T>(data, i) * factor);
    bad = bad || !p::finite(loadAs<T>(data, i));
  }
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(nonfinite, 1);
}

__global__ void compress(const float* in, float* residual, std::uint16_t* out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float want = in[i] + residual[i];
    const std::uint16_t b = p::toBf16(want);
    out[i] = b;
    residual[i] = want - p::fromBf16(b);
  }
}

__global__ void decompress(const std::uint16_t* in, float* out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] = p::fromBf16(in[i]);
  }
}

// One thread block per checksum block, with XXH3's long path split as portable.h describes:
// the block's 1 KiB segments in groups of kSegmentsPerGroup, each thread adding up one lane of
// one segment (16 stripes, all loads independent), then 8 threads chaining the group's scrambles;
// then the tail and the merge. Blocks of 240 bytes or less take the short paths on one thread.
constexpr int kSumThreads = 256;
constexpr int kSegmentsPerGroup = kSumThreads / 8;

template <bool kAligned>
__global__ void checksums(const std::uint8_t* data, size_t bytes, size_t block, std::uint64_t* out) {
  __shared__ std::uint8_t secret[p::kSecretSize];
  __shared__ std::uint64_t contribution[kSegmentsPerGroup][8];
  __shared__ std::uint64_t acc[8];
  const int t = static_cast<int>(threadIdx.x), lane = t % 8, slot = t / 8;
  const size_t b = blockIdx.x;
  const std::uint8_t* in = data + b * block;
  const size_t len = bytes - b * block < block ? bytes - b * block : block;
  for (int i = t; i < static_cast<int>(p::kSecretSize); i += kSumThreads) {
    secret[i] = kSecretOnDevice[i];  // shared: lanes read different secret words at once
  }
  if (t < 8) acc[t] = p::xxh3InitLane(t);
  __syncthreads();
  if (len <= 240) {
    if (t == 0) out[b] = p::xxh3(in, len, secret);
    return;
  }
  const size_t full = p::xxh3FullSegments(len);
  for (size_t first = 0; first < full; first += kSegmentsPerGroup) {
    const size_t seg = first + static_cast<size_t>(slot);
    contribution[slot][lane] = seg < full ? p::xxh3SegmentLane<kAligned>(in, seg, secret, lane) : 0;
    __syncthreads();
    if (t < 8) {
      std::uint64_t a = acc[t];
      const size_t n = full - first < kSegmentsPerGroup ? full - first : kSegmentsPerGroup;
      for (size_t j = 0; j < n; ++j) a = p::xxh3Chain(a, contribution[j][t], secret, t);
      acc[t] = a;
    }
    __syncthreads();  // the chain has read the contributions before the next group writes them
  }
  if (t < 8) acc[t] += p::xxh3LongTailLane(in, len, secret, t);
  __syncthreads();
  if (t == 0) out[b] = p::xxh3LongMerge(acc, len, secret);
}

struct AdamWChunk {
  float* param;
  const float* grad;
  float* m;
  float* v;
  std::uint16_t* bf16;
  size_t count;
};

__global__ void adamwChunks(const AdamWChunk* chunks, p::AdamWStep s) {
  const AdamWChunk c = chunks[blockIdx.x];
  for (size_t i = threadIdx.x; i < c.count; i += blockDim.x) {
    p::adamwElement(&c.param[i], c.grad[i], &c.m[i], &c.v[i], s);
    if (c.bf16 != nullptr) c.bf16[i] = p::toBf16(c.param[i]);
  }
}

unsigned gridFor(size_t n) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<size_t>(std::max<size_t>(blocks, 1), 65535u * 8u));
}

class CudaKernels final : public Kernels {
 public:
  CudaKernels(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~CudaKernels() override {
    (void)cudaSetDevice(device_);
    (void)cudaStreamSynchronize(stream_);
    cudaFreeHost(host_table_);
    cudaFree(device_table_);
    cudaFreeHost(host_flag_);
    cudaFree(device_flag_);
    cudaFree(device_sums_);
    if (uploaded_ != nullptr) cudaEventDestroy(uploaded_);
  }

  Status init() {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming));
    RALLY_CUDA(cudaMemcpyToSymbol(kSecretOnDevice, XXH3_kSecret, p::kSecretSize));
    RALLY_CUDA(cudaHostAlloc(&host_flag_, sizeof(int), cudaHostAllocDefault));
    RALLY_CUDA(cudaMalloc(&device_flag_, sizeof(int)));
    return okStatus();
  }

  std::string_view name() const override { return "cuda"; }

  Status pack(const std::vector<ConstTensorView>& tensors, void* bucket, DType type) override {
    const size_t es = dtypeSize(type);
    std::vector<CopyChunk> chunks;
    auto* out = static_cast<unsigned char*>(bucket);
    for (const ConstTensorView& t : tensors) {
      split(static_cast<const unsigned char*>(t.data), out, t.count * es, es, &chunks);
      out += t.count * es;
    }
    return launchCopies(chunks);
  }

  Status unpack(const void* bucket, const std::vector<TensorView>& tensors, DType type) override {
    const size_t es = dtypeSize(type);
    std::vector<CopyChunk> chunks;
    const auto* in = static_cast<const unsigned char*>(bucket);
    for (const TensorView& t : tensors) {
      split(in, static_cast<unsigned char*>(t.data), t.count * es, es, &chunks);
      in += t.count * es;
    }
    return launchCopies(chunks);
  }

  Result<bool> scaleAndCheck(void* data, size_t count, DType type, float factor) override {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaMemsetAsync(device_flag_, 0, sizeof(int), stream_));
    if (count > 0) {
      switch (type) {
        case DType::kF32:
          scaleCheck<DType::kF32><<<gridFor(count), kThreads, 0, stream_>>>(data, count, factor, device_flag_);
          break;
        case DType::kF16:
          scaleCheck<DType::kF16><<<gridFor(count), kThreads, 0, stream_>>>(data, count, factor, device_flag_);
          break;
        case DType::kBF16:
          scaleCheck<DType::kBF16><<<gridFor(count), kThreads, 0, stream_>>>(data, count, factor, device_flag_);
          break;
      }
      RALLY_CUDA(cudaGetLastError());
    }
    RALLY_CUDA(cudaMemcpyAsync(host_flag_, device_flag_, sizeof(int), cudaMemcpyDeviceToHost, stream_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return *host_flag_ == 0;
  }

  Status compressBf16(const float* in, float* residual, std::uint16_t* out, size_t count) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    compress<<<gridFor(count), kThreads, 0, stream_>>>(in, residual, out, count);
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status decompressBf16(const std::uint16_t* in, float* out, size_t count) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    decompress<<<gridFor(count), kThreads, 0, stream_>>>(in, out, count);
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status blockChecksums(const void* data, size_t bytes, size_t block_bytes,
                        std::uint64_t* out) override {
    if (block_bytes == 0) return invalidArgument("blockChecksums: block_bytes must be positive");
    const size_t blocks = (bytes + block_bytes - 1) / block_bytes;
    if (blocks == 0) return okStatus();
    if (blocks > 0x7fffffffu) {
      return invalidArgument(fmt::format(
          "blockChecksums: {} blocks of {} bytes are more than one launch takes (2^31 - 1); use "
          "larger blocks",
          blocks, block_bytes));
    }
    RALLY_CUDA(cudaSetDevice(device_));
    if (blocks > sums_capacity_) {
      cudaFree(device_sums_);
      device_sums_ = nullptr;
      RALLY_CUDA(cudaMalloc(&device_sums_, blocks * sizeof(std::uint64_t)));
      sums_capacity_ = blocks;
    }
    const auto* in = static_cast<const std::uint8_t*>(data);
    const bool aligned = reinterpret_cast<std::uintptr_t>(in) % 8 == 0 && block_bytes % 8 == 0;
    const unsigned grid = static_cast<unsigned>(blocks);
    if (aligned) {
      checksums<true><<<grid, kSumThreads, 0, stream_>>>(in, bytes, block_bytes, device_sums_);
    } else {
      checksums<false><<<grid, kSumThreads, 0, stream_>>>(in, bytes, block_bytes, device_sums_);
    }
    RALLY_CUDA(cudaGetLastError());
    RALLY_CUDA(cudaMemcpyAsync(out, device_sums_, blocks * sizeof(std::uint64_t),
                               cudaMemcpyDeviceToHost, stream_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return okStatus();
  }

  Status adamw(const std::vector<AdamWTensor>& tensors, const AdamWOptions& o) override {
    if (o.step < 1) return invalidArgument(fmt::format("adamw: step {} (steps start at 1)", o.step));
    std::vector<AdamWChunk> chunks;
    for (const AdamWTensor& t : tensors) {
      for (size_t at = 0; at < t.count; at += kChunk) {
        const size_t n = std::min(kChunk, t.count - at);
        chunks.push_back({t.param + at, t.grad + at, t.exp_avg + at, t.exp_avg_sq + at,
                          t.bf16_param != nullptr ? t.bf16_param + at : nullptr, n});
      }
    }
    if (chunks.empty()) return okStatus();
    const p::AdamWStep s = p::adamwStep(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.step);
    RALLY_ASSIGN_OR_RETURN(void* table, upload(chunks.data(), chunks.size() * sizeof(AdamWChunk)));
    adamwChunks<<<static_cast<unsigned>(chunks.size()), kThreads, 0, stream_>>>(
        static_cast<const AdamWChunk*>(table), s);
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status synchronize() override {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return okStatus();
  }

 private:
  static void split(const unsigned char* src, unsigned char* dst, size_t bytes, size_t es,
                    std::vector<CopyChunk>* chunks) {
    const size_t step = kChunk * es;
    for (size_t at = 0; at < bytes; at += step) {
      chunks->push_back({src + at, dst + at, std::min(step, bytes - at)});
    }
  }

  Status launchCopies(const std::vector<CopyChunk>& chunks) {
    if (chunks.empty()) return okStatus();
    RALLY_ASSIGN_OR_RETURN(void* table, upload(chunks.data(), chunks.size() * sizeof(CopyChunk)));
    copyChunks<<<static_cast<unsigned>(chunks.size()), kThreads, 0, stream_>>>(
        static_cast<const CopyChunk*>(table));
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  // The chunk table to the device, on the stream (the page-locked copy is reused once the
  // previous upload is done).
  Result<void*> upload(const void* table, size_t bytes) {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaEventSynchronize(uploaded_));
    if (bytes > table_capacity_) {
      cudaFreeHost(host_table_);
      cudaFree(device_table_);
      host_table_ = nullptr;
      device_table_ = nullptr;
      table_capacity_ = 0;
      RALLY_CUDA(cudaHostAlloc(&host_table_, bytes, cudaHostAllocDefault));
      RALLY_CUDA(cudaMalloc(&device_table_, bytes));
      table_capacity_ = bytes;
    }
    std::memcpy(host_table_, table, bytes);
    RALLY_CUDA(cudaMemcpyAsync(device_table_, host_table_, bytes, cudaMemcpyHostToDevice, stream_));
    RALLY_CUDA(cudaEventRecord(uploaded_, stream_));
    return device_table_;
  }

  int device_;
  cudaStream_t stream_;
  cudaEvent_t uploaded_ = nullptr;
  void* host_table_ = nullptr;
  void* device_table_ = nullptr;
  size_t table_capacity_ = 0;
  int* host_flag_ = nullptr;
  int* device_flag_ = nullptr;
  std::uint64_t* device_sums_ = nullptr;
  size_t sums_capacity_ = 0;
};

}  // namespace

Result<std::unique_ptr<Kernels>> cudaKernels(const CudaKernelsOptions& options) {
  int n = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    return failedPrecondition(fmt::format(
        "no CUDA device for the CUDA kernels ({})",
        e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found none"));
  }
  if (options.device < 0 || options.device >= n) {
    return invalidArgument(fmt::format("CUDA device {} does not exist (this machine has {})",
                                       options.device, n));
  }
  auto k = std::make_unique<CudaKernels>(options.device, static_cast<cudaStream_t>(options.stream));
  RALLY_RETURN_IF_ERROR(k->init()) << "starting the CUDA kernels on device " << options.device;
  return std::unique_ptr<Kernels>(std::move(k));
}

}  // namespace rally::kernels
