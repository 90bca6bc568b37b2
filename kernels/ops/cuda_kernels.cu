// The CUDA kernels: launches of the bodies in internal/kernel_bodies.h (which the CPU tests also
// run, on an emulated grid). Each multi-tensor operation is one launch over a table of chunks (at
// most CudaKernelsOptions::chunk_elements of one tensor each, one thread block per chunk),
// uploaded with the launch from page-locked memory owned by this object (up to 16 uploads in
// flight); element math is portable.h's, shared with the CPU references, so both round the same
// way.
#include <cuda_runtime.h>
#include <fmt/format.h>

#define XXH_INLINE_ALL  // only for XXH3_kSecret, copied to the device
#include <xxhash.h>

#include <cmath>
#include <vector>

#include "kernels/ops/cuda_kernels.h"
#include "kernels/ops/internal/kernel_bodies.h"
#include "kernels/ops/portable.h"

namespace rally::kernels {
namespace {

namespace p = portable;
using namespace internal;  // NOLINT(google-build-using-namespace): the kernel bodies

__constant__ std::uint8_t kSecretOnDevice[p::kSecretSize];

Status cudaStatus(cudaError_t e, const char* what, const char* file, int line) {
  return unavailable(fmt::format("{}: {} ({}) at {}:{}", what, cudaGetErrorString(e),
                                 cudaGetErrorName(e), file, line));
}
#define RALLY_CUDA(call)                                                               \
  do {                                                                                 \
    const cudaError_t rally_e = (call);                                                \
    if (rally_e != cudaSuccess) return cudaStatus(rally_e, #call, __FILE__, __LINE__); \
  } while (0)

// A GPU's thread block, as kernel_bodies.h's bodies see it.
struct DeviceBlock {
  __device__ unsigned index() const { return blockIdx.x; }
  __device__ unsigned count() const { return gridDim.x; }
  __device__ unsigned size() const { return blockDim.x; }
  template <class F>
  __device__ void each(F&& f) const {
    f(threadIdx.x);
  }
  __device__ void sync() const { __syncthreads(); }
  __device__ void flagIfAny(bool bad, int* flag) const {
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(flag, 1);
  }
};

__global__ void copyChunks(const CopyChunk* chunks) { copyChunkBody(DeviceBlock{}, chunks); }

template <DType T>
__global__ void scaleCheck(void* data, size_t n, float factor, int* nonfinite) {
  scaleCheckBody<T>(DeviceBlock{}, data, n, factor, nonfinite);
}

__global__ void compress(const float* in, float* residual, std::uint16_t* out, size_t n) {
  compressBody(DeviceBlock{}, in, residual, out, n);
}

__global__ void decompress(const std::uint16_t* in, float* out, size_t n) {
  decompressBody(DeviceBlock{}, in, out, n);
}

template <bool kAligned>
__global__ void checksums(const std::uint8_t* data, size_t bytes, size_t block,
                          std::uint64_t* out) {
  __shared__ ChecksumShared shared;
  checksumBody<kAligned>(DeviceBlock{}, shared, kSecretOnDevice, data, bytes, block, out);
}

__global__ void adamwChunks(const AdamWChunk* chunks, p::AdamWStep s) {
  adamwChunkBody(DeviceBlock{}, chunks, s);
}

template <DType T>
void launchScaleCheck(void* data, size_t n, float factor, int* flag, cudaStream_t stream) {
  const size_t items = elementItems(n, scaleCheckVectors<T>(data, n), kPerVector<T>);
  scaleCheck<T><<<gridFor(items), kThreads, 0, stream>>>(data, n, factor, flag);
}

class CudaKernels final : public Kernels {
 public:
  CudaKernels(int device, cudaStream_t stream, size_t chunk)
      : device_(device), stream_(stream), chunk_(chunk) {}
  ~CudaKernels() override {
    (void)cudaSetDevice(device_);
    (void)cudaStreamSynchronize(stream_);
    for (TableSlot& slot : slots_) {
      cudaFreeHost(slot.host);
      cudaFree(slot.device);
      if (slot.uploaded != nullptr) cudaEventDestroy(slot.uploaded);
    }
    cudaFreeHost(host_flag_);
    cudaFree(device_flag_);
    cudaFree(device_sums_);
  }

  Status init() {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaMemcpyToSymbol(kSecretOnDevice, XXH3_kSecret, p::kSecretSize));
    RALLY_CUDA(cudaHostAlloc(&host_flag_, sizeof(int), cudaHostAllocDefault));
    RALLY_CUDA(cudaMalloc(&device_flag_, sizeof(int)));
    return okStatus();
  }

  std::string_view name() const override { return "cuda"; }

  Status pack(const std::vector<ConstTensorView>& tensors, void* bucket, DType type) override {
    return launchCopies(packChunks(tensors, bucket, type, chunk_));
  }

  Status unpack(const void* bucket, const std::vector<TensorView>& tensors, DType type) override {
    return launchCopies(unpackChunks(bucket, tensors, type, chunk_));
  }

  Result<bool> scaleAndCheck(void* data, size_t count, DType type, float factor) override {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaMemsetAsync(device_flag_, 0, sizeof(int), stream_));
    if (count > 0) {
      switch (type) {
        case DType::kF32:
          launchScaleCheck<DType::kF32>(data, count, factor, device_flag_, stream_);
          break;
        case DType::kF16:
          launchScaleCheck<DType::kF16>(data, count, factor, device_flag_, stream_);
          break;
        case DType::kBF16:
          launchScaleCheck<DType::kBF16>(data, count, factor, device_flag_, stream_);
          break;
      }
      RALLY_CUDA(cudaGetLastError());
    }
    RALLY_CUDA(
        cudaMemcpyAsync(host_flag_, device_flag_, sizeof(int), cudaMemcpyDeviceToHost, stream_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return *host_flag_ == 0;
  }

  Status compressBf16(const float* in, float* residual, std::uint16_t* out, size_t count) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    const size_t items = elementItems(count, compressVectors(in, residual, out, count), 4);
    compress<<<gridFor(items), kThreads, 0, stream_>>>(in, residual, out, count);
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status decompressBf16(const std::uint16_t* in, float* out, size_t count) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    const size_t items = elementItems(count, decompressVectors(in, out, count), 8);
    decompress<<<gridFor(items), kThreads, 0, stream_>>>(in, out, count);
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
    const unsigned grid = static_cast<unsigned>(blocks);
    if (checksumAligned(in, block_bytes)) {
      checksums<true><<<grid, kThreads, 0, stream_>>>(in, bytes, block_bytes, device_sums_);
    } else {
      checksums<false><<<grid, kThreads, 0, stream_>>>(in, bytes, block_bytes, device_sums_);
    }
    RALLY_CUDA(cudaGetLastError());
    RALLY_CUDA(cudaMemcpyAsync(out, device_sums_, blocks * sizeof(std::uint64_t),
                               cudaMemcpyDeviceToHost, stream_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return okStatus();
  }

  Status adamw(const std::vector<AdamWTensor>& tensors, const AdamWOptions& o) override {
    if (o.step < 1)
      return invalidArgument(fmt::format("adamw: step {} (steps start at 1)", o.step));
    std::vector<AdamWChunk> chunks;
    for (const AdamWTensor& t : tensors) splitAdamW(t, chunk_, &chunks);
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
  struct TableSlot {
    void* host = nullptr;  // page-locked
    void* device = nullptr;
    size_t capacity = 0;             // bytes, of each
    cudaEvent_t uploaded = nullptr;  // recorded after the upload from `host`
    std::uint64_t last_use = 0;      // which upload used it last (uploads are numbered)
  };

  Status launchCopies(const std::vector<CopyChunk>& chunks) {
    if (chunks.empty()) return okStatus();
    RALLY_ASSIGN_OR_RETURN(void* table, upload(chunks.data(), chunks.size() * sizeof(CopyChunk)));
    copyChunks<<<static_cast<unsigned>(chunks.size()), kThreads, 0, stream_>>>(
        static_cast<const CopyChunk*>(table));
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  // The chunk table to the device, on the stream, from a page-locked copy. Several uploads may
  // be in flight, one per slot: a slot's host copy is reused once its upload has finished (its
  // event), and its device copy is overwritten only by a later upload on the same stream, after
  // the kernel that read it. So a call waits for the device only when all kMaxTableSlots slots
  // are still in flight, rather than whenever the stream is behind.
  Result<void*> upload(const void* table, size_t bytes) {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_ASSIGN_OR_RETURN(TableSlot * slot, freeSlot());
    if (bytes > slot->capacity) {
      // A queued kernel may still read the old device copy: let the stream finish first.
      RALLY_CUDA(cudaStreamSynchronize(stream_));
      cudaFreeHost(slot->host);
      cudaFree(slot->device);
      slot->host = nullptr;
      slot->device = nullptr;
      slot->capacity = 0;
      RALLY_CUDA(cudaHostAlloc(&slot->host, bytes, cudaHostAllocDefault));
      RALLY_CUDA(cudaMalloc(&slot->device, bytes));
      slot->capacity = bytes;
    }
    slot->last_use = ++uploads_;
    std::memcpy(slot->host, table, bytes);
    RALLY_CUDA(cudaMemcpyAsync(slot->device, slot->host, bytes, cudaMemcpyHostToDevice, stream_));
    RALLY_CUDA(cudaEventRecord(slot->uploaded, stream_));
    return slot->device;
  }

  // A slot whose upload has finished, a new one while there are fewer than kMaxTableSlots, or
  // else the least recently used once its upload has finished (the stream runs them in order,
  // so that is the first to finish).
  Result<TableSlot*> freeSlot() {
    TableSlot* oldest = nullptr;
    for (TableSlot& slot : slots_) {
      const cudaError_t q = cudaEventQuery(slot.uploaded);
      if (q == cudaSuccess) return &slot;
      if (q != cudaErrorNotReady) return cudaStatus(q, "cudaEventQuery", __FILE__, __LINE__);
      if (oldest == nullptr || slot.last_use < oldest->last_use) oldest = &slot;
    }
    if (slots_.size() < kMaxTableSlots) {
      TableSlot fresh;
      RALLY_CUDA(cudaEventCreateWithFlags(&fresh.uploaded, cudaEventDisableTiming));
      slots_.push_back(fresh);
      return &slots_.back();
    }
    RALLY_CUDA(cudaEventSynchronize(oldest->uploaded));
    return oldest;
  }

  int device_;
  cudaStream_t stream_;
  size_t chunk_;
  static constexpr size_t kMaxTableSlots = 16;
  std::vector<TableSlot> slots_;
  std::uint64_t uploads_ = 0;
  int* host_flag_ = nullptr;
  int* device_flag_ = nullptr;
  std::uint64_t* device_sums_ = nullptr;
  size_t sums_capacity_ = 0;
};

}  // namespace

Result<std::unique_ptr<Kernels>> cudaKernels(const CudaKernelsOptions& options) {
  RALLY_RETURN_IF_ERROR(checkCudaKernelsOptions(options));
  int n = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    return failedPrecondition(
        fmt::format("no CUDA device for the CUDA kernels ({})",
                    e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found none"));
  }
  if (options.device < 0 || options.device >= n) {
    return invalidArgument(
        fmt::format("CUDA device {} does not exist (this machine has {})", options.device, n));
  }
  auto k = std::make_unique<CudaKernels>(options.device, static_cast<cudaStream_t>(options.stream),
                                         options.chunk_elements);
  RALLY_RETURN_IF_ERROR(k->init()) << "starting the CUDA kernels on device " << options.device;
  return std::unique_ptr<Kernels>(std::move(k));
}

}  // namespace rally::kernels
