// Test inputs for the kernels' tests (CPU and GPU): fresh random values, never zeros, in any of
// the kernels' dtypes.
//
//   auto bytes = randomElements(1000003, DType::kBF16, /*seed=*/7);
//   setElement(&bytes, 0, DType::kBF16, std::numeric_limits<float>::infinity());
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/ops/kernels.h"
#include "kernels/ops/portable.h"

namespace rally::kernels {

inline std::vector<float> randomFloats(size_t n, std::uint32_t seed) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (auto& x : v) {
    x = d(rng);
    if (x == 0.0f) x = 1.0f;
  }
  return v;
}

// Element i of a buffer of `type` elements set to v (rounded to the dtype).
inline void setElement(std::vector<unsigned char>* bytes, size_t i, DType type, float v) {
  if (type == DType::kF32) {
    std::memcpy(&(*bytes)[4 * i], &v, 4);
  } else {
    const std::uint16_t h = type == DType::kF16 ? portable::toF16(v) : portable::toBf16(v);
    std::memcpy(&(*bytes)[2 * i], &h, 2);
  }
}

// n random values as `type` elements.
inline std::vector<unsigned char> randomElements(size_t n, DType type, std::uint32_t seed) {
  const auto f = randomFloats(n, seed);
  std::vector<unsigned char> out(n * dtypeSize(type));
  for (size_t i = 0; i < n; ++i) setElement(&out, i, type, f[i]);
  return out;
}

}  // namespace rally::kernels
