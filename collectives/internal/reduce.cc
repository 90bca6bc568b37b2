#include "collectives/internal/reduce.h"

#include <algorithm>
#include <cmath>

#include "kernels/ops/portable.h"

namespace rally::collectives::internal {

namespace portable = kernels::portable;

namespace {

template <typename T, ReduceOp Op>
inline T apply(T a, T b) {
  if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) {
    return static_cast<T>(a + b);
  } else if constexpr (Op == ReduceOp::kProd) {
    return static_cast<T>(a * b);
  } else if constexpr (Op == ReduceOp::kMin) {
    return b < a ? b : a;
  } else {
    return a < b ? b : a;
  }
}

// The loops below vectorise (this file is built with -O3): the operation is a template argument,
// and the pointers are declared not to overlap, with the in-place case (c == a or c == b, the one
// every backend uses) as its own loop.
template <typename T, ReduceOp Op>
void reduceLoop(T* __restrict out, const T* __restrict x, const T* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = apply<T, Op>(x[i], y[i]);
}
template <typename T, ReduceOp Op>
void reduceInPlace(T* __restrict out, const T* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = apply<T, Op>(out[i], y[i]);
}

template <typename T, ReduceOp Op>
void reduceDispatch(void* c, const void* a, const void* b, size_t n) {
  auto* out = static_cast<T*>(c);
  const auto* x = static_cast<const T*>(a);
  const auto* y = static_cast<const T*>(b);
  if (out == x && out == y) {  // c == a == b: too aliased for the __restrict loops
    for (size_t i = 0; i < n; ++i) out[i] = apply<T, Op>(out[i], out[i]);
  } else if (out == x) {
    reduceInPlace<T, Op>(out, y, n);
  } else if (out == y) {  // every op here is commutative
    reduceInPlace<T, Op>(out, x, n);
  } else {
    reduceLoop<T, Op>(out, x, y, n);
  }
}

template <typename T>
void reduceTyped(ReduceOp op, void* c, const void* a, const void* b, size_t n) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return reduceDispatch<T, ReduceOp::kSum>(c, a, b, n);
    case ReduceOp::kProd:
      return reduceDispatch<T, ReduceOp::kProd>(c, a, b, n);
    case ReduceOp::kMin:
      return reduceDispatch<T, ReduceOp::kMin>(c, a, b, n);
    case ReduceOp::kMax:
      return reduceDispatch<T, ReduceOp::kMax>(c, a, b, n);
  }
}

// f16 and bf16: in f32, rounded back; shaped like reduceDispatch so that bf16's (branch-free)
// conversions vectorise too.
template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float), ReduceOp Op>
void reduce16Loop(std::uint16_t* __restrict out, const std::uint16_t* __restrict x,
                  const std::uint16_t* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = FromFloat(apply<float, Op>(ToFloat(x[i]), ToFloat(y[i])));
}
template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float), ReduceOp Op>
void reduce16InPlace(std::uint16_t* __restrict out, const std::uint16_t* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i)
    out[i] = FromFloat(apply<float, Op>(ToFloat(out[i]), ToFloat(y[i])));
}
template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float), ReduceOp Op>
void reduce16Dispatch(void* c, const void* a, const void* b, size_t n) {
  auto* out = static_cast<std::uint16_t*>(c);
  const auto* x = static_cast<const std::uint16_t*>(a);
  const auto* y = static_cast<const std::uint16_t*>(b);
  if (out == x && out == y) {  // c == a == b: too aliased for the __restrict loops
    for (size_t i = 0; i < n; ++i) {
      out[i] = FromFloat(apply<float, Op>(ToFloat(out[i]), ToFloat(out[i])));
    }
  } else if (out == x) {
    reduce16InPlace<ToFloat, FromFloat, Op>(out, y, n);
  } else if (out == y) {
    reduce16InPlace<ToFloat, FromFloat, Op>(out, x, n);
  } else {
    reduce16Loop<ToFloat, FromFloat, Op>(out, x, y, n);
  }
}
template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float)>
void reduce16(ReduceOp op, void* c, const void* a, const void* b, size_t n) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return reduce16Dispatch<ToFloat, FromFloat, ReduceOp::kSum>(c, a, b, n);
    case ReduceOp::kProd:
      return reduce16Dispatch<ToFloat, FromFloat, ReduceOp::kProd>(c, a, b, n);
    case ReduceOp::kMin:
      return reduce16Dispatch<ToFloat, FromFloat, ReduceOp::kMin>(c, a, b, n);
    case ReduceOp::kMax:
      return reduce16Dispatch<ToFloat, FromFloat, ReduceOp::kMax>(c, a, b, n);
  }
}

template <typename T>
void divideTyped(void* data, size_t n, int d) {
  auto* p = static_cast<T*>(data);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<T>(p[i] / static_cast<T>(d));
}

}  // namespace

// The conversions are kernels/ops/portable.h's, which the kernels' tests check against the
// compiler's _Float16; inline there, so that the loops above can vectorise them (functions of
// this shared library's own could be interposed, so the compiler would call them per element).
float halfToFloat(std::uint16_t h) { return portable::fromF16(h); }
std::uint16_t floatToHalf(float f) { return portable::toF16(f); }
float bf16ToFloat(std::uint16_t b) { return portable::fromBf16(b); }
std::uint16_t floatToBf16(float f) { return portable::toBf16(f); }

void reduce(DataType type, ReduceOp op, void* c, const void* a, const void* b, size_t n) {
  switch (type) {
    case DataType::kF32:
      return reduceTyped<float>(op, c, a, b, n);
    case DataType::kF64:
      return reduceTyped<double>(op, c, a, b, n);
    case DataType::kI32:
      return reduceTyped<std::int32_t>(op, c, a, b, n);
    case DataType::kI64:
      return reduceTyped<std::int64_t>(op, c, a, b, n);
    case DataType::kU8:
      return reduceTyped<std::uint8_t>(op, c, a, b, n);
    case DataType::kF16:
      return reduce16<portable::fromF16, portable::toF16>(op, c, a, b, n);
    case DataType::kBF16:
      return reduce16<portable::fromBf16, portable::toBf16>(op, c, a, b, n);
  }
}

void finishAverage(DataType type, void* data, size_t n, int divisor) {
  switch (type) {
    case DataType::kF32:
      return divideTyped<float>(data, n, divisor);
    case DataType::kF64:
      return divideTyped<double>(data, n, divisor);
    case DataType::kI32:
      return divideTyped<std::int32_t>(data, n, divisor);
    case DataType::kI64:
      return divideTyped<std::int64_t>(data, n, divisor);
    case DataType::kU8:
      return divideTyped<std::uint8_t>(data, n, divisor);
    case DataType::kF16: {
      auto* p = static_cast<std::uint16_t*>(data);
      for (size_t i = 0; i < n; ++i) p[i] = portable::toF16(portable::fromF16(p[i]) / divisor);
      return;
    }
    case DataType::kBF16: {
      auto* p = static_cast<std::uint16_t*>(data);
      for (size_t i = 0; i < n; ++i) p[i] = portable::toBf16(portable::fromBf16(p[i]) / divisor);
      return;
    }
  }
}

}  // namespace rally::collectives::internal
