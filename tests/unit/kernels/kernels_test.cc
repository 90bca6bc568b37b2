// The kernels' CPU references and the portable pieces the CUDA kernels share, on fresh random
// inputs (never zeros), odd sizes (1, 3, 1,000,003), misaligned pointers and empty tensor lists:
//   - XXH3-64 written from its specification equals libxxhash's for every length 0..1100 and for
//     large buffers, at every alignment;
//   - bf16 and f16 conversions round to nearest even (f16 checked against the compiler's _Float16
//     for every half and for random floats, subnormals included);
//   - pack/unpack round trips; scale-and-check finds NaN and infinity; bf16 compression with error
//     feedback tracks the uncompressed sum over many steps (and far better than without it);
//   - a non-finite compressed value resets its residual;
//   - block checksums; AdamW against a double-precision formula;
//   - the CUDA kernels' chunk size refused out of range (no device needed).
#include <gtest/gtest.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/ops/cuda_kernels.h"
#include "kernels/ops/kernels.h"
#include "kernels/ops/portable.h"
#include "rally/config.h"

namespace rally::kernels {
namespace {

namespace p = portable;

std::vector<unsigned char> randomBytes(size_t n, std::uint32_t seed) {
  std::vector<unsigned char> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<unsigned char>(rng());
  return v;
}

std::vector<float> randomFloats(size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  for (auto& x : v) {
    x = d(rng);
    if (x == 0.0f) x = scale;  // never zeros
  }
  return v;
}

TEST(Xxh3, PortableEqualsLibxxhashForEveryLengthAndAlignment) {
  const auto data = randomBytes(2 << 20, 1);
  const auto* secret = reinterpret_cast<const std::uint8_t*>(XXH3_kSecret);
  for (size_t len = 0; len <= 1100; ++len) {
    for (size_t off : {0, 1, 3, 7}) {
      ASSERT_EQ(p::xxh3(data.data() + off, len, secret), XXH3_64bits(data.data() + off, len))
          << "length " << len << ", offset " << off;
    }
  }
  for (size_t len : {4095u, 4096u, 65536u, 65537u, 1000003u, 2000000u}) {
    EXPECT_EQ(p::xxh3(data.data() + 5, len, secret), XXH3_64bits(data.data() + 5, len)) << len;
  }
}

// The split of the long path that the device kernel uses (segment contributions in parallel, a
// chain of scrambles per lane, tail and merge) gives the same hashes.
TEST(Xxh3, SegmentedLongPathEqualsTheSequentialOne) {
  const auto data = randomBytes(1 << 20, 2);
  const auto* secret = reinterpret_cast<const std::uint8_t*>(XXH3_kSecret);
  for (size_t len = 0; len <= 3200; ++len) {
    ASSERT_EQ(p::xxh3Segmented(data.data() + 1, len, secret), XXH3_64bits(data.data() + 1, len))
        << "length " << len;
  }
  for (size_t len : {65535u, 65536u, 65537u, 1000003u}) {
    EXPECT_EQ(p::xxh3Segmented(data.data() + 3, len, secret), XXH3_64bits(data.data() + 3, len))
        << len;
  }
}

TEST(FloatConversions, Bf16RoundsToNearestEven) {
  EXPECT_EQ(p::toBf16(1.0f), 0x3F80);
  EXPECT_EQ(p::toBf16(p::bitsFloat(0x3F808000u)), 0x3F80);  // a tie: to even (down)
  EXPECT_EQ(p::toBf16(p::bitsFloat(0x3F818000u)), 0x3F82);  // a tie: to even (up)
  EXPECT_EQ(p::toBf16(p::bitsFloat(0x3F808001u)), 0x3F81);  // above the tie
  EXPECT_EQ(p::toBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(p::toBf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to infinity
  EXPECT_TRUE(std::isnan(p::fromBf16(p::toBf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(p::fromBf16(p::toBf16(p::bitsFloat(0x7F800001u)))));  // stays a NaN
  for (float x : randomFloats(100000, 2, 1000.0f)) {
    const std::uint32_t u = p::floatBits(x);
    const float down = p::bitsFloat(u & 0xFFFF0000u),
                up = p::bitsFloat((u & 0xFFFF0000u) + 0x10000u);
    const float got = p::fromBf16(p::toBf16(x));
    ASSERT_TRUE(got == down || got == up) << x;
    ASSERT_LE(std::fabs(got - x), std::fabs((got == down ? up : down) - x)) << x;  // the nearer
  }
}

TEST(FloatConversions, F16MatchesTheCompilersHalf) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    _Float16 ref;
    const std::uint16_t bits = static_cast<std::uint16_t>(h);
    std::memcpy(&ref, &bits, 2);
    const float want = static_cast<float>(ref), got = p::fromF16(bits);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << h;
    } else {
      ASSERT_EQ(p::floatBits(got), p::floatBits(want)) << h;
    }
  }
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) {
    // Across the half range and beyond: subnormals, normals, overflow.
    const float x = std::ldexp(static_cast<float>(rng() % 100000 + 1) / 100000.0f,
                               static_cast<int>(rng() % 50) - 30) *
                    ((rng() & 1) ? -1.0f : 1.0f);
    const _Float16 ref = static_cast<_Float16>(x);
    std::uint16_t want;
    std::memcpy(&want, &ref, 2);
    ASSERT_EQ(p::toF16(x), want) << x;
  }
}

TEST(Kernels, PackAndUnpackRoundTripAnySizesAndAlignments) {
  auto k = cpuKernels();
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    const size_t es = dtypeSize(t);
    const std::vector<size_t> counts = {1, 3, 0, 1000003, 17, 0, 2};
    auto src = randomBytes(1100000 * es + 64, 4);
    std::vector<ConstTensorView> in;
    std::vector<unsigned char> expect;
    size_t at = es;  // misaligned: one element past the buffer's start
    for (size_t c : counts) {
      in.push_back({src.data() + at, c});
      expect.insert(expect.end(), src.begin() + at, src.begin() + at + c * es);
      at += c * es + es;  // and a gap
    }
    std::vector<unsigned char> bucket(expect.size() + es);
    ASSERT_TRUE(k->pack(in, bucket.data() + es, t).ok());
    EXPECT_TRUE(std::equal(expect.begin(), expect.end(), bucket.begin() + es));
    std::vector<unsigned char> back(src.size(), 0);
    std::vector<TensorView> out;
    for (const auto& v : in) {
      out.push_back(
          {back.data() + (static_cast<const unsigned char*>(v.data) - src.data()), v.count});
    }
    ASSERT_TRUE(k->unpack(bucket.data() + es, out, t).ok());
    for (size_t i = 0; i < in.size(); ++i) {
      EXPECT_EQ(std::memcmp(out[i].data, in[i].data, in[i].count * es), 0) << i;
    }
  }
  EXPECT_TRUE(k->pack({}, nullptr, DType::kF32).ok());  // an empty list
  EXPECT_TRUE(k->unpack(nullptr, {}, DType::kF32).ok());
}

TEST(Kernels, ScaleAndCheckScalesAndFindsNanAndInfinity) {
  auto k = cpuKernels();
  for (size_t n : {1u, 3u, 1000003u}) {
    auto v = randomFloats(n, 5, 10.0f);
    auto w = v;
    auto r = k->scaleAndCheck(w.data(), n, DType::kF32, 0.25f);
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE(*r);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(w[i], v[i] * 0.25f);
    w[n / 2] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_FALSE(*k->scaleAndCheck(w.data(), n, DType::kF32, 1.0f));
    w[n / 2] = -std::numeric_limits<float>::infinity();
    EXPECT_FALSE(*k->scaleAndCheck(w.data(), n, DType::kF32, 1.0f));
  }
  // Half types: overflow by the factor is an infinity too.
  std::vector<std::uint16_t> h = {p::toF16(1000.0f), p::toF16(-3.5f), p::toF16(60000.0f)};
  EXPECT_FALSE(*k->scaleAndCheck(h.data(), h.size(), DType::kF16, 2.0f));
  EXPECT_EQ(p::fromF16(h[1]), -7.0f);
  std::vector<std::uint16_t> b = {p::toBf16(3.0f), p::toBf16(-0.5f)};
  EXPECT_TRUE(*k->scaleAndCheck(b.data(), b.size(), DType::kBF16, 0.5f));
  EXPECT_EQ(p::fromBf16(b[0]), 1.5f);
}

// A step's buckets: scaled one by one, read once. A non-finite result in any of them is reported
// by the one read, and the next read starts over.
TEST(Kernels, ScaleAndCheckAsyncKeepsANonFiniteResultUntilRead) {
  auto k = cpuKernels();
  auto a = randomFloats(1000, 7), b = randomFloats(3, 8), c = randomFloats(17, 9);
  b[1] = std::numeric_limits<float>::infinity();
  const auto a0 = a;
  ASSERT_TRUE(k->scaleAndCheckAsync(a.data(), a.size(), DType::kF32, 0.5f).ok());
  ASSERT_TRUE(k->scaleAndCheckAsync(b.data(), b.size(), DType::kF32, 0.5f).ok());
  ASSERT_TRUE(k->scaleAndCheckAsync(c.data(), c.size(), DType::kF32, 0.5f).ok());
  EXPECT_EQ(a[10], a0[10] * 0.5f);  // scaled all the same
  auto read = k->readFinite();
  ASSERT_TRUE(read.ok());
  EXPECT_FALSE(*read);
  EXPECT_TRUE(*k->readFinite());  // started over
  ASSERT_TRUE(k->scaleAndCheckAsync(c.data(), c.size(), DType::kF32, 2.0f).ok());
  EXPECT_TRUE(*k->readFinite());
  // scaleAndCheck answers for earlier calls not yet read, too.
  ASSERT_TRUE(k->scaleAndCheckAsync(b.data(), b.size(), DType::kF32, 1.0f).ok());
  EXPECT_FALSE(*k->scaleAndCheck(c.data(), c.size(), DType::kF32, 1.0f));
  EXPECT_TRUE(*k->readFinite());
}

TEST(Kernels, Bf16CompressionWithErrorFeedbackTracksTheTrueSum) {
  auto k = cpuKernels();
  const size_t n = 1003;
  std::vector<float> residual(n, 0.0f), decoded(n);
  std::vector<std::uint16_t> packed(n);
  std::vector<double> sent(n, 0.0), truth(n, 0.0), naive(n, 0.0);
  for (int step = 0; step < 500; ++step) {
    // Gradients around 1 with small changes: what bf16 (8 bits of mantissa) rounds badly.
    auto g = randomFloats(n, 100 + step, 1e-3f);
    for (auto& x : g) x += 1.0f;
    ASSERT_TRUE(k->compressBf16(g.data(), residual.data(), packed.data(), n).ok());
    ASSERT_TRUE(k->decompressBf16(packed.data(), decoded.data(), n).ok());
    for (size_t i = 0; i < n; ++i) {
      sent[i] += decoded[i];
      truth[i] += g[i];
      naive[i] += p::fromBf16(p::toBf16(g[i]));
    }
  }
  double worst = 0, worst_naive = 0;
  for (size_t i = 0; i < n; ++i) {
    worst = std::max(worst, std::fabs(sent[i] - truth[i]));
    worst_naive = std::max(worst_naive, std::fabs(naive[i] - truth[i]));
  }
  // With feedback the sums differ by at most the last residual (half a bf16 step near 1: 2^-8).
  EXPECT_LT(worst, 0.0045);
  EXPECT_GT(worst_naive, 20 * worst) << "without feedback the error should grow with the steps";
}

// A NaN, an infinity, or a finite value that rounds up to infinity in bf16: sent as it is, and
// the residual of that element reset to zero, so the next step is clean again.
TEST(Kernels, Bf16CompressionResetsTheResidualOfANonFiniteValue) {
  auto k = cpuKernels();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> bad = {std::numeric_limits<float>::quiet_NaN(), inf, -inf,
                                  std::numeric_limits<float>::max(), 1.001f};
  std::vector<float> residual(bad.size(), 0.25f / 1024);
  std::vector<std::uint16_t> packed(bad.size());
  ASSERT_TRUE(k->compressBf16(bad.data(), residual.data(), packed.data(), bad.size()).ok());
  EXPECT_TRUE(std::isnan(p::fromBf16(packed[0])));
  EXPECT_EQ(p::fromBf16(packed[1]), inf);
  EXPECT_EQ(p::fromBf16(packed[2]), -inf);
  EXPECT_EQ(p::fromBf16(packed[3]), inf);  // FLT_MAX rounds up
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(residual[i], 0.0f) << i;
  EXPECT_NE(residual[4], 0.0f);  // a finite element keeps its rounding error
  const std::vector<float> good(bad.size(), 1.5f);
  ASSERT_TRUE(k->compressBf16(good.data(), residual.data(), packed.data(), good.size()).ok());
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(p::fromBf16(packed[i]), 1.5f) << i;
}

// The CUDA kernels' options are checked before any device is looked for, so this runs anywhere
// the build has them.
TEST(Kernels, CudaKernelsRefuseChunkSizesOutOfRange) {
  for (size_t bad : {size_t{0}, size_t{100}, size_t{255}, size_t{1001}, size_t{1} << 21}) {
    const Status s = checkCudaKernelsOptions({.chunk_elements = bad});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("multiple of 8 from 256 to 1048576"), std::string::npos)
        << s.message();
#if RALLY_HAVE_CUDA
    EXPECT_EQ(cudaKernels({.chunk_elements = bad}).status().code(), StatusCode::kInvalidArgument)
        << bad;
#endif
  }
  for (size_t good : {size_t{256}, size_t{4104}, size_t{16384}, size_t{1} << 20}) {
    EXPECT_TRUE(checkCudaKernelsOptions({.chunk_elements = good}).ok()) << good;
  }
}

