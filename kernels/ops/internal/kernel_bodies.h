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
//   b.flagIfAny(bad, f)   *f = 1 if `bad` in any thread (a warp vote and one store per warp on a
//                         GPU).
// Rules that keep both the same: code outside each() is uniform (the same in every thread; it runs
// once per block when emulated); each() writes no variable declared outside it (one per thread on a
// GPU, one for all threads when emulated): what one each() leaves for a later one is in the block's
// shared memory (a struct passed in); and any two each() have a b.sync() between them (the
// emulator enforces it).
//
//   copyTileBody(DeviceBlock{}, entries, count, tile);            // in a __global__ function
//   emulateGrid(plan.blocks, kThreads, [&](const auto& b) {         // a test
//     copyTileBody(b, plan.entries.data(), plan.entries.size(), plan.tile_bytes);
//   });
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
// otherwise (a multiple of 8, so that every tile of a 16-byte aligned tensor is aligned too).
// 1024: one 16-byte vector of f32 per thread, and the most blocks in flight (bench/README.md).
constexpr size_t kDefaultChunk = 1024;
constexpr unsigned kMaxBlocks = 65535u * 8u;

// N elements moved with one load or store: 16 bytes are one 128-bit access on a GPU.
template <class E, int N>
struct alignas(sizeof(E) * N) Vec {
  E v[N];
};
using Words4 = Vec<std::uint32_t, 4>;
using Floats4 = Vec<float, 4>;
using Halves4 = Vec<std::uint16_t, 4>;

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

// Vectors per thread per turn of an element kernel's grid-stride loop, loaded before any is
// stored: more loads in flight per thread than one at a time, which the compiler would not
// arrange itself (the stores may alias the next turn's loads as far as it knows).
constexpr unsigned kUnroll = 4;

// The grid of an element kernel over `items` (elementItems): a thread per kUnroll items.
inline unsigned elementGrid(size_t items) { return gridFor((items + kUnroll - 1) / kUnroll); }

#if defined(__CUDA_ARCH__)
#define RALLY_UNROLL _Pragma("unroll")
#define RALLY_UNROLL_ONCE _Pragma("unroll 1")
#else
#define RALLY_UNROLL
#define RALLY_UNROLL_ONCE
#endif

// A grid-stride loop over indices [first, n) in steps of `stride`, kUnroll at a time: load(k, i)
// for each of the (up to) kUnroll indices, then store(k, i) for each. load keeps what it read in
// slot k of the caller's per-thread array; store computes from it and writes.
template <unsigned kU = kUnroll, class Load, class Store>
RALLY_HD void unrolledLoop(size_t first, size_t stride, size_t n, Load&& load, Store&& store) {
  for (size_t i = first; i < n; i += kU * stride) {
    RALLY_UNROLL
    for (unsigned k = 0; k < kU; ++k) {
      if (i + k * stride < n) load(k, i + k * stride);
    }
    RALLY_UNROLL
    for (unsigned k = 0; k < kU; ++k) {
      if (i + k * stride < n) store(k, i + k * stride);
    }
  }
}

// ---- multi-tensor launches: a table of tensors, tiles of `chunk` elements
// ------------------------
//
// A multi-tensor operation is one launch of many thread blocks, each moving one tile (at most
// `chunk` elements) of one tensor. The launch's table has one entry per tensor, with the index of
// its first block; a block finds its tensor by a binary search of the table. So the table grows
// with the number of tensors, not with their size, and small tiles (many blocks in flight, a few
// loads per thread) cost no larger upload.

