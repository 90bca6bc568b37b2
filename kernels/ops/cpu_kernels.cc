// The CPU references: plain loops, one element at a time; the checksum is libxxhash's own XXH3.
#include <fmt/format.h>

#define XXH_INLINE_ALL  // header-only: no library to link
#include <xxhash.h>

#include <cmath>
#include <cstring>
#include <utility>

#include "kernels/ops/internal/kernel_bodies.h"
#include "kernels/ops/kernels.h"
#include "kernels/ops/portable.h"

namespace rally::kernels {
namespace {

namespace p = portable;

// One dtype's loop, free of per-element dispatch so that the compiler can vectorise it.
template <DType T>
bool scaleAndCheckAll(void* data, size_t count, float factor) {
  using E = internal::Element<T>;
  auto* d = static_cast<typename E::Bits*>(data);
  std::uint32_t nonfinite = 0;
  for (size_t i = 0; i < count; ++i) {
    const auto y = E::store(E::load(d[i]) * factor);
    d[i] = y;
    nonfinite |= static_cast<std::uint32_t>(!p::finite(E::load(y)));  // what was stored
  }
  return nonfinite == 0;
}

class CpuKernels final : public Kernels {
 public:
  std::string_view name() const override { return "cpu"; }

  Status pack(const std::vector<ConstTensorView>& tensors, void* bucket, DType type) override {
    const size_t es = dtypeSize(type);
    auto* out = static_cast<unsigned char*>(bucket);
    for (const ConstTensorView& t : tensors) {
      if (t.count == 0) continue;
      if (t.data == nullptr) return invalidArgument("pack: a tensor of non-zero count has no data");
      std::memcpy(out, t.data, t.count * es);
      out += t.count * es;
    }
    return okStatus();
  }

  Status unpack(const void* bucket, const std::vector<TensorView>& tensors, DType type) override {
    const size_t es = dtypeSize(type);
    const auto* in = static_cast<const unsigned char*>(bucket);
    for (const TensorView& t : tensors) {
      if (t.count == 0) continue;
      if (t.data == nullptr)
        return invalidArgument("unpack: a tensor of non-zero count has no data");
      std::memcpy(t.data, in, t.count * es);
      in += t.count * es;
    }
    return okStatus();
  }

  Status scaleAndCheckAsync(void* data, size_t count, DType type, float factor) override {
    bool finite = true;
    switch (type) {
      case DType::kF32:
        finite = scaleAndCheckAll<DType::kF32>(data, count, factor);
        break;
      case DType::kF16:
        finite = scaleAndCheckAll<DType::kF16>(data, count, factor);
        break;
      case DType::kBF16:
        finite = scaleAndCheckAll<DType::kBF16>(data, count, factor);
        break;
    }
    all_finite_ = all_finite_ && finite;
    return okStatus();
  }

  Result<bool> readFinite() override { return std::exchange(all_finite_, true); }

  Status compressBf16(const float* in, float* residual, std::uint16_t* out, size_t count) override {
    for (size_t i = 0; i < count; ++i) out[i] = p::compressBf16Element(in[i], &residual[i]);
    return okStatus();
  }

  Status decompressBf16(const std::uint16_t* in, float* out, size_t count) override {
    for (size_t i = 0; i < count; ++i) out[i] = p::fromBf16(in[i]);
    return okStatus();
  }

  Status blockChecksums(const void* data, size_t bytes, size_t block_bytes,
                        std::uint64_t* out) override {
    if (block_bytes == 0) return invalidArgument("blockChecksums: block_bytes must be positive");
    const auto* in = static_cast<const unsigned char*>(data);
    for (size_t b = 0, i = 0; b < bytes; b += block_bytes, ++i) {
      out[i] = XXH3_64bits(in + b, std::min(block_bytes, bytes - b));
    }
    return okStatus();
  }

  Status blockChecksumsAsync(const void* data, size_t bytes, size_t block_bytes,
                             std::uint64_t* out) override {
    return blockChecksums(data, bytes, block_bytes, out);
  }

  Status adamw(const std::vector<AdamWTensor>& tensors, const AdamWOptions& o) override {
    if (o.step < 1)
      return invalidArgument(fmt::format("adamw: step {} (steps start at 1)", o.step));
    const p::AdamWStep s = p::adamwStep(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.step);
    for (const AdamWTensor& t : tensors) {
      for (size_t i = 0; i < t.count; ++i) {
        p::adamwElement(&t.param[i], t.grad[i], &t.exp_avg[i], &t.exp_avg_sq[i], s);
        if (t.bf16_param != nullptr) t.bf16_param[i] = p::toBf16(t.param[i]);
      }
    }
    return okStatus();
  }

  Status synchronize() override { return okStatus(); }
  Status waitForEvent(void*) override { return okStatus(); }
  Status recordEvent(void*) override { return okStatus(); }

 private:
  bool all_finite_ = true;  // since the last readFinite()
};

}  // namespace

size_t dtypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

std::unique_ptr<Kernels> cpuKernels() { return std::make_unique<CpuKernels>(); }

}  // namespace rally::kernels
