// The CUDA kernels: launches of the bodies in internal/kernel_bodies.h (which the CPU tests also
// run, on an emulated grid). Each multi-tensor operation is one launch over a table of its
// tensors (one entry each, with its first thread block; a block moves one tile of at most
// CudaKernelsOptions::chunk_elements elements): up to kInlineEntries as a kernel parameter, more
// uploaded with the launch from page-locked memory owned by this object (up to 16 uploads in
// flight). Element math is portable.h's, shared with the CPU references, so both round the same
// way.
#include <cuda_runtime.h>
#include <fmt/format.h>

#define XXH_INLINE_ALL  // only for XXH3_kSecret, copied to the device
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/ops/cuda_kernels.h"
#include "kernels/ops/internal/device_block.h"
#include "kernels/ops/internal/kernel_bodies.h"
#include "kernels/ops/portable.h"

namespace rally::kernels {
namespace {

namespace p = portable;
using namespace internal;  // NOLINT(google-build-using-namespace): the kernel bodies

// XXH3's secret, for the checksums (global memory: see checksumBody).
__device__ __align__(16) std::uint8_t kSecretOnDevice[p::kSecretSize];

Status cudaStatus(cudaError_t e, const char* what, const char* file, int line) {
  return unavailable(fmt::format("{}: {} ({}) at {}:{}", what, cudaGetErrorString(e),
                                 cudaGetErrorName(e), file, line));
}
#define RALLY_CUDA(call)                                                               \
  do {                                                                                 \
    const cudaError_t rally_e = (call);                                                \
    if (rally_e != cudaSuccess) return cudaStatus(rally_e, #call, __FILE__, __LINE__); \
  } while (0)

// Every kernel runs blocks of kThreads; most ask for registers for eight blocks per
// multiprocessor (a full one); those with more arithmetic per byte for fewer (more registers,
// and no spills for sm_90; kernels/README.md).
__global__ void __launch_bounds__(kThreads, 8)
    copyTiles(const CopyEntry* entries, size_t count, size_t tile_bytes) {
  copyTileBody(DeviceBlock{}, entries, count, tile_bytes);
}
__global__ void __launch_bounds__(kThreads, 8)
    copyTilesInline(const __grid_constant__ InlineTable<CopyEntry> table, size_t count,
                    size_t tile_bytes) {
  copyTileBody(DeviceBlock{}, table.entries, count, tile_bytes);
}

template <DType T>
__global__ void __launch_bounds__(kThreads, 6)
    scaleCheck(void* data, size_t n, float factor, int* nonfinite) {
  scaleCheckBody<T>(DeviceBlock{}, data, n, factor, nonfinite);
}

__global__ void __launch_bounds__(kThreads)
    compress(const float* in, float* residual, std::uint16_t* out, size_t n) {
  compressBody(DeviceBlock{}, in, residual, out, n);
}

__global__ void __launch_bounds__(kThreads, 8)
    decompress(const std::uint16_t* in, float* out, size_t n) {
  decompressBody(DeviceBlock{}, in, out, n);
}

template <unsigned kAlign>
__global__ void __launch_bounds__(kThreads, 8)
    checksums(const std::uint8_t* data, size_t bytes, size_t block, std::uint64_t* out) {
  __shared__ ChecksumShared<ChecksumLanePairs> shared;
  checksumBody<kAlign, ChecksumLanePairs>(DeviceBlock{}, shared, kSecretOnDevice, data, bytes,
                                          block, out);
}

__global__ void __launch_bounds__(kThreads, 4)
    adamwTiles(const AdamWEntry* entries, size_t count, size_t chunk, p::AdamWStep s) {
  adamwTileBody(DeviceBlock{}, entries, count, chunk, s);
}
__global__ void __launch_bounds__(kThreads, 4)
    adamwTilesInline(const __grid_constant__ InlineTable<AdamWEntry> table, size_t count,
                     size_t chunk, p::AdamWStep s) {
  adamwTileBody(DeviceBlock{}, table.entries, count, chunk, s);
}

// The table of a plan as a kernel parameter (entries past the plan's are zero, never read).
template <class Entry>
InlineTable<Entry> inlineTable(const std::vector<Entry>& entries) {
  InlineTable<Entry> t{};
  std::copy(entries.begin(), entries.end(), t.entries);
  return t;
}

template <DType T>
void launchScaleCheck(void* data, size_t n, float factor, int* flag, cudaStream_t stream) {
  const size_t items = elementItems(n, scaleCheckVectors<T>(data, n), kPerVector<T>);
  scaleCheck<T><<<scaleCheckGrid<T>(items), kThreads, 0, stream>>>(data, n, factor, flag);
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
    cudaFreeHost(host_sums_);
  }

  Status init() {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaMemcpyToSymbol(kSecretOnDevice, XXH3_kSecret, p::kSecretSize));
    // The flag is page-locked host memory the kernels write directly: reading it costs only the
    // wait for the stream, no copy.
    RALLY_CUDA(cudaHostAlloc(&host_flag_, sizeof(int), cudaHostAllocMapped));
    *host_flag_ = 0;
    RALLY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_flag_), host_flag_, 0));
    return okStatus();
  }

  std::string_view name() const override { return "cuda"; }

  Status pack(const std::vector<ConstTensorView>& tensors, void* bucket, DType type) override {
    return launchCopies(packPlan(tensors, bucket, type, chunk_));
  }

  Status unpack(const void* bucket, const std::vector<TensorView>& tensors, DType type) override {
    return launchCopies(unpackPlan(bucket, tensors, type, chunk_));
  }

  Status scaleAndCheckAsync(void* data, size_t count, DType type, float factor) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
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
    return okStatus();
  }

  Result<bool> readFinite() override {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));  // no kernel of ours writes the flag now
    const bool finite = *static_cast<volatile int*>(host_flag_) == 0;
    *static_cast<volatile int*>(host_flag_) = 0;
    return finite;
  }

  Status compressBf16(const float* in, float* residual, std::uint16_t* out, size_t count) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    const size_t items = elementItems(count, compressVectors(in, residual, out, count), 4);
    compress<<<elementGrid(items), kThreads, 0, stream_>>>(in, residual, out, count);
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status decompressBf16(const std::uint16_t* in, float* out, size_t count) override {
    if (count == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    const size_t items = elementItems(count, decompressVectors(in, out, count), 4);
    decompress<<<elementGrid(items), kThreads, 0, stream_>>>(in, out, count);
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status blockChecksums(const void* data, size_t bytes, size_t block_bytes,
                        std::uint64_t* out) override {
    RALLY_ASSIGN_OR_RETURN(const size_t blocks, checksumBlocks(bytes, block_bytes));
    if (blocks == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    if (deviceMemory(out)) {
      return invalidArgument(fmt::format(
          "blockChecksums: out ({}) is device memory; it writes the checksums to host memory "
          "(blockChecksumsAsync writes them to device memory)",
          fmt::ptr(out)));
    }
    // The kernel writes the checksums straight into page-locked host memory (8 bytes per block
    // over the bus, no copy to wait for), and they are copied to `out` from there.
    if (blocks > sums_capacity_) {
      RALLY_CUDA(cudaStreamSynchronize(stream_));  // every launch that wrote the old one is done
      cudaFreeHost(host_sums_);
      host_sums_ = nullptr;
      sums_capacity_ = 0;
      RALLY_CUDA(cudaHostAlloc(&host_sums_, blocks * sizeof(std::uint64_t), cudaHostAllocMapped));
      sums_capacity_ = blocks;
    }
    std::uint64_t* device_view = nullptr;
    RALLY_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_view), host_sums_, 0));
    RALLY_RETURN_IF_ERROR(launchChecksums(data, bytes, block_bytes, blocks, device_view));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    std::memcpy(out, host_sums_, blocks * sizeof(std::uint64_t));
    return okStatus();
  }

  Status blockChecksumsAsync(const void* data, size_t bytes, size_t block_bytes,
                             std::uint64_t* out) override {
    RALLY_ASSIGN_OR_RETURN(const size_t blocks, checksumBlocks(bytes, block_bytes));
    if (blocks == 0) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    if (!deviceMemory(out)) {
      return invalidArgument(fmt::format(
          "blockChecksumsAsync: out ({}) is not device memory; the CUDA kernels write the "
          "checksums on the device (blockChecksums writes them to host memory and waits)",
          fmt::ptr(out)));
    }
    return launchChecksums(data, bytes, block_bytes, blocks, out);
  }

  Status adamw(const std::vector<AdamWTensor>& tensors, const AdamWOptions& o) override {
    if (o.step < 1)
      return invalidArgument(fmt::format("adamw: step {} (steps start at 1)", o.step));
    const AdamWPlan plan = adamwPlan(tensors, chunk_);
    if (plan.blocks == 0) return okStatus();
    RALLY_RETURN_IF_ERROR(checkGrid(plan.blocks, "adamw"));
    const p::AdamWStep s = p::adamwStep(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.step);
    const auto grid = static_cast<unsigned>(plan.blocks);
    if (plan.entries.size() <= kInlineEntries) {
      adamwTilesInline<<<grid, kThreads, 0, stream_>>>(inlineTable(plan.entries),
                                                       plan.entries.size(), plan.chunk, s);
    } else {
      RALLY_ASSIGN_OR_RETURN(void* table,
                             upload(plan.entries.data(), plan.entries.size() * sizeof(AdamWEntry)));
      adamwTiles<<<grid, kThreads, 0, stream_>>>(static_cast<const AdamWEntry*>(table),
                                                 plan.entries.size(), plan.chunk, s);
    }
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  Status synchronize() override {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return okStatus();
  }

  Status waitForEvent(void* event) override {
    if (event == nullptr) {
      return invalidArgument(
          "waitForEvent: no event (a cudaEvent_t recorded on the stream whose work the kernels "
          "must follow)");
    }
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaStreamWaitEvent(stream_, static_cast<cudaEvent_t>(event), 0));
    return okStatus();
  }

  Status recordEvent(void* event) override {
    if (event == nullptr) {
      return invalidArgument(
          "recordEvent: no event (a cudaEvent_t of this device, for another stream to wait for "
          "the kernels' work)");
    }
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(event), stream_));
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

  // Whether the device can write at `p` as device (or managed) memory; host memory, mapped or
  // not, and pointers CUDA does not know are not.
  static bool deviceMemory(const void* p) {
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
  }

  // A grid of `blocks` thread blocks, or why it cannot be launched.
  static Status checkGrid(size_t blocks, std::string_view what) {
    if (blocks <= 0x7fffffffu) return okStatus();
    return invalidArgument(fmt::format(
        "{}: {} thread blocks are more than one launch takes (2^31 - 1); split the work into "
        "several calls",
        what, blocks));
  }

  Status launchCopies(const CopyPlan& plan) {
    if (plan.blocks == 0) return okStatus();
    RALLY_RETURN_IF_ERROR(checkGrid(plan.blocks, "pack/unpack"));
    const auto grid = static_cast<unsigned>(plan.blocks);
    if (plan.entries.size() <= kInlineEntries) {
      copyTilesInline<<<grid, kThreads, 0, stream_>>>(inlineTable(plan.entries),
                                                      plan.entries.size(), plan.tile_bytes);
    } else {
      RALLY_ASSIGN_OR_RETURN(void* table,
                             upload(plan.entries.data(), plan.entries.size() * sizeof(CopyEntry)));
      copyTiles<<<grid, kThreads, 0, stream_>>>(static_cast<const CopyEntry*>(table),
                                                plan.entries.size(), plan.tile_bytes);
    }
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  // The checksum blocks of `bytes` in blocks of `block_bytes`, or why they cannot be computed.
  static Result<size_t> checksumBlocks(size_t bytes, size_t block_bytes) {
    if (block_bytes == 0) return invalidArgument("blockChecksums: block_bytes must be positive");
    const size_t blocks = (bytes + block_bytes - 1) / block_bytes;
    if (blocks > 0x7fffffffu) {
      return invalidArgument(fmt::format(
          "blockChecksums: {} blocks of {} bytes are more than one launch takes (2^31 - 1); use "
          "larger blocks",
          blocks, block_bytes));
    }
    return blocks;
  }

  Status launchChecksums(const void* data, size_t bytes, size_t block_bytes, size_t blocks,
                         std::uint64_t* out) {
    const auto* in = static_cast<const std::uint8_t*>(data);
    const unsigned grid = static_cast<unsigned>(blocks);
    switch (checksumAlignment(in, block_bytes)) {
      case 16:
        checksums<16><<<grid, kThreads, 0, stream_>>>(in, bytes, block_bytes, out);
        break;
      case 8:
        checksums<8><<<grid, kThreads, 0, stream_>>>(in, bytes, block_bytes, out);
        break;
      default:
        checksums<1><<<grid, kThreads, 0, stream_>>>(in, bytes, block_bytes, out);
    }
    RALLY_CUDA(cudaGetLastError());
    return okStatus();
  }

  // The table to the device, on the stream, from a page-locked copy. Several uploads may
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
  int* host_flag_ = nullptr;    // page-locked, mapped: set by scaleCheck, read by readFinite
  int* device_flag_ = nullptr;  // the device's address of host_flag_
  std::uint64_t* host_sums_ = nullptr;  // page-locked, mapped: blockChecksums' results
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
