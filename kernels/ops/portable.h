// Element-level pieces shared by the CPU references and the CUDA kernels (host and device code):
// float conversions (bf16, f16, round to nearest even, NaN kept a NaN), the AdamW update of one
// element, and XXH3-64 (the checkpoint manifest's checksum) written from its specification so a
// GPU can compute it. The host tests check every piece against an independent implementation
// (libxxhash for XXH3).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RALLY_HD __host__ __device__ __forceinline__
#else
#define RALLY_HD inline
#endif

namespace rally::kernels::portable {

RALLY_HD std::uint32_t floatBits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
RALLY_HD float bitsFloat(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16: the top 16 bits of an f32, rounded to nearest even; a NaN stays a (quiet) NaN.
RALLY_HD std::uint16_t toBf16(float f) {
  const std::uint32_t u = floatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}
RALLY_HD float fromBf16(std::uint16_t h) { return bitsFloat(static_cast<std::uint32_t>(h) << 16); }

// IEEE half: conversions with round to nearest even, subnormals, infinities and NaN.
RALLY_HD float fromF16(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bitsFloat(sign);
    float v = static_cast<float>(man) * (1.0f / 16777216.0f);  // man x 2^-24
    return (sign != 0) ? -v : v;
  }
  if (exp == 31) return bitsFloat(sign | 0x7f800000u | (man << 13));
  return bitsFloat(sign | ((exp + 112u) << 23) | (man << 13));
}
RALLY_HD std::uint16_t toF16(float f) {
  const std::uint32_t u = floatBits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow: inf
  if (abs < 0x38800000u) {  // a half subnormal (or zero): round abs / 2^-24 to an integer
    // abs = man x 2^(e - 150), so abs / 2^-24 = man >> (126 - e), rounded.
    const std::uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // at least 14 here
    if (shift > 24) return sign;                          // below half the smallest: zero
    const std::uint32_t total = static_cast<std::uint32_t>(shift);
    std::uint32_t r = man >> total;
    const std::uint32_t rem = man & ((1u << total) - 1u), half = 1u << (total - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t r = abs - 0x38000000u;  // rebias 127 -> 15 in place
  const std::uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<std::uint16_t>(sign | r);
}

RALLY_HD bool finite(float f) { return (floatBits(f) & 0x7f800000u) != 0x7f800000u; }

// One element of bf16 compression with error feedback: in + residual rounded to bf16, and what
// the rounding lost kept as the new residual. Where the result is not finite (a NaN or an
// infinity in the input, or a value that rounds up to infinity) the residual is reset to zero:
// kept, it would be NaN or infinite and spoil every later step.
RALLY_HD std::uint16_t compressBf16Element(float in, float* residual) {
  const float want = in + *residual;
  const std::uint16_t b = toBf16(want);
  const float sent = fromBf16(b);
  *residual = finite(sent) ? want - sent : 0.0f;
  return b;
}

// ---- XXH3-64 (seed 0, a 192-byte secret), from the XXH3 specification ------------------------

RALLY_HD std::uint64_t read64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian hosts and devices only
}
RALLY_HD std::uint32_t read32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
RALLY_HD std::uint64_t rotl64(std::uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
RALLY_HD std::uint64_t swap64(std::uint64_t x) {
  x = ((x & 0x00000000ffffffffull) << 32) | (x >> 32);
  x = ((x & 0x0000ffff0000ffffull) << 16) | ((x >> 16) & 0x0000ffff0000ffffull);
  return ((x & 0x00ff00ff00ff00ffull) << 8) | ((x >> 8) & 0x00ff00ff00ff00ffull);
}
RALLY_HD std::uint64_t mulFold64(std::uint64_t a, std::uint64_t b) {
#if defined(__CUDA_ARCH__)
  return (a * b) ^ __umul64hi(a, b);
#else
  __extension__ using U128 = unsigned __int128;  // GCC and Clang; not ISO C++
  const U128 p = static_cast<U128>(a) * b;
  return static_cast<std::uint64_t>(p) ^ static_cast<std::uint64_t>(p >> 64);
#endif
}

// a x b, the full 64-bit product: one wide multiply on a GPU (the compiler would otherwise see a
// 64 x 64-bit multiply of zero-extended values and might emulate it).
RALLY_HD std::uint64_t mulWide32(std::uint32_t a, std::uint32_t b) {
#if defined(__CUDA_ARCH__)
  std::uint64_t r;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(r) : "r"(a), "r"(b));
  return r;
#else
  return static_cast<std::uint64_t>(a) * b;
#endif
}

constexpr std::uint64_t kP32_1 = 0x9E3779B1u, kP32_2 = 0x85EBCA77u, kP32_3 = 0xC2B2AE3Du;
constexpr std::uint64_t kP64_1 = 0x9E3779B185EBCA87ull, kP64_2 = 0xC2B2AE3D27D4EB4Full,
                        kP64_3 = 0x165667B19E3779F9ull, kP64_4 = 0x85EBCA77C2B2AE63ull,
                        kP64_5 = 0x27D4EB2F165667C5ull;
constexpr size_t kSecretSize = 192;

RALLY_HD std::uint64_t avalanche3(std::uint64_t h) {
  h ^= h >> 37;
  h *= 0x165667919E3779F9ull;
  return h ^ (h >> 32);
}
RALLY_HD std::uint64_t avalanche64(std::uint64_t h) {
  h ^= h >> 33;
  h *= kP64_2;
  h ^= h >> 29;
  h *= kP64_3;
  return h ^ (h >> 32);
}
RALLY_HD std::uint64_t rrmxmx(std::uint64_t h, std::uint64_t len) {
  h ^= rotl64(h, 49) ^ rotl64(h, 24);
  h *= 0x9FB21C651E98DF25ull;
  h ^= (h >> 35) + len;
  h *= 0x9FB21C651E98DF25ull;
  return h ^ (h >> 28);
}
RALLY_HD std::uint64_t mix16(const std::uint8_t* in, const std::uint8_t* sec) {
  return mulFold64(read64(in) ^ read64(sec), read64(in + 8) ^ read64(sec + 8));
}
RALLY_HD void accumulate512(std::uint64_t* acc, const std::uint8_t* in, const std::uint8_t* sec) {
  for (int i = 0; i < 8; ++i) {
    const std::uint64_t v = read64(in + 8 * i), k = v ^ read64(sec + 8 * i);
    acc[i ^ 1] += v;
    acc[i] += (k & 0xffffffffull) * (k >> 32);
  }
}
RALLY_HD void scramble(std::uint64_t* acc, const std::uint8_t* sec) {
  for (int i = 0; i < 8; ++i) {
    std::uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= read64(sec + 8 * i);
    acc[i] = a * kP32_1;
  }
}

// XXH3-64 of at most 240 bytes: its short paths, without the long path's eight accumulators
// (which a GPU thread would keep in local memory).
RALLY_HD std::uint64_t xxh3Short(const void* data, size_t len, const std::uint8_t* secret) {
  const auto* in = static_cast<const std::uint8_t*>(data);
  if (len <= 16) {
    if (len > 8) {
      const std::uint64_t lo = read64(in) ^ (read64(secret + 24) ^ read64(secret + 32));
      const std::uint64_t hi = read64(in + len - 8) ^ (read64(secret + 40) ^ read64(secret + 48));
      return avalanche3(len + swap64(lo) + hi + mulFold64(lo, hi));
    }
    if (len >= 4) {
      const std::uint64_t in64 =
          read32(in + len - 4) + (static_cast<std::uint64_t>(read32(in)) << 32);
      return rrmxmx(in64 ^ (read64(secret + 8) ^ read64(secret + 16)), len);
    }
    if (len > 0) {
      const std::uint32_t combined = (static_cast<std::uint32_t>(in[0]) << 16) |
                                     (static_cast<std::uint32_t>(in[len >> 1]) << 24) |
                                     static_cast<std::uint32_t>(in[len - 1]) |
                                     (static_cast<std::uint32_t>(len) << 8);
      return avalanche64(combined ^
                         static_cast<std::uint64_t>(read32(secret) ^ read32(secret + 4)));
    }
    return avalanche64(read64(secret + 56) ^ read64(secret + 64));
  }
  if (len <= 128) {
    std::uint64_t acc = len * kP64_1;
    if (len > 32) {
      if (len > 64) {
        if (len > 96) {
          acc += mix16(in + 48, secret + 96);
          acc += mix16(in + len - 64, secret + 112);
        }
        acc += mix16(in + 32, secret + 64);
        acc += mix16(in + len - 48, secret + 80);
      }
      acc += mix16(in + 16, secret + 32);
      acc += mix16(in + len - 32, secret + 48);
    }
    acc += mix16(in, secret);
    acc += mix16(in + len - 16, secret + 16);
    return avalanche3(acc);
  }
  std::uint64_t acc = len * kP64_1;  // 129 to 240 bytes
  const size_t rounds = len / 16;
  for (size_t i = 0; i < 8; ++i) acc += mix16(in + 16 * i, secret + 16 * i);
  acc = avalanche3(acc);
  for (size_t i = 8; i < rounds; ++i) acc += mix16(in + 16 * i, secret + 16 * (i - 8) + 3);
  acc += mix16(in + len - 16, secret + 136 - 17);
  return avalanche3(acc);
}

RALLY_HD std::uint64_t xxh3(const void* data, size_t len, const std::uint8_t* secret) {
  if (len <= 240) return xxh3Short(data, len, secret);
  const auto* in = static_cast<const std::uint8_t*>(data);
  std::uint64_t acc[8] = {kP32_3, kP64_1, kP64_2, kP64_3, kP64_4, kP32_2, kP64_5, kP32_1};
  constexpr size_t kStripes = (kSecretSize - 64) / 8, kBlock = 64 * kStripes;
  const size_t blocks = (len - 1) / kBlock;
  for (size_t b = 0; b < blocks; ++b) {
    for (size_t s = 0; s < kStripes; ++s)
      accumulate512(acc, in + b * kBlock + s * 64, secret + s * 8);
    scramble(acc, secret + kSecretSize - 64);
  }
  const size_t last = ((len - 1) - kBlock * blocks) / 64;
  for (size_t s = 0; s < last; ++s)
    accumulate512(acc, in + blocks * kBlock + s * 64, secret + s * 8);
  accumulate512(acc, in + len - 64, secret + kSecretSize - 64 - 7);
  std::uint64_t result = len * kP64_1;
  for (int i = 0; i < 4; ++i) {
    result += mulFold64(acc[2 * i] ^ read64(secret + 11 + 16 * i),
                        acc[2 * i + 1] ^ read64(secret + 11 + 16 * i + 8));
  }
  return avalanche3(result);
}

// ---- XXH3-64's long path (more than 240 bytes), split for parallel hardware -----------------
//
// The long path keeps 8 accumulator lanes. A 64-byte stripe adds to lane L its neighbour's input
// word (L ^ 1) plus lo32 * hi32 of its own word xor the secret: a sum, so the 16 stripes of a
// 1 KiB segment add up in any order. Only the scramble after each full segment is sequential. So:
//   1. each (segment, lane) contribution, in parallel (xxh3SegmentLane);
//   2. per lane, the chain: acc = scramble(acc + contribution) per full segment (xxh3Chain);
//   3. the tail (stripes after the last full segment, and the final stripe) and the merge
//      (xxh3LongTailLane, xxh3LongMerge).
// xxh3Segmented below puts them together on one thread and equals xxh3() (tested).
constexpr size_t kXxhStripesPerSegment = (kSecretSize - 64) / 8;  // 16
constexpr size_t kXxhSegmentBytes = 64 * kXxhStripesPerSegment;   // 1024
// Lane `lane`'s starting accumulator (a function: a namespace-scope array is not device data).
RALLY_HD std::uint64_t xxh3InitLane(int lane) {
  switch (lane) {  // not an array: indexed by a thread's lane, that would be local memory
    case 0:
      return kP32_3;
    case 1:
      return kP64_1;
    case 2:
      return kP64_2;
    case 3:
      return kP64_3;
    case 4:
      return kP64_4;
    case 5:
      return kP32_2;
    case 6:
      return kP64_5;
    default:
      return kP32_1;
  }
}

// Full 1 KiB segments before the tail, for a long input of `len` bytes.
RALLY_HD size_t xxh3FullSegments(size_t len) { return (len - 1) / kXxhSegmentBytes; }

// An input word; kAligned: `p` is 8-byte aligned, so one 64-bit load (a device kernel's fast
// path; memcpy from a byte pointer becomes byte loads there).
template <bool kAligned = false>
RALLY_HD std::uint64_t inputWord(const std::uint8_t* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (kAligned) return *reinterpret_cast<const std::uint64_t*>(p);
#endif
  return read64(p);  // on a host, memcpy is one load anyway, and well-defined
}

// One stripe's addition to a lane, from the words it reads: the lane's input word, its
// neighbour's (lane ^ 1), and the lane's secret word.
RALLY_HD std::uint64_t xxh3StripeLaneWords(std::uint64_t own, std::uint64_t other,
                                           std::uint64_t secret_word) {
  const std::uint64_t k = own ^ secret_word;
  return other + mulWide32(static_cast<std::uint32_t>(k), static_cast<std::uint32_t>(k >> 32));
}

// The same from the stripe at `in` and the secret at `sec` for this stripe. kAlignedSecret: `sec`
// is 8-byte aligned, so each of its words is one load rather than eight byte loads on a device.
template <bool kAligned = false, bool kAlignedSecret = false>
RALLY_HD std::uint64_t xxh3StripeLane(const std::uint8_t* in, const std::uint8_t* sec, int lane) {
  return xxh3StripeLaneWords(inputWord<kAligned>(in + 8 * lane),
                             inputWord<kAligned>(in + 8 * (lane ^ 1)),
                             inputWord<kAlignedSecret>(sec + 8 * lane));
}

// What full segment `seg` adds to `lane` before its scramble (kAlignedSecret: `secret` is 8-byte
// aligned; every secret word a segment reads is then aligned too).
template <bool kAligned = false, bool kAlignedSecret = false>
RALLY_HD std::uint64_t xxh3SegmentLane(const std::uint8_t* in, size_t seg,
                                       const std::uint8_t* secret, int lane) {
  const std::uint8_t* base = in + seg * kXxhSegmentBytes;
  std::uint64_t sum = 0;
  for (size_t st = 0; st < kXxhStripesPerSegment; ++st) {
    sum += xxh3StripeLane<kAligned, kAlignedSecret>(base + 64 * st, secret + 8 * st, lane);
  }
  return sum;
}

// Two adjacent input words, lanes 2 * pair and 2 * pair + 1 of a stripe. kAlign: what `p` is known
// to be aligned to (1, 8 or 16); 16 is one 128-bit load on a GPU.
struct alignas(16) Words2 {
  std::uint64_t even, odd;
};
template <unsigned kAlign = 1>
RALLY_HD Words2 inputPair(const std::uint8_t* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (kAlign >= 16) return *reinterpret_cast<const Words2*>(p);
#endif
  return {inputWord<(kAlign >= 8)>(p), inputWord<(kAlign >= 8)>(p + 8)};
}

// What full segment `seg` adds to lanes 2 * pair and 2 * pair + 1 (pair 0 to 3): each lane adds
// the other's input word, so one thread loads both words once (xxh3SegmentLane for two lanes).
// `secret` is 8-byte aligned where kAlignedSecret.
template <unsigned kAlign = 1, bool kAlignedSecret = false>
RALLY_HD Words2 xxh3SegmentLanePair(const std::uint8_t* in, size_t seg, const std::uint8_t* secret,
                                    int pair) {
  const std::uint8_t* base = in + seg * kXxhSegmentBytes + 16 * pair;
  const std::uint8_t* sec = secret + 16 * pair;
  std::uint64_t even = 0, odd = 0;
  for (size_t st = 0; st < kXxhStripesPerSegment; ++st) {
    const Words2 w = inputPair<kAlign>(base + 64 * st);
    const std::uint64_t k0 = w.even ^ inputWord<kAlignedSecret>(sec + 8 * st);
    const std::uint64_t k1 = w.odd ^ inputWord<kAlignedSecret>(sec + 8 * st + 8);
    even += w.odd + mulWide32(static_cast<std::uint32_t>(k0), static_cast<std::uint32_t>(k0 >> 32));
    odd += w.even + mulWide32(static_cast<std::uint32_t>(k1), static_cast<std::uint32_t>(k1 >> 32));
  }
  return {even, odd};
}

// The secret word `lane`'s scrambles use (read once, before a chain).
RALLY_HD std::uint64_t xxh3ScrambleSecret(const std::uint8_t* secret, int lane) {
  return read64(secret + kSecretSize - 64 + 8 * lane);
}

// One segment's step of a lane's chain; `scramble_secret` is xxh3ScrambleSecret's for the lane.
RALLY_HD std::uint64_t xxh3Chain(std::uint64_t acc, std::uint64_t contribution,
                                 std::uint64_t scramble_secret) {
  std::uint64_t a = acc + contribution;
  a ^= a >> 47;
  a ^= scramble_secret;
  return a * kP32_1;
}

// What the tail adds to `lane` after the last scramble.
RALLY_HD std::uint64_t xxh3LongTailLane(const std::uint8_t* in, size_t len,
                                        const std::uint8_t* secret, int lane) {
  const size_t full = xxh3FullSegments(len);
  const size_t last = ((len - 1) - kXxhSegmentBytes * full) / 64;
  std::uint64_t sum = 0;
  for (size_t st = 0; st < last; ++st) {
    sum += xxh3StripeLane(in + full * kXxhSegmentBytes + 64 * st, secret + 8 * st, lane);
  }
  return sum + xxh3StripeLane(in + len - 64, secret + kSecretSize - 64 - 7, lane);
}

RALLY_HD std::uint64_t xxh3LongMerge(const std::uint64_t* acc, size_t len,
                                     const std::uint8_t* secret) {
  std::uint64_t result = len * kP64_1;
  for (int i = 0; i < 4; ++i) {
    result += mulFold64(acc[2 * i] ^ read64(secret + 11 + 16 * i),
                        acc[2 * i + 1] ^ read64(secret + 11 + 16 * i + 8));
  }
  return avalanche3(result);
}

// xxh3() through the parallel decomposition, on one thread: the reference the device kernel's
// structure is checked against on the CPU.
RALLY_HD std::uint64_t xxh3Segmented(const void* data, size_t len, const std::uint8_t* secret) {
  if (len <= 240) return xxh3(data, len, secret);
  const auto* in = static_cast<const std::uint8_t*>(data);
  std::uint64_t acc[8];
  for (int lane = 0; lane < 8; ++lane) {
    std::uint64_t a = xxh3InitLane(lane);
    for (size_t seg = 0; seg < xxh3FullSegments(len); ++seg) {
      a = xxh3Chain(a, xxh3SegmentLane(in, seg, secret, lane), xxh3ScrambleSecret(secret, lane));
    }
    acc[lane] = a + xxh3LongTailLane(in, len, secret, lane);
  }
  return xxh3LongMerge(acc, len, secret);
}

// ---- AdamW, one element (decoupled weight decay, bias-corrected moments) ----------------------
//
// Close to PyTorch's arrangement (torch.optim.AdamW): the bias corrections folded into a step
// size and a scale of sqrt(v) (a multiplication by 1 / sqrt(1 - beta2^t) where PyTorch divides
// by its square root), so that an element costs one division and one square root. Not bit for
// bit PyTorch's.

struct AdamWStep {
  float beta1, beta2, eps;
  float decay;           // 1 - lr * weight_decay
  float step_size;       // lr / (1 - beta1^t)
  float inv_bias2_sqrt;  // 1 / sqrt(1 - beta2^t)
};

// The constants of step `step` (1 for the first), computed once on the host, in double precision.
inline AdamWStep adamwStep(float lr, float beta1, float beta2, float eps, float weight_decay,
                           std::int64_t step) {
  const double bias1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  return {beta1,
          beta2,
          eps,
          static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay),
          static_cast<float>(lr / bias1),
          static_cast<float>(1.0 / std::sqrt(bias2))};
}

RALLY_HD void adamwElement(float* param, float grad, float* m, float* v, const AdamWStep& s) {
  const float mm = s.beta1 * *m + (1.0f - s.beta1) * grad;
  const float vv = s.beta2 * *v + (1.0f - s.beta2) * grad * grad;
  *m = mm;
  *v = vv;
  const float denom = sqrtf(vv) * s.inv_bias2_sqrt + s.eps;
  *param = *param * s.decay - s.step_size * mm / denom;
}

}  // namespace rally::kernels::portable
