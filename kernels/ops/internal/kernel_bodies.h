// The bodies of rally's CUDA kernels, written once for two kinds of thread block: a GPU's
// (cuda_kernels.cu's __global__ functions pass a DeviceBlock) and an emulated one on the CPU
// (tests/unit/kernels/emulated_grid.h), so that CPU tests run the very indexing, alignment and
// vector paths a GPU runs, on machines without one. Element math is portable.h's.
//
// A body sees its thread block through `b` (a Block):
//   b.index(), b.count()  this block's index, and the number of blocks in the grid;
//   b.size()              threads per block;
//   b.each(f)             f(t) as thread t (on a GPU each thread runs its own t; emulated, every t
//                         in turn);
//   b.sync()              the block's barrier, between two each() that share memory;
//   b.flagIfAny(bad, f)   *f = 1 if `bad` in any thread (a warp vote and one atomic on a GPU).
// Rules that keep both the same: code outside each() is uniform (the same in every thread; it runs
// once per block when emulated) and writes no variable; what one each() leaves for a later one is
// in the block's shared memory (a struct passed in); and any two each() have a b.sync() between
// them (the emulator enforces it).
//
//   copyChunkBody(DeviceBlock{}, chunks);                        // in a __global__ function
//   emulateGrid(blocks, kThreads, [&](const auto& b) { copyChunkBody(b, chunks); });  // a test
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/ops/kernels.h"
#include "kernels/ops/portable.h"

