// rally's memory-bound kernels for the gradient and checkpoint paths, behind one interface with a
// CPU implementation (the reference, and what runs without a GPU) and a CUDA one (where the
// toolkit is found and a device exists; see cuda_kernels.h):
//   - pack / unpack: many tensors of any sizes into one contiguous bucket and back, in one call;
//   - scaleAndCheck: multiply by a factor (1/world size) and say whether every element is finite;
//   - compressBf16 / decompressBf16: f32 -> bf16 with error feedback (the rounding residual is
//     kept and added to the next call's input), and back;
//   - blockChecksums: XXH3-64 of each block of a buffer, as the checkpoint manifest records them;
//   - adamw: a multi-tensor AdamW step (f32 master weights, optionally writing bf16 model weights).
//
//   auto k = rally::kernels::cpuKernels();
//   RALLY_RETURN_IF_ERROR(k->pack({{g1, n1}, {g2, n2}}, bucket, DType::kF32));
//   RALLY_ASSIGN_OR_RETURN(bool finite, k->scaleAndCheck(bucket, n1 + n2, DType::kF32, 0.25f));
//
// Pointers are in the implementation's memory (host for the CPU one, device for the CUDA one),
// except results returned by value or written to `out` arrays documented as host memory.
// Thread-safety: an instance is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "kernels/base/status.h"

namespace rally::kernels {

enum class DType { kF32, kF16, kBF16 };
size_t dtypeSize(DType t);

struct TensorView {  // `count` elements at `data`
  void* data = nullptr;
  size_t count = 0;
};
struct ConstTensorView {
  const void* data = nullptr;
  size_t count = 0;
};

struct AdamWTensor {
  float* param = nullptr;  // f32 master weights, updated in place
  const float* grad = nullptr;
  float* exp_avg = nullptr;             // first moment
  float* exp_avg_sq = nullptr;          // second moment
  std::uint16_t* bf16_param = nullptr;  // optional: also written as bf16 (the model's copy)
  size_t count = 0;
};

struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
  std::int64_t step = 1;  // 1 for the first step (bias correction)
};

class Kernels {
 public:
  virtual ~Kernels() = default;
  virtual std::string_view name() const = 0;  // "cpu", "cuda"

  // The tensors' elements, in order, into `bucket` (the sum of their counts); and back.
  virtual Status pack(const std::vector<ConstTensorView>& tensors, void* bucket, DType type) = 0;
  virtual Status unpack(const void* bucket, const std::vector<TensorView>& tensors, DType type) = 0;
  // data[i] *= factor, queued; whether any result is not finite (NaN or infinity) is kept until
  // readFinite(). For a step's buckets: one scaleAndCheckAsync each, one readFinite() at the end,
  // and the device is waited for once.
  virtual Status scaleAndCheckAsync(void* data, size_t count, DType type, float factor) = 0;
  // Waits for the queued work; true if every result of the scaleAndCheckAsync calls since the
  // last readFinite() was finite. Starts over.
  virtual Result<bool> readFinite() = 0;
  // scaleAndCheckAsync and readFinite() in one: true if every result is finite (and every result
  // of earlier scaleAndCheckAsync calls not yet read).
  Result<bool> scaleAndCheck(void* data, size_t count, DType type, float factor) {
    RALLY_RETURN_IF_ERROR(scaleAndCheckAsync(data, count, type, factor));
    return readFinite();
  }
  // out[i] = bf16(in[i] + residual[i]); residual[i] = (in[i] + residual[i]) - f32(out[i]), or
  // 0 where out[i] is not finite (so that one NaN or infinity does not spoil every later step).
  // The residual starts at zero and is the caller's to keep between steps.
  virtual Status compressBf16(const float* in, float* residual, std::uint16_t* out,
                              size_t count) = 0;
  virtual Status decompressBf16(const std::uint16_t* in, float* out, size_t count) = 0;
  // out[b] (host memory, ceil(bytes / block_bytes) entries) = XXH3-64 of block b of `data`.
  // Waits for the result.
  virtual Status blockChecksums(const void* data, size_t bytes, size_t block_bytes,
                                std::uint64_t* out) = 0;
  // The same into `out` in this implementation's memory (device memory for the CUDA one), queued:
  // for checksums that stay on the device, or several shards with one wait.
  virtual Status blockChecksumsAsync(const void* data, size_t bytes, size_t block_bytes,
                                     std::uint64_t* out) = 0;
  virtual Status adamw(const std::vector<AdamWTensor>& tensors, const AdamWOptions& options) = 0;
  // Waits for the work queued so far (a no-op on the CPU).
  virtual Status synchronize() = 0;
  // The work queued from now on waits, on the device and with no host wait, for the work that
  // `event` (a cudaEvent_t of this implementation's device) was recorded behind: for inputs
  // written on another stream (torch's). A no-op on the CPU, whose work runs when called.
  virtual Status waitForEvent(void* event) = 0;
  // Records `event` (a cudaEvent_t of this implementation's device) behind the work queued so
  // far, so that another stream that waits for it (Communicator::waitForEvent) follows that work
  // on the device, with no host wait: for outputs read on another stream (a bucket compressed
  // here, then reduced by NCCL). A no-op on the CPU, whose work is done when its call returns.
  virtual Status recordEvent(void* event) = 0;
};

std::unique_ptr<Kernels> cpuKernels();

}  // namespace rally::kernels