// The entry whose blocks include `block`: the last with first_block <= block (entries in order of
// first_block, the first at 0).
template <class Entry>
RALLY_HD size_t entryOf(const Entry* entries, size_t count, size_t block) {
  size_t lo = 0, hi = count;
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    if (entries[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// A table of up to kInlineEntries goes with the launch itself, as a kernel parameter read through
// the constant cache, so that nothing is copied to the device before the kernel; a larger one is
// uploaded.
constexpr size_t kInlineEntries = 32;
template <class Entry>
struct InlineTable {
  Entry entries[kInlineEntries];
};

// A table and the blocks its launch needs.
template <class Entry>
struct Plan {
  std::vector<Entry> entries;
  size_t blocks = 0;
};

// ---- pack and unpack --------------------------------------------------------------------------

struct CopyEntry {
  const unsigned char* src;
  unsigned char* dst;
  size_t bytes;
  size_t first_block;
};

struct CopyPlan : Plan<CopyEntry> {
  size_t tile_bytes = 0;  // bytes per block: chunk elements
};

// Appends a copy of `bytes` bytes (none if empty).
inline void addCopy(const unsigned char* src, unsigned char* dst, size_t bytes, CopyPlan* plan) {
  if (bytes == 0) return;
  plan->entries.push_back({src, dst, bytes, plan->blocks});
  plan->blocks += (bytes + plan->tile_bytes - 1) / plan->tile_bytes;
}

// The plans of pack (tensors, in order, into the bucket) and unpack (back).
inline CopyPlan packPlan(const std::vector<ConstTensorView>& tensors, void* bucket, DType type,
                         size_t chunk = kDefaultChunk) {
  const size_t es = dtypeSize(type);
  CopyPlan plan;
  plan.tile_bytes = chunk * es;
  auto* out = static_cast<unsigned char*>(bucket);
  for (const ConstTensorView& t : tensors) {
    addCopy(static_cast<const unsigned char*>(t.data), out, t.count * es, &plan);
    out += t.count * es;
  }
  return plan;
}
inline CopyPlan unpackPlan(const void* bucket, const std::vector<TensorView>& tensors, DType type,
                           size_t chunk = kDefaultChunk) {
  const size_t es = dtypeSize(type);
  CopyPlan plan;
  plan.tile_bytes = chunk * es;
  const auto* in = static_cast<const unsigned char*>(bucket);
  for (const TensorView& t : tensors) {
    addCopy(in, static_cast<unsigned char*>(t.data), t.count * es, &plan);
    in += t.count * es;
  }
  return plan;
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

// One tile of one entry. tile_bytes is a multiple of 16 (chunk is a multiple of 8 elements of at
// least 2 bytes), so a tile is as aligned as its tensor.
template <class Block>
RALLY_HD void copyTileBody(const Block& b, const CopyEntry* entries, size_t count,
                           size_t tile_bytes) {
  const CopyEntry& e = entries[entryOf(entries, count, b.index())];
  const size_t at = (b.index() - e.first_block) * tile_bytes;
  const unsigned char* src = e.src + at;
  unsigned char* dst = e.dst + at;
  const size_t bytes = e.bytes - at < tile_bytes ? e.bytes - at : tile_bytes;
  b.each([&](unsigned t) {
    size_t done = 0;
    if (alignedTo(src, 16) && alignedTo(dst, 16)) {
      done = bytes / 16;
      copyItems(t, b.size(), reinterpret_cast<const Words4*>(src), reinterpret_cast<Words4*>(dst),
                done);
      done *= 16;
    } else if (alignedTo(src, 4) && alignedTo(dst, 4)) {
      done = bytes / 4;
      copyItems(t, b.size(), reinterpret_cast<const std::uint32_t*>(src),
                reinterpret_cast<std::uint32_t*>(dst), done);
      done *= 4;
    }
    for (size_t i = done + t; i < bytes; i += b.size()) dst[i] = src[i];
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

// Vectors per thread per turn: kUnroll of f32; of f16 and bf16 (eight elements each, and more
// arithmetic per byte) half as many, so that registers leave room for more threads.
template <DType T>
constexpr unsigned kScaleCheckUnroll = T == DType::kF32 ? kUnroll : kUnroll / 2;
// The grid scaleCheckBody's launch takes over `items` (elementItems).
template <DType T>
unsigned scaleCheckGrid(size_t items) {
  return gridFor((items + kScaleCheckUnroll<T> - 1) / kScaleCheckUnroll<T>);
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
    V v[kScaleCheckUnroll<T>];
    unrolledLoop<kScaleCheckUnroll<T>>(
        first, stride, vectors,
        [&](unsigned k, size_t i) { v[k] = reinterpret_cast<const V*>(d)[i]; },
        [&](unsigned k, size_t i) {
          for (size_t e = 0; e < kPer; ++e) v[k].v[e] = scale(v[k].v[e]);
          reinterpret_cast<V*>(d)[i] = v[k];
        });
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
    Floats4 x[kUnroll], r[kUnroll];
    unrolledLoop(
        first, stride, vectors,
        [&](unsigned k, size_t i) {
          x[k] = reinterpret_cast<const Floats4*>(in)[i];
          r[k] = reinterpret_cast<const Floats4*>(residual)[i];
        },
        [&](unsigned k, size_t i) {
          Halves4 o;
          for (int e = 0; e < 4; ++e) o.v[e] = portable::compressBf16Element(x[k].v[e], &r[k].v[e]);
          reinterpret_cast<Floats4*>(residual)[i] = r[k];
          reinterpret_cast<Halves4*>(out)[i] = o;
        });
    for (size_t i = vectors * 4 + first; i < n; i += stride)
      out[i] = portable::compressBf16Element(in[i], &residual[i]);
  });
}

// Vectors of 4: an 8-byte load of bf16 and a 16-byte store of f32 per vector, so that every
// load and store of a warp is one contiguous run.
RALLY_HD size_t decompressVectors(const std::uint16_t* in, const float* out, size_t n) {
  return alignedTo(in, 8) && alignedTo(out, 16) ? n / 4 : 0;
}

template <class Block>
RALLY_HD void decompressBody(const Block& b, const std::uint16_t* in, float* out, size_t n) {
  const size_t vectors = decompressVectors(in, out, n);
  b.each([&](unsigned t) {
    const size_t first = static_cast<size_t>(b.index()) * b.size() + t;
    const size_t stride = static_cast<size_t>(b.count()) * b.size();
    Halves4 h[kUnroll];
    unrolledLoop(
        first, stride, vectors,
        [&](unsigned k, size_t i) { h[k] = reinterpret_cast<const Halves4*>(in)[i]; },
        [&](unsigned k, size_t i) {
          Floats4 f;
          for (int e = 0; e < 4; ++e) f.v[e] = portable::fromBf16(h[k].v[e]);
          reinterpret_cast<Floats4*>(out)[i] = f;
        });
    for (size_t i = vectors * 4 + first; i < n; i += stride) out[i] = portable::fromBf16(in[i]);
  });
}

// ---- block checksums: XXH3-64 of each block, one thread block per checksum block ---------------
//
// XXH3's long path split as portable.h describes. The block's 1 KiB segments go in turns of a
// layout's kSegmentsPerTurn: in turn g the threads add up turn g's segments, each thread its part
// of some stripes of two lanes (one 16-byte load per stripe), into one of two buffers in shared
// memory, while threads 0-7 (lane t each) take turn g - 1's from the other buffer and chain its
// scrambles; a segment's addition to a lane is the sum of its kSlots parts. The first turn also
// adds up the tail's stripes (up to 15 after the last full segment, and the final stripe), one
// lane of one stripe per thread: added after the last scramble, they can be computed at any time,
// so their loads go with the first turn's. A turn makes its loads before it uses any (the tail's,
// and the layout's where it keeps them in registers), so that one round trip to memory covers
// them and the chain. Then the merge. Blocks of 240 bytes or less take the short paths on one
// thread. checksumBody computes one checksum block per thread block (what the kernels launch);
// checksumGroupBody, a candidate, several, each block's chain and merge overlapping the next
// block's loads.
//
// Two layouts of a turn's loads:
//   ChecksumLanePairs (the launch's): four threads per segment, each adding up one lane pair over
//     all 16 stripes (one part per segment), 64 segments per turn; its 16 loads per thread are
//     made and summed in add() (in registers until then they would be 64). A warp's load is 64
//     bytes from each of 8 segments 1 KiB apart, and a 64 KiB block is one turn, whose 63
//     scrambles follow all its loads.
//   ChecksumWarpRuns<S> (a candidate, not yet measured on a device: bench/kernels times it beside
//     the other, bench/README.md): every load of a warp is one contiguous run of 512 bytes (lane
//     l: 16 bytes at 16 * l, so lane pair l % 4 of stripe l / 4, then of stripe l / 4 + 8 in the
//     segment's second half); a warp takes S whole segments per turn, 8 * S in all, and each
//     segment has 8 parts. The chain of a turn overlaps the next turn's loads; only the last
//     turn's (8 * S scrambles at most) follows them.

// Stripes after the last full segment: up to 15, and the final stripe.
constexpr unsigned kTailStripes = portable::kXxhStripesPerSegment;

// kBlocks: checksum blocks in hand at once (checksumBody 1; checksumGroupBody 2).
template <class Layout, unsigned kBlocks = 1>
struct ChecksumShared {
  // A turn's segments, part by part, for each lane; alternately.
  std::uint64_t parts[2][Layout::kSegmentsPerTurn][Layout::kSlots][8];
  // A block's tail stripes, and its lanes; alternately when there are two blocks in hand, for one
  // block's chain and merge to overlap the next block's first step.
  std::uint64_t tail[kBlocks][kTailStripes][8];
  std::uint64_t acc[kBlocks][8];
};

// `in`: the checksum block; `full`: its full segments; `first`: the turn's first segment;
// `parts`: the turn's buffer; `secret` as checksumBody's.
struct ChecksumLanePairs {
  static constexpr unsigned kSegmentsPerTurn = kThreads / 4, kSlots = 1;
  struct Loaded {};  // 16 loads per thread: add() makes them and sums them as they come
  template <unsigned kAlign>
  RALLY_HD static Loaded load(unsigned, const std::uint8_t*, size_t, size_t) {
    return {};
  }
  template <unsigned kAlign>
  RALLY_HD static void add(unsigned t, const Loaded&, const std::uint8_t* in, size_t full,
                           size_t first, std::uint64_t (*parts)[kSlots][8],
                           const std::uint8_t* secret) {
    const unsigned pair = t % 4, slot = t / 4;
    const size_t seg = first + slot;
    if (seg >= full) return;
    const portable::Words2 c =
        portable::xxh3SegmentLanePair<kAlign, true>(in, seg, secret, static_cast<int>(pair));
    parts[slot][0][2 * pair] = c.even;
    parts[slot][0][2 * pair + 1] = c.odd;
  }
};

template <unsigned kSegmentsPerWarp>
struct ChecksumWarpRuns {
  static constexpr unsigned kSegmentsPerTurn = kThreads / 32 * kSegmentsPerWarp, kSlots = 8;
  struct Loaded {
    portable::Words2 w[kSegmentsPerWarp][2];  // each segment's two halves
  };
  // Before the chain, so that the chain's time goes with the loads' flight.
  template <unsigned kAlign>
  RALLY_HD static Loaded load(unsigned t, const std::uint8_t* in, size_t full, size_t first) {
    const unsigned warp = t / 32, lane = t % 32;
    const size_t mine = first + warp * kSegmentsPerWarp;
    Loaded l{};
    RALLY_UNROLL
    for (unsigned i = 0; i < kSegmentsPerWarp; ++i) {
      if (mine + i < full) {
        const std::uint8_t* at = in + (mine + i) * portable::kXxhSegmentBytes + 16 * lane;
        l.w[i][0] = portable::inputPair<kAlign>(at);
        l.w[i][1] = portable::inputPair<kAlign>(at + 512);
      }
    }
    return l;
  }
  template <unsigned kAlign>
  RALLY_HD static void add(unsigned t, const Loaded& l, const std::uint8_t*, size_t full,
                           size_t first, std::uint64_t (*parts)[kSlots][8],
                           const std::uint8_t* secret) {
    namespace p = portable;
    const unsigned warp = t / 32, lane = t % 32, pair = lane % 4, slot = lane / 4;
    const size_t mine = first + warp * kSegmentsPerWarp;
    const std::uint8_t* sec = secret + 8 * slot + 16 * pair;
    RALLY_UNROLL
    for (unsigned i = 0; i < kSegmentsPerWarp; ++i) {
      if (mine + i >= full) break;
      std::uint64_t even = 0, odd = 0;
      RALLY_UNROLL
      for (unsigned h = 0; h < 2; ++h) {  // stripes `slot` and `slot` + 8, 64 secret bytes apart
        even +=
            p::xxh3StripeLaneWords(l.w[i][h].even, l.w[i][h].odd, p::inputWord<true>(sec + 64 * h));
        odd += p::xxh3StripeLaneWords(l.w[i][h].odd, l.w[i][h].even,
                                      p::inputWord<true>(sec + 64 * h + 8));
      }
      std::uint64_t* to = parts[warp * kSegmentsPerWarp + i][slot];
      to[2 * pair] = even;
      to[2 * pair + 1] = odd;
    }
  }
};

// What the data of a checksum launch is aligned to, and so its loads: 16 (128-bit loads), 8
// (64-bit) or 1 (bytes); every block starts as aligned as the data.
RALLY_HD unsigned checksumAlignment(const void* data, size_t block) {
  if (alignedTo(data, 16) && block % 16 == 0) return 16;
  if (alignedTo(data, 8) && block % 8 == 0) return 8;
  return 1;
}

// The tail's stripes: thread t adds lane t % 8 of stripe t / 8 (nothing for t >= 128). Its two
// input words are loaded with the first turn's, before any of those is used (else their round
// trip to memory would follow that turn's), and added up after them.
struct ChecksumTailWords {
  std::uint64_t own = 0, other = 0;  // lane t % 8's input word, and its neighbour's
};

template <unsigned kAlign>
RALLY_HD ChecksumTailWords checksumTailLoad(unsigned t, const std::uint8_t* in, size_t len) {
  namespace p = portable;
  constexpr bool kWords = kAlign >= 8;  // 64-bit loads
  const unsigned lane = t % 8, slot = t / 8;
  if (slot >= kTailStripes) return {};
  const size_t full = p::xxh3FullSegments(len);
  const size_t stripes = ((len - 1) - p::kXxhSegmentBytes * full) / 64;
  if (slot < stripes) {
    const std::uint8_t* at = in + full * p::kXxhSegmentBytes + 64 * slot;
    return {p::inputWord<kWords>(at + 8 * lane), p::inputWord<kWords>(at + 8 * (lane ^ 1))};
  }
  if (slot > stripes) return {};
  const std::uint8_t* last = in + len - 64;  // the final stripe: the last 64 bytes
  if (kWords && len % 8 == 0) {
    return {p::inputWord<true>(last + 8 * lane), p::inputWord<true>(last + 8 * (lane ^ 1))};
  }
  return {p::inputWord<false>(last + 8 * lane), p::inputWord<false>(last + 8 * (lane ^ 1))};
}

RALLY_HD void checksumTailStripe(unsigned t, const ChecksumTailWords& w, std::uint64_t (*tail)[8],
                                 size_t len, const std::uint8_t* secret) {
  namespace p = portable;
  const unsigned lane = t % 8, slot = t / 8;
  if (slot >= kTailStripes) return;
  const size_t full = p::xxh3FullSegments(len);
  const size_t stripes = ((len - 1) - p::kXxhSegmentBytes * full) / 64;
  std::uint64_t c = 0;
  if (slot < stripes) {
    c = p::xxh3StripeLaneWords(w.own, w.other, p::inputWord<true>(secret + 8 * slot + 8 * lane));
  } else if (slot == stripes) {
    // The final stripe's secret is 7 bytes back from its end: not 8-byte aligned.
    c = p::xxh3StripeLaneWords(w.own, w.other,
                               p::inputWord<false>(secret + p::kSecretSize - 64 - 7 + 8 * lane));
  }
  tail[slot][lane] = c;
}

// Threads 0-7 (lane t): the chain of a turn's n segments from `a`, their parts in `parts`.
template <class Layout>
RALLY_HD std::uint64_t checksumChain(unsigned t, const std::uint64_t (*parts)[Layout::kSlots][8],
                                     size_t n, std::uint64_t a, const std::uint8_t* secret) {
  namespace p = portable;
  const std::uint64_t scramble = p::xxh3ScrambleSecret(secret, static_cast<int>(t));
  const auto part = [&](size_t j) {
    std::uint64_t c = 0;
    for (unsigned s = 0; s < Layout::kSlots; ++s) c += parts[j][s][t];
    return c;
  };
  if constexpr (Layout::kSlots == 1) {
    for (size_t j = 0; j < n; ++j) a = p::xxh3Chain(a, part(j), scramble);
  } else {
    RALLY_UNROLL_ONCE
    for (size_t j = 0; j < n; ++j) a = p::xxh3Chain(a, part(j), scramble);
  }
  return a;
}

// Threads 0-7, once a block's tail stripes are in `tail`: what they add to lane t.
RALLY_HD std::uint64_t checksumTailSum(const std::uint64_t (*tail)[8], unsigned t) {
  std::uint64_t sum = 0;
  for (unsigned st = 0; st < kTailStripes; ++st) sum += tail[st][t];
  return sum;
}

// `secret`: XXH3's 192-byte secret, 16-byte aligned (on a GPU in global memory: the lanes of a
// warp read different words of it, which the L1 cache serves, where the constant cache would
// serialise them).
template <unsigned kAlign, class Layout, class Block>
RALLY_HD void checksumBody(const Block& b, ChecksumShared<Layout>& sh, const std::uint8_t* secret,
                           const std::uint8_t* data, size_t bytes, size_t block,
                           std::uint64_t* out) {
  namespace p = portable;
  constexpr unsigned kPerTurn = Layout::kSegmentsPerTurn;
  const size_t index = b.index();
  const std::uint8_t* in = data + index * block;
  const size_t len = bytes - index * block < block ? bytes - index * block : block;
  if (len <= 240) {
    b.each([&](unsigned t) {
      if (t == 0) out[index] = p::xxh3Short(in, len, secret);
    });
    return;
  }
  const size_t full = p::xxh3FullSegments(len);
  const size_t turns = (full + kPerTurn - 1) / kPerTurn;
  for (size_t g = 0; g <= turns; ++g) {
    b.each([&](unsigned t) {
      // Every load of the turn first (the layout's and, in the first turn, the tail's), then the
      // chain of the turn before, then the sums.
      const ChecksumTailWords tail =
          g == 0 ? checksumTailLoad<kAlign>(t, in, len) : ChecksumTailWords{};
      const typename Layout::Loaded loaded =
          g < turns ? Layout::template load<kAlign>(t, in, full, g * kPerTurn)
                    : typename Layout::Loaded{};
      if (g > 0 && t < 8) {
        const size_t first = (g - 1) * kPerTurn;
        const size_t n = full - first < kPerTurn ? full - first : kPerTurn;
        std::uint64_t a = g == 1 ? p::xxh3InitLane(static_cast<int>(t)) : sh.acc[0][t];
        a = checksumChain<Layout>(t, sh.parts[(g - 1) % 2], n, a, secret);
        sh.acc[0][t] = g == turns ? a + checksumTailSum(sh.tail[0], t) : a;
      }
      if (g < turns) {
        Layout::template add<kAlign>(t, loaded, in, full, g * kPerTurn, sh.parts[g % 2], secret);
      }
      if (g == 0) checksumTailStripe(t, tail, sh.tail[0], len, secret);
    });
    b.sync();  // the chain has read one buffer before the turn after next writes it
  }
  if (turns == 0) {  // no full segment: no chain
    b.each([&](unsigned t) {
      if (t < 8)
        sh.acc[0][t] = p::xxh3InitLane(static_cast<int>(t)) + checksumTailSum(sh.tail[0], t);
    });
    b.sync();
  }
  b.each([&](unsigned t) {
    if (t == 0) out[index] = p::xxh3LongMerge(sh.acc[0], len, secret);
  });
}

// One checksum block of a launch: where it starts, its length, its full segments and the turns
// they take (none for a block of 240 bytes or less, which takes the short paths on one thread).
struct ChecksumBlockAt {
  const std::uint8_t* in;
  size_t len, full, turns;
  // The steps of a long block: one per turn, or one for the tail alone when it has no full
  // segment.
  RALLY_HD size_t steps() const { return turns > 0 ? turns : 1; }
};

RALLY_HD ChecksumBlockAt checksumBlockAt(const std::uint8_t* data, size_t bytes, size_t block,
                                         size_t index, unsigned per_turn) {
  const size_t len = bytes - index * block < block ? bytes - index * block : block;
  const size_t full = len > 240 ? portable::xxh3FullSegments(len) : 0;
  return {data + index * block, len, full, (full + per_turn - 1) / per_turn};
}

// The thread that merges a block's lanes: in another warp than the chain's threads 0-7, so that
// a merge and the next block's chain run side by side.
constexpr unsigned kChecksumMergeThread = 32;
static_assert(kThreads > kChecksumMergeThread);

// A candidate (bench/kernels times it; the kernels launch checksumBody): `per_thread_block`
// checksum blocks per thread block (thread block i: blocks i * per_thread_block on, at least one),
// computed as one stream of steps. In each step the threads load and add up one turn of a block
// while threads 0-7 chain the turn before (which may be the previous block's last) and thread
// kChecksumMergeThread merges the block whose last turn was chained in the step before; so a
// block's chain and merge overlap the next block's loads. The parts are double buffered by step,
// the tails and lanes by block. Blocks of 240 bytes or less come last, one per thread. `secret` as
// checksumBody's.
template <unsigned kAlign, class Layout, class Block>
RALLY_HD void checksumGroupBody(const Block& b, ChecksumShared<Layout, 2>& sh,
                                const std::uint8_t* secret, const std::uint8_t* data, size_t bytes,
                                size_t block, size_t per_thread_block, std::uint64_t* out) {
  namespace p = portable;
  constexpr unsigned kPerTurn = Layout::kSegmentsPerTurn;
  const size_t blocks = (bytes + block - 1) / block;
  const size_t first = b.index() * per_thread_block;
  if (per_thread_block == 0 || first >= blocks) return;
  const size_t end = blocks - first < per_thread_block ? blocks : first + per_thread_block;
  const auto at = [&](size_t k) { return checksumBlockAt(data, bytes, block, k, kPerTurn); };
  // Only the launch's last block can be short, unless every block is.
  const size_t long_end = block <= 240 ? first : at(end - 1).len <= 240 ? end - 1 : end;
  // The thread block's long blocks take `steps` steps: every block but the launch's last one
  // `per_block` (a turn each, or one step for a tail alone), its last block `last.steps()`. In
  // step s, the threads load step s, chain step s - 1 and merge the block step s - 2 ended.
  const size_t count = long_end - first;
  const ChecksumBlockAt head = at(first), last = at(count > 0 ? long_end - 1 : first);
  const size_t per_block = head.steps();
  const size_t steps = count == 0 ? 0 : (count - 1) * per_block + last.steps();
  // Of step s: its block's place among the thread block's, and that block.
  const auto placeOf = [&](size_t s) { return s / per_block < count ? s / per_block : count - 1; };
  const auto blockAt = [&](size_t j) {
    return j + 1 == count ? last
                          : ChecksumBlockAt{head.in + j * block, head.len, head.full, head.turns};
  };
  for (size_t step = 0; step < steps + 2 && count > 0; ++step) {
    const bool loading = step < steps, chaining = step >= 1 && step <= steps;
    const size_t k = placeOf(step), ck = placeOf(step - 1), mk = placeOf(step - 2);
    const size_t g = step - k * per_block, cg = step - 1 - ck * per_block;
    const ChecksumBlockAt lb = blockAt(k), cb = blockAt(ck), mb = blockAt(mk);
    const bool merging = step >= 2 && step - 2 - mk * per_block + 1 == mb.steps();
    b.each([&](unsigned t) {
      // Every load of the step first (the layout's and, in a block's first step, the tail's),
      // then the chain of the step before and the merge, then the sums.
      const ChecksumTailWords tail =
          loading && g == 0 ? checksumTailLoad<kAlign>(t, lb.in, lb.len) : ChecksumTailWords{};
      const bool adding = loading && g < lb.turns;
      const typename Layout::Loaded loaded =
          adding ? Layout::template load<kAlign>(t, lb.in, lb.full, g * kPerTurn)
                 : typename Layout::Loaded{};
      if (chaining && t < 8) {
        const size_t from = cg * kPerTurn;
        const size_t n = cb.full - from < kPerTurn ? cb.full - from : kPerTurn;  // 0: tail only
        std::uint64_t* acc = sh.acc[(first + ck) % 2];
        std::uint64_t a = cg == 0 ? p::xxh3InitLane(static_cast<int>(t)) : acc[t];
        a = checksumChain<Layout>(t, sh.parts[(step - 1) % 2], n, a, secret);
        acc[t] = cg + 1 == cb.steps() ? a + checksumTailSum(sh.tail[(first + ck) % 2], t) : a;
      }
      if (merging && t == kChecksumMergeThread) {
        out[first + mk] = p::xxh3LongMerge(sh.acc[(first + mk) % 2], mb.len, secret);
      }
      if (adding) {
        Layout::template add<kAlign>(t, loaded, lb.in, lb.full, g * kPerTurn, sh.parts[step % 2],
                                     secret);
      }
      if (loading && g == 0) {
        checksumTailStripe(t, tail, sh.tail[(first + k) % 2], lb.len, secret);
      }
    });
    // The chain has read one parts buffer before the step after next writes it; a block's lanes
    // and tail are read before the block after next writes them.
    b.sync();
  }
  if (long_end < end) {
    b.each([&](unsigned t) {
      for (size_t k = long_end + t; k < end; k += b.size()) {
        out[k] = p::xxh3Short(data + k * block, at(k).len, secret);
      }
    });
  }
}

// ---- multi-tensor AdamW: a table of tensors, a tile of `chunk` elements per block -------------

struct AdamWEntry {
  float* param;
  const float* grad;
  float* m;
  float* v;
  std::uint16_t* bf16;  // or nullptr
  size_t count;
  size_t first_block;
};

// Vectors per thread per turn: four streams of each are in flight, and fewer registers leave
// room for more threads per multiprocessor (adamwTiles is launched for four blocks of 256).
constexpr unsigned kAdamWUnroll = 2;

struct AdamWPlan : Plan<AdamWEntry> {
  size_t chunk = 0;  // elements per block
};

inline AdamWPlan adamwPlan(const std::vector<AdamWTensor>& tensors, size_t chunk = kDefaultChunk) {
  AdamWPlan plan;
  plan.chunk = chunk;
  for (const AdamWTensor& t : tensors) {
    if (t.count == 0) continue;
    plan.entries.push_back(
        {t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.bf16_param, t.count, plan.blocks});
    plan.blocks += (t.count + chunk - 1) / chunk;
  }
  return plan;
}

// One tile of one tensor. chunk is a multiple of 8, so a tile is as aligned as its tensor.
template <class Block>
RALLY_HD void adamwTileBody(const Block& b, const AdamWEntry* entries, size_t count, size_t chunk,
                            const portable::AdamWStep& s) {
  const AdamWEntry& e = entries[entryOf(entries, count, b.index())];
  const size_t at = (b.index() - e.first_block) * chunk;
  float* param = e.param + at;
  const float* grad = e.grad + at;
  float* m = e.m + at;
  float* v = e.v + at;
  std::uint16_t* bf16 = e.bf16 != nullptr ? e.bf16 + at : nullptr;
  const size_t n = e.count - at < chunk ? e.count - at : chunk;
  const bool vector = alignedTo(param, 16) && alignedTo(grad, 16) && alignedTo(m, 16) &&
                      alignedTo(v, 16) && (bf16 == nullptr || alignedTo(bf16, 8));
  const size_t vectors = vector ? n / 4 : 0;
  b.each([&](unsigned t) {
    Floats4 pv[kAdamWUnroll], gv[kAdamWUnroll], mv[kAdamWUnroll], vv[kAdamWUnroll];
    unrolledLoop<kAdamWUnroll>(
        t, b.size(), vectors,
        [&](unsigned k, size_t i) {
          pv[k] = reinterpret_cast<const Floats4*>(param)[i];
          gv[k] = reinterpret_cast<const Floats4*>(grad)[i];
          mv[k] = reinterpret_cast<const Floats4*>(m)[i];
          vv[k] = reinterpret_cast<const Floats4*>(v)[i];
        },
        [&](unsigned k, size_t i) {
          for (int j = 0; j < 4; ++j) {
            portable::adamwElement(&pv[k].v[j], gv[k].v[j], &mv[k].v[j], &vv[k].v[j], s);
          }
          reinterpret_cast<Floats4*>(param)[i] = pv[k];
          reinterpret_cast<Floats4*>(m)[i] = mv[k];
          reinterpret_cast<Floats4*>(v)[i] = vv[k];
          if (bf16 != nullptr) {
            Halves4 h;
            for (int j = 0; j < 4; ++j) h.v[j] = portable::toBf16(pv[k].v[j]);
            reinterpret_cast<Halves4*>(bf16)[i] = h;
          }
        });
    for (size_t i = vectors * 4 + t; i < n; i += b.size()) {
      portable::adamwElement(&param[i], grad[i], &m[i], &v[i], s);
      if (bf16 != nullptr) bf16[i] = portable::toBf16(param[i]);
    }
  });
}

}  // namespace rally::kernels::internal