TEST(Kernels, TheCpuKernelsHaveNoStreamToWaitForOrToBeWaitedFor) {
  auto k = cpuKernels();
  int not_an_event = 0;  // never read: the CPU's work runs when called
  EXPECT_TRUE(k->waitForEvent(&not_an_event).ok());
  EXPECT_TRUE(k->waitForEvent(nullptr).ok());
  EXPECT_TRUE(k->recordEvent(&not_an_event).ok());
  EXPECT_TRUE(k->recordEvent(nullptr).ok());
  EXPECT_EQ(not_an_event, 0);
}

TEST(Kernels, BlockChecksumsAreXxh3OfEachBlock) {
  auto k = cpuKernels();
  const auto data = randomBytes(1000003, 6);
  const size_t block = 65536, blocks = (data.size() + block - 1) / block;
  std::vector<std::uint64_t> out(blocks);
  ASSERT_TRUE(k->blockChecksums(data.data() + 3, data.size() - 3, block, out.data()).ok());
  for (size_t b = 0; b < blocks; ++b) {
    const size_t len = std::min(block, data.size() - 3 - b * block);
    EXPECT_EQ(out[b], XXH3_64bits(data.data() + 3 + b * block, len)) << b;
  }
  EXPECT_EQ(k->blockChecksums(data.data(), 10, 0, out.data()).code(), StatusCode::kInvalidArgument);
  // The queued form gives the same (on the CPU, into host memory, at once).
  std::vector<std::uint64_t> queued(blocks);
  ASSERT_TRUE(k->blockChecksumsAsync(data.data() + 3, data.size() - 3, block, queued.data()).ok());
  EXPECT_EQ(queued, out);
  EXPECT_EQ(k->blockChecksumsAsync(data.data(), 10, 0, out.data()).code(),
            StatusCode::kInvalidArgument);
}

