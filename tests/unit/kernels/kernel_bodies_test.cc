// The CUDA kernels' bodies (kernels/ops/internal/kernel_bodies.h) on an emulated grid
// (emulated_grid.h), against the CPU references: the same indexing, alignment and vector paths a
// GPU runs, tested on machines without one. Every case runs with threads and blocks forwards and
// backwards (a race within one each() would show as a difference), and the element kernels also on
// a 3-block grid as well as the launch's own (the grid-stride loops' later turns), and the
// multi-tensor ones at 256-element chunks as well as the default. Inputs are fresh random values
// (never zeros), at odd sizes, at aligned and misaligned addresses. The emulator's own refusals
// (a missing barrier, a barrier or a vote in divergent code) are tested first.
#include <gtest/gtest.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/ops/internal/kernel_bodies.h"
#include "kernels/ops/kernels.h"
#include "tests/unit/kernels/emulated_grid.h"
#include "tests/unit/kernels/kernel_test_data.h"

namespace rally::kernels::internal {
namespace {

namespace p = portable;

constexpr ThreadOrder kOrders[] = {ThreadOrder::kForwards, ThreadOrder::kBackwards};

// `bytes` bytes at `misalign` bytes past a 64-byte boundary.
class Buffer {
 public:
  explicit Buffer(size_t bytes, size_t misalign = 0) : storage_(bytes + 128), bytes_(bytes) {
    const auto base = reinterpret_cast<std::uintptr_t>(storage_.data());
    data_ = storage_.data() + ((64 - base % 64) % 64) + misalign;
  }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }
  template <typename T>
  void put(const std::vector<T>& v) {
    ASSERT_LE(v.size() * sizeof(T), bytes_);
    std::memcpy(data_, v.data(), v.size() * sizeof(T));
  }
  template <typename T>
  std::vector<T> take(size_t count) const {
    std::vector<T> v(count);
    std::memcpy(v.data(), data_, count * sizeof(T));
    return v;
  }

