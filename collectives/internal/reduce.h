// Element-wise reductions on the host for every DataType and ReduceOp, the reference the backends
// use (and check against): c[i] = a[i] op b[i] (c may be a or b, but must not overlap them
// otherwise). f16 and bf16 are computed in f32 and rounded to
// nearest even. kAvg reduces as kSum; the division by the world size is finishAverage().
#pragma once

#include <cstddef>
#include <cstdint>

#include "collectives/communicator.h"

namespace rally::collectives::internal {

void reduce(DataType type, ReduceOp op, void* c, const void* a, const void* b, size_t n);
// Divides every element by `divisor` (integers: truncating division).
void finishAverage(DataType type, void* data, size_t n, int divisor);

float halfToFloat(std::uint16_t h);
std::uint16_t floatToHalf(float f);
float bf16ToFloat(std::uint16_t b);
std::uint16_t floatToBf16(float f);

}  // namespace rally::collectives::internal