TEST(Kernels, AdamWMatchesTheFormulaInDoublePrecision) {
  auto k = cpuKernels();
  const AdamWOptions o{
      .lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f, .step = 1};
  std::vector<std::vector<float>> params = {randomFloats(3, 7), randomFloats(1000003, 8),
                                            randomFloats(1, 9)};
  std::vector<std::vector<float>> grads = {randomFloats(3, 10), randomFloats(1000003, 11),
                                           randomFloats(1, 12)};
  std::vector<std::vector<float>> m(3), v(3);
  std::vector<std::vector<double>> pd(3), md(3), vd(3);
  std::vector<std::uint16_t> bf16(1000003);
  for (int i = 0; i < 3; ++i) {
    m[i].assign(params[i].size(), 0.0f);
    v[i].assign(params[i].size(), 0.0f);
    pd[i].assign(params[i].begin(), params[i].end());
    md[i].assign(params[i].size(), 0.0);
    vd[i].assign(params[i].size(), 0.0);
  }
  for (std::int64_t step = 1; step <= 3; ++step) {
    std::vector<AdamWTensor> ts;
    for (int i = 0; i < 3; ++i) {
      ts.push_back({params[i].data(), grads[i].data(), m[i].data(), v[i].data(),
                    i == 1 ? bf16.data() : nullptr, params[i].size()});
    }
    AdamWOptions os = o;
    os.step = step;
    ASSERT_TRUE(k->adamw(ts, os).ok());
    for (int i = 0; i < 3; ++i) {
      for (size_t j = 0; j < pd[i].size(); ++j) {
        const double g = grads[i][j];
        md[i][j] = 0.9 * md[i][j] + 0.1 * g;
        vd[i][j] = 0.99 * vd[i][j] + 0.01 * g * g;
        const double mh = md[i][j] / (1 - std::pow(0.9, step)),
                     vh = vd[i][j] / (1 - std::pow(0.99, step));
        pd[i][j] = pd[i][j] * (1 - 1e-2 * 0.1) - 1e-2 * mh / (std::sqrt(vh) + 1e-8);
      }
    }
  }
  for (int i = 0; i < 3; ++i) {
    for (size_t j = 0; j < pd[i].size(); ++j) {
      ASSERT_NEAR(params[i][j], pd[i][j], 1e-5 * (1 + std::fabs(pd[i][j]))) << i << " " << j;
    }
  }
  for (size_t j = 0; j < bf16.size(); ++j) ASSERT_EQ(bf16[j], p::toBf16(params[1][j])) << j;
  EXPECT_EQ(k->adamw({}, {.step = 0}).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace rally::kernels
