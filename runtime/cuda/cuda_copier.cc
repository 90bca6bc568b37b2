#include "runtime/cuda/cuda_copier.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include "runtime/elastic/elastic_state.h"

namespace rally::cuda {
namespace {

Status cudaError(cudaError_t e, std::string_view what, const char* file, int line) {
  return unavailable(fmt::format("{}: {} ({}) at {}:{}", what, cudaGetErrorString(e),
                                 cudaGetErrorName(e), file, line));
}

#define RALLY_CUDA(call)                                         \
  do {                                                           \
    const cudaError_t rally_cuda_e = (call);                     \
    if (rally_cuda_e != cudaSuccess) {                           \
      return cudaError(rally_cuda_e, #call, __FILE__, __LINE__); \
    }                                                            \
  } while (0)

class CudaCopier final : public DeviceCopier {
 public:
  explicit CudaCopier(const CudaCopierOptions& o)
      : device_(o.device), training_(static_cast<cudaStream_t>(o.training_stream)) {}
  ~CudaCopier() override {
    if (stream_ != nullptr) {
      (void)cudaSetDevice(device_);
      (void)cudaStreamSynchronize(stream_);
      (void)cudaStreamDestroy(stream_);
      (void)cudaEventDestroy(ready_);
    }
  }

  Status init() {
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    RALLY_CUDA(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    return okStatus();
  }

  Result<void*> allocateHost(size_t bytes) override {
    void* p = nullptr;
    RALLY_CUDA(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
    return p;
  }
  void freeHost(void* p) override { (void)cudaFreeHost(p); }

  Status toHost(void* host, const void* device_ptr, size_t bytes, const Device& d) override {
    RALLY_RETURN_IF_ERROR(follow(d));
    RALLY_CUDA(cudaMemcpyAsync(host, device_ptr, bytes, cudaMemcpyDeviceToHost, stream_));
    return okStatus();
  }
  Status toDevice(void* device_ptr, const void* host, size_t bytes, const Device& d) override {
    RALLY_RETURN_IF_ERROR(follow(d));
    RALLY_CUDA(cudaMemcpyAsync(device_ptr, host, bytes, cudaMemcpyHostToDevice, stream_));
    return okStatus();
  }
  Status synchronize() override {
    following_ = false;
    RALLY_CUDA(cudaStreamSynchronize(stream_));
    return okStatus();
  }

 private:
  // Once per batch of copies: the copy stream waits for what the training stream has queued.
  Status follow(const Device& d) {
    if (d.kind != DeviceKind::kCuda || d.index != device_) {
      return invalidArgument(fmt::format(
          "this CUDA copier serves device {}; a buffer on another device needs its own copier",
          device_));
    }
    if (following_) return okStatus();
    RALLY_CUDA(cudaSetDevice(device_));
    RALLY_CUDA(cudaEventRecord(ready_, training_));
    RALLY_CUDA(cudaStreamWaitEvent(stream_, ready_, 0));
    following_ = true;
    return okStatus();
  }

  int device_;
  cudaStream_t training_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  bool following_ = false;
};

}  // namespace

Result<std::unique_ptr<DeviceCopier>> createCudaCopier(const CudaCopierOptions& options) {
  int n = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    return failedPrecondition(
        fmt::format("no CUDA device to copy from ({})",
                    e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found none"));
  }
  if (options.device < 0 || options.device >= n) {
    return invalidArgument(
        fmt::format("CUDA device {} does not exist (this machine has {})", options.device, n));
  }
  auto c = std::make_unique<CudaCopier>(options);
  RALLY_RETURN_IF_ERROR(c->init()) << "creating the CUDA copier for device " << options.device;
  return std::unique_ptr<DeviceCopier>(std::move(c));
}

}  // namespace rally::cuda