 private:
  std::vector<unsigned char> storage_;
  size_t bytes_;
  unsigned char* data_;
};

TEST(EmulatedGrid, BackwardsOrderExposesARaceWithinOneEach) {
  auto racy = [](ThreadOrder order) {
    int shared = -1;
    emulateGrid(
        1, kThreads,
        [&](const auto& b) { b.each([&](unsigned t) { shared = static_cast<int>(t); }); }, order);
    return shared;
  };
  EXPECT_NE(racy(ThreadOrder::kForwards), racy(ThreadOrder::kBackwards));
}

TEST(EmulatedGrid, RefusesTwoEachWithoutABarrierBetween) {
  auto body = [](const auto& b, bool barrier) {
    b.each([](unsigned) {});
    if (barrier) b.sync();
    b.each([](unsigned) {});
  };
  EXPECT_NO_THROW(emulateGrid(2, kThreads, [&](const auto& b) { body(b, true); }));
  EXPECT_THROW(emulateGrid(2, kThreads, [&](const auto& b) { body(b, false); }), std::logic_error);
}

TEST(EmulatedGrid, RefusesBarriersAndVotesInDivergentCode) {
  int flag = 0;
  EXPECT_THROW(
      emulateGrid(1, kThreads, [&](const auto& b) { b.each([&](unsigned) { b.sync(); }); }),
      std::logic_error);
  EXPECT_THROW(
      emulateGrid(1, kThreads,
                  [&](const auto& b) { b.each([&](unsigned) { b.each([](unsigned) {}); }); }),
      std::logic_error);
  EXPECT_THROW(emulateGrid(1, kThreads,
                           [&](const auto& b) {
                             b.each([&](unsigned t) {
                               if (t % 2 == 0) b.flagIfAny(true, &flag);
                             });
                           }),
               std::logic_error);
  EXPECT_NO_THROW(emulateGrid(1, kThreads, [&](const auto& b) {
    b.each([&](unsigned t) { b.flagIfAny(t == 7, &flag); });
  }));
  EXPECT_EQ(flag, 1);
}

// The default chunk size and the smallest allowed (many chunks per tensor).
constexpr size_t kChunkSizes[] = {kDefaultChunk, 256};

TEST(KernelBodies, PackAndUnpackChunksMoveEveryByteAtEveryAlignment) {
  const std::vector<size_t> counts = {1, 3, 0, 2 * kDefaultChunk + 7, 5, 100003};
  size_t total = 0;
  for (size_t c : counts) total += c;
  for (size_t chunk : kChunkSizes) {
    for (DType type : {DType::kF32, DType::kBF16}) {
      const size_t es = dtypeSize(type);
      const auto host = randomElements(total, type, 1);
      // 0: 16-byte vectors; es and 8: 4-byte words or bytes; 1: bytes only.
      for (size_t src_off : {size_t{0}, es, size_t{1}}) {
        for (size_t dst_off : {size_t{0}, size_t{8}}) {
          for (ThreadOrder order : kOrders) {
            Buffer src(host.size(), src_off), bucket(host.size(), dst_off),
                back(host.size(), src_off);
            src.put(host);
            std::vector<ConstTensorView> in;
            std::vector<TensorView> out;
            for (size_t c = 0, at = 0; c < counts.size(); at += counts[c] * es, ++c) {
              in.push_back({src.as<unsigned char>() + at, counts[c]});
              out.push_back({back.as<unsigned char>() + at, counts[c]});
            }
            const CopyPlan packing = packPlan(in, bucket.as<void>(), type, chunk);
            emulateGrid(
                static_cast<unsigned>(packing.blocks), kThreads,
                [&](const auto& b) {
                  copyTileBody(b, packing.entries.data(), packing.entries.size(),
                               packing.tile_bytes);
                },
                order);
            ASSERT_EQ(bucket.take<unsigned char>(host.size()), host)
                << "pack, source +" << src_off << ", bucket +" << dst_off << ", chunk " << chunk;
            const CopyPlan unpacking = unpackPlan(bucket.as<void>(), out, type, chunk);
            emulateGrid(
                static_cast<unsigned>(unpacking.blocks), kThreads,
                [&](const auto& b) {
                  copyTileBody(b, unpacking.entries.data(), unpacking.entries.size(),
                               unpacking.tile_bytes);
                },
                order);
            ASSERT_EQ(back.take<unsigned char>(host.size()), host)
                << "unpack, source +" << src_off << ", bucket +" << dst_off << ", chunk " << chunk;
          }
        }
      }
    }
  }
  // One table entry per tensor that has elements, whatever the chunk size; none for none.
  const CopyPlan plan = packPlan({{nullptr, 0}, {nullptr, 0}}, nullptr, DType::kF32);
  EXPECT_TRUE(plan.entries.empty());
  EXPECT_EQ(plan.blocks, 0u);
}

template <DType T>
void expectScaleCheckEqualsTheCpu(size_t n, size_t misalign) {
  auto cpu = cpuKernels();
  for (ThreadOrder order : kOrders) {
    for (unsigned grid_choice : {0u, 3u}) {  // 0: the launch's own grid
      // An infinity at the first element and at the last (vectors or tail, depending on n and
      // the alignment), and none.
      for (size_t bad : {size_t{0}, n - 1, n}) {
        auto host = randomElements(n, T, static_cast<std::uint32_t>(n + bad));
        if (bad < n) setElement(&host, bad, T, std::numeric_limits<float>::infinity());
        Buffer d(host.size(), misalign);
        d.put(host);
        const size_t vectors = scaleCheckVectors<T>(d.as<void>(), n);
        ASSERT_EQ(vectors, misalign == 0 ? n / kPerVector<T> : 0);
        const unsigned grid = grid_choice == 0
                                  ? scaleCheckGrid<T>(elementItems(n, vectors, kPerVector<T>))
                                  : grid_choice;
        int flag = 0;
        emulateGrid(
            grid, kThreads,
            [&](const auto& b) { scaleCheckBody<T>(b, d.as<void>(), n, 0.375f, &flag); }, order);
        auto want = host;
        auto finite = cpu->scaleAndCheck(want.data(), n, T, 0.375f);
        ASSERT_TRUE(finite.ok());
        ASSERT_EQ(d.take<unsigned char>(host.size()), want)
            << "n " << n << ", +" << misalign << " bytes, grid " << grid << ", bad " << bad;
        EXPECT_EQ(flag == 0, *finite) << "n " << n << ", bad " << bad;
        EXPECT_EQ(flag == 0, bad == n) << "n " << n << ", bad " << bad;
      }
    }
  }
}

TEST(KernelBodies, ScaleAndCheckEqualsTheCpuForEveryDtypeSizeAndAlignment) {
  for (size_t n : {1u, 3u, 8u, 9u, 100003u}) {
    for (size_t misalign : {0u, 4u}) {
      expectScaleCheckEqualsTheCpu<DType::kF32>(n, misalign);
      expectScaleCheckEqualsTheCpu<DType::kF16>(n, misalign);
      expectScaleCheckEqualsTheCpu<DType::kBF16>(n, misalign);
    }
    expectScaleCheckEqualsTheCpu<DType::kF16>(n, 2);  // 2-byte types at 2-byte alignment
  }
}

TEST(KernelBodies, ScaleAndCheckFlagsAnF16ThatOverflowsWhenScaled) {
  const std::vector<std::uint16_t> host(37, p::toF16(60000.0f));  // finite; x 2 is not
  Buffer d(host.size() * 2);
  d.put(host);
  int flag = 0;
  emulateGrid(1, kThreads, [&](const auto& b) {
    scaleCheckBody<DType::kF16>(b, d.as<void>(), host.size(), 2.0f, &flag);
  });
  EXPECT_EQ(flag, 1);
}

TEST(KernelBodies, CompressionEqualsTheCpuBitForBitAtEveryAlignment) {
  auto cpu = cpuKernels();
  for (size_t n : {1u, 3u, 4u, 100003u}) {
    for (size_t in_off : {0u, 4u}) {
      for (ThreadOrder order : kOrders) {
        for (unsigned grid : {0u, 3u}) {
          const auto g = randomFloats(n, static_cast<std::uint32_t>(n) + 7);
          std::vector<float> res(n, 0.0f);
          std::vector<std::uint16_t> out(n);
          Buffer dg(n * 4, in_off), dres(n * 4), dout(n * 2);
          dg.put(g);
          dres.put(res);
          const auto* in = dg.as<const float>();
          auto* residual = dres.as<float>();
          auto* compressed = dout.as<std::uint16_t>();
          const size_t vectors = compressVectors(in, residual, compressed, n);
          ASSERT_EQ(vectors, in_off == 0 ? n / 4 : 0);
          const unsigned blocks = grid == 0 ? elementGrid(elementItems(n, vectors, 4)) : grid;
          for (int step = 0; step < 3; ++step) {
            auto gs =
                g;  // the middle step with a NaN first and a value bf16 rounds to infinity last
            if (step == 1) {
              gs[0] = std::numeric_limits<float>::quiet_NaN();
              if (n > 1) gs[n - 1] = std::numeric_limits<float>::max();
            }
            dg.put(gs);
            emulateGrid(
                blocks, kThreads,
                [&](const auto& b) { compressBody(b, in, residual, compressed, n); }, order);
            ASSERT_TRUE(cpu->compressBf16(gs.data(), res.data(), out.data(), n).ok());
          }
          ASSERT_EQ(dout.take<std::uint16_t>(n), out) << "n " << n << ", input +" << in_off;
          ASSERT_EQ(dres.take<float>(n), res) << "n " << n << ", input +" << in_off;

          // And back, from an aligned and a misaligned copy of the compressed values.
          for (size_t h_off : {0u, 2u}) {
            Buffer dh(n * 2, h_off), dback(n * 4);
            dh.put(out);
            const size_t back_vectors =
                decompressVectors(dh.as<std::uint16_t>(), dback.as<float>(), n);
            ASSERT_EQ(back_vectors, h_off == 0 ? n / 4 : 0);
            const unsigned back_blocks =
                grid == 0 ? elementGrid(elementItems(n, back_vectors, 4)) : grid;
            emulateGrid(
                back_blocks, kThreads,
                [&](const auto& b) {
                  decompressBody(b, dh.as<std::uint16_t>(), dback.as<float>(), n);
                },
                order);
            std::vector<float> want(n);
            ASSERT_TRUE(cpu->decompressBf16(out.data(), want.data(), n).ok());
            ASSERT_EQ(dback.take<float>(n), want) << "n " << n << ", +" << h_off;
          }
        }
      }
    }
  }
}

// Marks the words no block has written: a checksum equal to it would be a miss, not a result.
constexpr std::uint64_t kUnwritten = 0x5A5A5A5A5A5A5A5Aull;

// per_thread_block 0: checksumBody, one checksum block per thread block (what the kernels
// launch); otherwise checksumGroupBody with that many.
template <unsigned kAlign, class Layout>
std::vector<std::uint64_t> emulatedChecksums(const std::uint8_t* data, size_t bytes, size_t block,
                                             size_t per_thread_block, ThreadOrder order) {
  const size_t blocks = (bytes + block - 1) / block;
  const size_t per = std::max<size_t>(per_thread_block, 1);
  std::vector<std::uint64_t> out(blocks, kUnwritten);
  const auto* secret = reinterpret_cast<const std::uint8_t*>(XXH3_kSecret);
  emulateGrid(
      static_cast<unsigned>((blocks + per - 1) / per), kThreads,
      [&](const auto& b) {
        if (per_thread_block == 0) {
          ChecksumShared<Layout> shared;
          std::memset(&shared, 0xA5, sizeof shared);  // as uninitialised as a GPU's shared memory
          checksumBody<kAlign, Layout>(b, shared, secret, data, bytes, block, out.data());
        } else {
          ChecksumShared<Layout, 2> shared;
          std::memset(&shared, 0xA5, sizeof shared);
          checksumGroupBody<kAlign, Layout>(b, shared, secret, data, bytes, block, per, out.data());
        }
      },
      order);
  return out;
}

// Both layouts of the checksums' loads: the launch's, and the candidates the benchmark times; each
// in checksumBody (as launched), and in checksumGroupBody with one, two and three checksum blocks
// per thread block (the last thread block of a launch then has fewer).
template <class Layout>
class KernelBodiesChecksums : public ::testing::Test {};
using ChecksumLayouts = ::testing::Types<ChecksumLanePairs, ChecksumWarpRuns<1>,
                                         ChecksumWarpRuns<2>, ChecksumWarpRuns<4>>;
TYPED_TEST_SUITE(KernelBodiesChecksums, ChecksumLayouts);

TYPED_TEST(KernelBodiesChecksums, EqualLibxxhashForEveryBlockSizeAndAlignment) {
  using Layout = TypeParam;
  std::vector<unsigned char> host(300007);
  std::mt19937 rng(4);
  for (auto& x : host) x = static_cast<unsigned char>(rng());
  // 1 MiB: one partial block of 292 segments (several turns of every layout, the last one
  // partial); 129 KiB + 16: 129 segments and a tail; 64 KiB + 16: 64 segments (every layout's last
  // turn full) and the final stripe; 65536: 63 segments and a tail of 15 stripes;
  // 33 KiB + 8: 33 segments and the final stripe; 4104 and 1000: tails of whole and partial
  // stripes; 4100 takes the byte loads even on aligned data; 241 and 240 are either side of the
  // long path.
  const std::vector<size_t> block_sizes = {
      1u << 20, 129 * 1024 + 16, 65536 + 16, 65536, 33 * 1024 + 8, 4104, 4100, 1000, 241, 240, 17};
  for (size_t offset : {0u, 3u, 8u}) {
    Buffer d(host.size(), offset);
    d.put(host);
    const auto* data = d.as<const std::uint8_t>();
    for (size_t block : block_sizes) {
      const size_t sample = block < 1000 ? 20000 : host.size();  // the short paths: fewer blocks
      std::vector<std::uint64_t> want;
      for (size_t at = 0; at < sample; at += block) {
        want.push_back(XXH3_64bits(data + at, std::min(block, sample - at)));
      }
      for (ThreadOrder order : kOrders) {
        for (size_t per : {0u, 1u, 2u, 3u}) {
          // Every load width the data allows (the launch picks the widest).
          const unsigned align = checksumAlignment(data, block);
          if (align >= 16) {
            EXPECT_EQ((emulatedChecksums<16, Layout>(data, sample, block, per, order)), want)
                << "128-bit loads, block " << block << ", offset " << offset << ", " << per
                << " per thread block (0: checksumBody)";
          }
          if (align >= 8) {
            EXPECT_EQ((emulatedChecksums<8, Layout>(data, sample, block, per, order)), want)
                << "64-bit loads, block " << block << ", offset " << offset << ", " << per
                << " per thread block (0: checksumBody)";
          }
          EXPECT_EQ((emulatedChecksums<1, Layout>(data, sample, block, per, order)), want)
              << "byte loads, block " << block << ", offset " << offset << ", " << per
              << " per thread block (0: checksumBody)";
        }
      }
    }
  }
}

TEST(KernelBodies, AdamWChunksEqualTheCpuBitForBit) {
  auto cpu = cpuKernels();
  const std::vector<size_t> counts = {1, 0, 3, kDefaultChunk + 5, 100003};
  for (size_t misalign : {0u, 4u}) {
    for (bool with_bf16 : {false, true}) {
      for (auto [order, chunk] : {std::pair{ThreadOrder::kForwards, kDefaultChunk},
                                  std::pair{ThreadOrder::kBackwards, size_t{256}}}) {
        std::vector<Buffer> buffers;
        std::vector<AdamWTensor> emulated, reference;
        std::vector<std::vector<float>> host;  // the CPU's tensors: param, grad, m, v per tensor
        std::vector<std::vector<std::uint16_t>> host_bf16;
        buffers.reserve(counts.size() * 5);
        host.reserve(counts.size() * 4);
        host_bf16.reserve(counts.size());
        for (size_t i = 0; i < counts.size(); ++i) {
          const size_t n = counts[i];
          AdamWTensor e{}, r{};
          float* slots[4];
          for (int k = 0; k < 4; ++k) {
            host.push_back(k < 2 ? randomFloats(n, static_cast<std::uint32_t>(10 * i + k))
                                 : std::vector<float>(n, k == 2 ? 0.01f : 0.0001f));
            buffers.emplace_back(n * 4, k == 1 ? misalign : 0);  // the gradient misaligned
            buffers.back().put(host.back());
            slots[k] = buffers.back().as<float>();
          }
          e = {slots[0], slots[1], slots[2], slots[3], nullptr, n};
          const size_t h = host.size() - 4;
          r = {host[h].data(),
               host[h + 1].data(),
               host[h + 2].data(),
               host[h + 3].data(),
               nullptr,
               n};
          if (with_bf16) {
            buffers.emplace_back(n * 2);
            host_bf16.emplace_back(n);
            e.bf16_param = buffers.back().as<std::uint16_t>();
            r.bf16_param = host_bf16.back().data();
          }
          emulated.push_back(e);
          reference.push_back(r);
        }
        for (std::int64_t step = 1; step <= 3; ++step) {
          const AdamWOptions o{.lr = 1e-2f, .step = step};
          const AdamWPlan plan = adamwPlan(emulated, chunk);
          const p::AdamWStep s =
              p::adamwStep(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.step);
          emulateGrid(
              static_cast<unsigned>(plan.blocks), kThreads,
              [&](const auto& b) {
                adamwTileBody(b, plan.entries.data(), plan.entries.size(), plan.chunk, s);
              },
              order);
          ASSERT_TRUE(cpu->adamw(reference, o).ok());
        }
        for (size_t i = 0; i < counts.size(); ++i) {
          const size_t n = counts[i];
          const auto& e = emulated[i];
          const auto& r = reference[i];
          ASSERT_EQ(std::vector<float>(e.param, e.param + n),
                    std::vector<float>(r.param, r.param + n))
              << "tensor " << i << ", gradient +" << misalign;
          ASSERT_EQ(std::vector<float>(e.exp_avg, e.exp_avg + n),
                    std::vector<float>(r.exp_avg, r.exp_avg + n));
          ASSERT_EQ(std::vector<float>(e.exp_avg_sq, e.exp_avg_sq + n),
                    std::vector<float>(r.exp_avg_sq, r.exp_avg_sq + n));
          if (with_bf16) {
            ASSERT_EQ(std::vector<std::uint16_t>(e.bf16_param, e.bf16_param + n),
                      std::vector<std::uint16_t>(r.bf16_param, r.bf16_param + n));
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace rally::kernels::internal