namespace rally::kernels::internal {

constexpr unsigned kThreads = 256;  // per block, every kernel
// Elements per block in the multi-tensor kernels, unless CudaKernelsOptions::chunk_elements says
// otherwise (a multiple of 8, so that every chunk of a 16-byte aligned tensor is aligned too).
constexpr size_t kDefaultChunk = 16384;
constexpr unsigned kMaxBlocks = 65535u * 8u;

// N elements moved with one load or store: 16 bytes are one 128-bit access on a GPU.
template <class E, int N>
struct alignas(sizeof(E) * N) Vec {
  E v[N];
};
using Words4 = Vec<std::uint32_t, 4>;
using Floats4 = Vec<float, 4>;
using Halves4 = Vec<std::uint16_t, 4>;
using Halves8 = Vec<std::uint16_t, 8>;

RALLY_HD bool alignedTo(const void* p, size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Blocks for a grid-stride loop over `items`, one per thread, at most `max_blocks` (any grid size
// gives the same result; the tests also emulate small ones).
inline unsigned gridFor(size_t items, unsigned max_blocks = kMaxBlocks) {
  const size_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<size_t>(std::max<size_t>(blocks, 1), max_blocks));
}

// An element kernel moves `vectors` whole vectors of `per` elements, then the n - vectors * per
// left one at a time: the items its grid-stride loops need threads for.
RALLY_HD size_t elementItems(size_t n, size_t vectors, size_t per) {
  return vectors + (n - vectors * per);
}

// ---- pack and unpack: a table of chunks, one block each -------------------------------------

struct CopyChunk {
  const unsigned char* src;
  unsigned char* dst;
  size_t bytes;
};

// Appends the chunks (`chunk` elements of `element_bytes` at most) that copy `bytes` bytes.
inline void splitCopy(const unsigned char* src, unsigned char* dst, size_t bytes,
                      size_t element_bytes, size_t chunk, std::vector<CopyChunk>* chunks) {
  const size_t step = chunk * element_bytes;
  for (size_t at = 0; at < bytes; at += step) {
    chunks->push_back({src + at, dst + at, std::min(step, bytes - at)});
  }
}

// The chunks of pack (tensors, in order, into the bucket) and unpack (back).
inline std::vector<CopyChunk> packChunks(const std::vector<ConstTensorView>& tensors, void* bucket,
                                         DType type, size_t chunk = kDefaultChunk) {
  const size_t es = dtypeSize(type);
  std::vector<CopyChunk> chunks;
  auto* out = static_cast<unsigned char*>(bucket);
  for (const ConstTensorView& t : tensors) {
    splitCopy(static_cast<const unsigned char*>(t.data), out, t.count * es, es, chunk, &chunks);
    out += t.count * es;
  }
  return chunks;
}
inline std::vector<CopyChunk> unpackChunks(const void* bucket,
                                           const std::vector<TensorView>& tensors, DType type,
                                           size_t chunk = kDefaultChunk) {
  const size_t es = dtypeSize(type);
  std::vector<CopyChunk> chunks;
  const auto* in = static_cast<const unsigned char*>(bucket);
  for (const TensorView& t : tensors) {
    splitCopy(in, static_cast<unsigned char*>(t.data), t.count * es, es, chunk, &chunks);
    in += t.count * es;
  }
  return chunks;
}

// n items of type W from s to d by thread t of `threads`, four loads in flight before their
// stores (the stores may alias later loads as far as the compiler knows, so it would not batch
// them itself).
template <class W>
RALLY_HD void copyItems(unsigned t, unsigned threads, const W* s, W* d, size_t n) {
  size_t i = t;
  for (; i + 3 * static_cast<size_t>(threads) < n; i += 4 * static_cast<size_t>(threads)) {
    const W a = s[i], b = s[i + threads], c = s[i + 2 * threads], e = s[i + 3 * threads];
    d[i] = a;
    d[i + threads] = b;
    d[i + 2 * threads] = c;
    d[i + 3 * threads] = e;
  }
  for (; i < n; i += threads) d[i] = s[i];
}

template <class Block>
RALLY_HD void copyChunkBody(const Block& b, const CopyChunk* chunks) {
  const CopyChunk c = chunks[b.index()];
  b.each([&](unsigned t) {
    size_t done = 0;
    if (alignedTo(c.src, 16) && alignedTo(c.dst, 16)) {
      done = c.bytes / 16;
      copyItems(t, b.size(), reinterpret_cast<const Words4*>(c.src),
                reinterpret_cast<Words4*>(c.dst), done);
      done *= 16;
    } else if (alignedTo(c.src, 4) && alignedTo(c.dst, 4)) {
      done = c.bytes / 4;
      copyItems(t, b.size(), reinterpret_cast<const std::uint32_t*>(c.src),
                reinterpret_cast<std::uint32_t*>(c.dst), done);
      done *= 4;
    }
    for (size_t i = done + t; i < c.bytes; i += b.size()) c.dst[i] = c.src[i];
  });
}

// ---- scale and check ----------------------------------------------------------------------------

// How each dtype is stored, and converted to and from f32.
template <DType T>
struct Element;
template <>
struct Element<DType::kF32> {
  using Bits = float;
  static RALLY_HD float load(float x) { return x; }
  static RALLY_HD float store(float v) { return v; }
};
template <>
struct Element<DType::kF16> {
  using Bits = std::uint16_t;
  static RALLY_HD float load(std::uint16_t x) { return portable::fromF16(x); }
  static RALLY_HD std::uint16_t store(float v) { return portable::toF16(v); }
};
template <>
struct Element<DType::kBF16> {
  using Bits = std::uint16_t;
  static RALLY_HD float load(std::uint16_t x) { return portable::fromBf16(x); }
  static RALLY_HD std::uint16_t store(float v) { return portable::toBf16(v); }
};

// Elements per 16-byte vector of dtype T, and how many whole vectors scaleCheckBody moves (none
// when `data` is not 16-byte aligned: then every element goes one at a time).
template <DType T>
constexpr size_t kPerVector = 16 / sizeof(typename Element<T>::Bits);
template <DType T>
RALLY_HD size_t scaleCheckVectors(const void* data, size_t n) {
  return alignedTo(data, 16) ? n / kPerVector<T> : 0;
}

template <DType T, class Block>
RALLY_HD void scaleCheckBody(const Block& b, void* data, size_t n, float factor, int* nonfinite) {
  using E = Element<T>;
  using Bits = typename E::Bits;
  constexpr size_t kPer = kPerVector<T>;
  using V = Vec<Bits, static_cast<int>(kPer)>;
  auto* d = static_cast<Bits*>(data);
  const size_t vectors = scaleCheckVectors<T>(data, n);
  b.each([&](unsigned t) {
    const size_t first = static_cast<size_t>(b.index()) * b.size() + t;
    const size_t stride = static_cast<size_t>(b.count()) * b.size();
    bool bad = false;
    const auto scale = [&](Bits x) {
      const Bits y = E::store(E::load(x) * factor);
      bad |= !portable::finite(E::load(y));  // what was stored: an f16 may overflow to infinity
      return y;
    };
    for (size_t i = first; i < vectors; i += stride) {
      V v = reinterpret_cast<const V*>(d)[i];
      for (size_t k = 0; k < kPer; ++k) v.v[k] = scale(v.v[k]);
      reinterpret_cast<V*>(d)[i] = v;
    }
    for (size_t i = vectors * kPer + first; i < n; i += stride) d[i] = scale(d[i]);
    b.flagIfAny(bad, nonfinite);
  });
}

// ---- bf16 compression with error feedback, and back -------------------------------------------

RALLY_HD size_t compressVectors(const float* in, const float* residual, const std::uint16_t* out,
                                size_t n) {
  return alignedTo(in, 16) && alignedTo(residual, 16) && alignedTo(out, 8) ? n / 4 : 0;
}

template <class Block>
RALLY_HD void compressBody(const Block& b, const float* in, float* residual, std::uint16_t* out,
                           size_t n) {
  const size_t vectors = compressVectors(in, residual, out, n);
  b.each([&](unsigned t) {
    const size_t first = static_cast<size_t>(b.index()) * b.size() + t;
    const size_t stride = static_cast<size_t>(b.count()) * b.size();
    for (size_t i = first; i < vectors; i += stride) {
      const Floats4 x = reinterpret_cast<const Floats4*>(in)[i];
      Floats4 r = reinterpret_cast<const Floats4*>(residual)[i];
      Halves4 o;
      for (int k = 0; k < 4; ++k) o.v[k] = portable::compressBf16Element(x.v[k], &r.v[k]);
      reinterpret_cast<Floats4*>(residual)[i] = r;
      reinterpret_cast<Halves4*>(out)[i] = o;
    }
    for (size_t i = vectors * 4 + first; i < n; i += stride)
      out[i] = portable::compressBf16Element(in[i], &residual[i]);
  });
}

RALLY_HD size_t decompressVectors(const std::uint16_t* in, const float* out, size_t n) {
  return alignedTo(in, 16) && alignedTo(out, 16) ? n / 8 : 0;
}

template <class Block>
RALLY_HD void decompressBody(const Block& b, const std::uint16_t* in, float* out, size_t n) {
  const size_t vectors = decompressVectors(in, out, n);
  b.each([&](unsigned t) {
    const size_t first = static_cast<size_t>(b.index()) * b.size() + t;
    const size_t stride = static_cast<size_t>(b.count()) * b.size();
    for (size_t i = first; i < vectors; i += stride) {
      const Halves8 h = reinterpret_cast<const Halves8*>(in)[i];
      Floats4 lo, hi;
      for (int k = 0; k < 4; ++k) {
        lo.v[k] = portable::fromBf16(h.v[k]);
        hi.v[k] = portable::fromBf16(h.v[k + 4]);
      }
      reinterpret_cast<Floats4*>(out)[2 * i] = lo;
      reinterpret_cast<Floats4*>(out)[2 * i + 1] = hi;
    }
    for (size_t i = vectors * 8 + first; i < n; i += stride) out[i] = portable::fromBf16(in[i]);
  });
}

// ---- block checksums: XXH3-64 of each block, one thread block per checksum block ---------------
//
// XXH3's long path split as portable.h describes: the block's 1 KiB segments in groups of
// kSegmentsPerGroup, each thread adding up one lane of one segment (16 stripes, all loads
// independent), then 8 threads chaining the group's scrambles; then the tail and the merge.
// Blocks of 240 bytes or less take the short paths on one thread.

constexpr unsigned kSegmentsPerGroup = kThreads / 8;

struct ChecksumShared {
  alignas(8) std::uint8_t secret[portable::kSecretSize];  // lanes read different words at once
  std::uint64_t contribution[kSegmentsPerGroup][8];
  std::uint64_t acc[8];
};

// kAligned: `data` and the block size are multiples of 8, so whole 64-bit loads.
RALLY_HD bool checksumAligned(const void* data, size_t block) {
  return alignedTo(data, 8) && block % 8 == 0;
}

template <bool kAligned, class Block>
RALLY_HD void checksumBody(const Block& b, ChecksumShared& sh, const std::uint8_t* secret,
                           const std::uint8_t* data, size_t bytes, size_t block,
                           std::uint64_t* out) {
  namespace p = portable;
  const size_t index = b.index();
  const std::uint8_t* in = data + index * block;
  const size_t len = bytes - index * block < block ? bytes - index * block : block;
  b.each([&](unsigned t) {
    for (size_t i = t; i < p::kSecretSize; i += b.size()) sh.secret[i] = secret[i];
    if (t < 8) sh.acc[t] = p::xxh3InitLane(static_cast<int>(t));
  });
  b.sync();
  if (len <= 240) {
    b.each([&](unsigned t) {
      if (t == 0) out[index] = p::xxh3(in, len, sh.secret);
    });
    return;
  }
  const size_t full = p::xxh3FullSegments(len);
  for (size_t first = 0; first < full; first += kSegmentsPerGroup) {
    const size_t n = full - first < kSegmentsPerGroup ? full - first : kSegmentsPerGroup;
    b.each([&](unsigned t) {
      const unsigned lane = t % 8, slot = t / 8;
      if (slot < kSegmentsPerGroup) {
        sh.contribution[slot][lane] = slot < n
                                          ? p::xxh3SegmentLane<kAligned, true>(
                                                in, first + slot, sh.secret, static_cast<int>(lane))
                                          : 0;
      }
    });
    b.sync();
    b.each([&](unsigned t) {
      if (t >= 8) return;
      const std::uint64_t scramble = p::xxh3ScrambleSecret(sh.secret, static_cast<int>(t));
      std::uint64_t a = sh.acc[t];
      for (size_t j = 0; j < n; ++j) a = p::xxh3Chain(a, sh.contribution[j][t], scramble);
      sh.acc[t] = a;
    });
    b.sync();  // the chain has read the contributions before the next group writes them
  }
  b.each([&](unsigned t) {
    if (t < 8) sh.acc[t] += p::xxh3LongTailLane(in, len, sh.secret, static_cast<int>(t));
  });
  b.sync();
  b.each([&](unsigned t) {
    if (t == 0) out[index] = p::xxh3LongMerge(sh.acc, len, sh.secret);
  });
}

// ---- multi-tensor AdamW: a table of chunks, one block each ------------------------------------

struct AdamWChunk {
  float* param;
  const float* grad;
  float* m;
  float* v;
  std::uint16_t* bf16;  // or nullptr
  size_t count;
};

inline void splitAdamW(const AdamWTensor& t, size_t chunk, std::vector<AdamWChunk>* chunks) {
  for (size_t at = 0; at < t.count; at += chunk) {
    chunks->push_back({t.param + at, t.grad + at, t.exp_avg + at, t.exp_avg_sq + at,
                       t.bf16_param != nullptr ? t.bf16_param + at : nullptr,
                       std::min(chunk, t.count - at)});
  }
}

template <class Block>
RALLY_HD void adamwChunkBody(const Block& b, const AdamWChunk* chunks,
                             const portable::AdamWStep& s) {
  const AdamWChunk c = chunks[b.index()];
  const bool vector = alignedTo(c.param, 16) && alignedTo(c.grad, 16) && alignedTo(c.m, 16) &&
                      alignedTo(c.v, 16) && (c.bf16 == nullptr || alignedTo(c.bf16, 8));
  const size_t vectors = vector ? c.count / 4 : 0;
  b.each([&](unsigned t) {
    for (size_t i = t; i < vectors; i += b.size()) {
      Floats4 p = reinterpret_cast<const Floats4*>(c.param)[i];
      const Floats4 g = reinterpret_cast<const Floats4*>(c.grad)[i];
      Floats4 m = reinterpret_cast<const Floats4*>(c.m)[i];
      Floats4 v = reinterpret_cast<const Floats4*>(c.v)[i];
      for (int k = 0; k < 4; ++k) portable::adamwElement(&p.v[k], g.v[k], &m.v[k], &v.v[k], s);
      reinterpret_cast<Floats4*>(c.param)[i] = p;
      reinterpret_cast<Floats4*>(c.m)[i] = m;
      reinterpret_cast<Floats4*>(c.v)[i] = v;
      if (c.bf16 != nullptr) {
        Halves4 h;
        for (int k = 0; k < 4; ++k) h.v[k] = portable::toBf16(p.v[k]);
        reinterpret_cast<Halves4*>(c.bf16)[i] = h;
      }
    }
    for (size_t i = vectors * 4 + t; i < c.count; i += b.size()) {
      portable::adamwElement(&c.param[i], c.grad[i], &c.m[i], &c.v[i], s);
      if (c.bf16 != nullptr) c.bf16[i] = portable::toBf16(c.param[i]);
    }
  });
}

}  // namespace rally::kernels::internal
