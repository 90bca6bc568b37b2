#include "collectives/internal/reduce.h"

#include <algorithm>
#include <bit>
#include <cmath>

namespace rally::collectives::internal {
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

template <typename T>
T apply(ReduceOp op, T a, T b) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return apply<T, ReduceOp::kSum>(a, b);
    case ReduceOp::kProd:
      return apply<T, ReduceOp::kProd>(a, b);
    case ReduceOp::kMin:
      return apply<T, ReduceOp::kMin>(a, b);
    case ReduceOp::kMax:
      return apply<T, ReduceOp::kMax>(a, b);
  }
  return a;
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
  if (out == x) {
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

template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float)>
void reduce16(ReduceOp op, void* c, const void* a, const void* b, size_t n) {
  auto* out = static_cast<std::uint16_t*>(c);
  const auto* x = static_cast<const std::uint16_t*>(a);
  const auto* y = static_cast<const std::uint16_t*>(b);
  for (size_t i = 0; i < n; ++i) out[i] = FromFloat(apply(op, ToFloat(x[i]), ToFloat(y[i])));
}

template <typename T>
void divideTyped(void* data, size_t n, int d) {
  auto* p = static_cast<T*>(data);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<T>(p[i] / static_cast<T>(d));
}

}  // namespace

float halfToFloat(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1f;
  std::uint32_t mant = h & 0x3ff;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

std::uint16_t floatToHalf(float f) {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to infinity
  if (abs < 0x38800000u) {                        // subnormal or zero in half
    if (abs < 0x33000000u) return sign;           // below half the smallest subnormal
    const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
    const std::uint32_t rounded = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    std::uint32_t h = rounded;
    if (rem > halfway || (rem == halfway && (rounded & 1))) ++h;
    return sign | static_cast<std::uint16_t>(h);
  }
  std::uint32_t h = ((abs >> 13) - (112u << 10));
  const std::uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return sign | static_cast<std::uint16_t>(h);
}

float bf16ToFloat(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  return std::bit_cast<float>(bits);
}

std::uint16_t floatToBf16(float f) {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // nan
  const std::uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;  // round to nearest even
  return static_cast<std::uint16_t>(x >> 16);
}

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
      return reduce16<halfToFloat, floatToHalf>(op, c, a, b, n);
    case DataType::kBF16:
      return reduce16<bf16ToFloat, floatToBf16>(op, c, a, b, n);
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
      for (size_t i = 0; i < n; ++i) p[i] = floatToHalf(halfToFloat(p[i]) / divisor);
      return;
    }
    case DataType::kBF16: {
      auto* p = static_cast<std::uint16_t*>(data);
      for (size_t i = 0; i < n; ++i) p[i] = floatToBf16(bf16ToFloat(p[i]) / divisor);
      return;
    }
  }
}

}  // namespace rally::collectives::internal
