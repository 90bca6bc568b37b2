// The CUDA kernels against the CPU references, on fresh random inputs (never zeros), odd sizes
// (1, 3, 1,000,003 elements), aligned pointers (the vector paths) and misaligned ones (single
// elements), and empty tensor lists: pack/unpack,
// scale-and-check (NaN and infinity found), bf16 compression with error feedback (bit for bit:
// both use portable.h's rounding), block checksums (the device's equal the CPU's, so a shard can
// be verified without copying it to the host), AdamW, and 40 packs in flight at once (the
// rotating table uploads). Without a CUDA device every case skips, saying why, or fails
// where RALLY_REQUIRE_GPU=1 (tests/gpu/require_gpu.h).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/ops/cuda_kernels.h"
#include "kernels/ops/internal/kernel_bodies.h"
#include "kernels/ops/portable.h"
#include "tests/gpu/require_gpu.h"
#include "tests/gpu/stream_gate.h"
#include "tests/unit/kernels/kernel_test_data.h"

namespace rally::kernels {
namespace {

// Device memory with `pad` bytes before the data, to misalign it.
struct DeviceBytes {
  unsigned char* base = nullptr;
  size_t pad;
  size_t bytes;
  DeviceBytes(size_t n, size_t misalign = 0) : pad(misalign), bytes(n) {
    EXPECT_EQ(cudaMalloc(&base, n + pad + 16), cudaSuccess);
  }
  ~DeviceBytes() { cudaFree(base); }
  void* get() const { return base + pad; }
  template <typename T>
  void put(const std::vector<T>& v) {
    ASSERT_EQ(cudaMemcpy(get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  template <typename T>
  std::vector<T> take(size_t count) const {
    std::vector<T> v(count);
    EXPECT_EQ(cudaMemcpy(v.data(), get(), count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

class KernelsGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    auto k = cudaKernels();
    if (!k.ok()) RALLY_SKIP_WITHOUT_GPU("no CUDA kernels here (" << k.status().message() << ")");
    gpu_ = std::move(*k);
    cpu_ = cpuKernels();
  }
  void expectAdamWEqualsTheCpu(size_t misalign);
  std::unique_ptr<Kernels> gpu_, cpu_;
};

TEST_F(KernelsGpu, PackAndUnpackEqualTheCpu) {
  const std::vector<size_t> counts = {1, 3, 0, 1000003, 5};
  size_t total = 0;
  for (size_t c : counts) total += c;
  const auto host = randomFloats(total, 1);
  DeviceBytes src(total * 4 + 64, 4), bucket(total * 4, 8);
  src.put(host);
  std::vector<ConstTensorView> in;
  size_t at = 0;
  for (size_t c : counts) {
    in.push_back({static_cast<const float*>(src.get()) + at, c});
    at += c;
  }
  ASSERT_TRUE(gpu_->pack(in, bucket.get(), DType::kF32).ok());
  ASSERT_TRUE(gpu_->synchronize().ok());
  EXPECT_EQ(bucket.take<float>(total), host);
  DeviceBytes back(total * 4, 2);
  std::vector<TensorView> out;
  at = 0;
  for (size_t c : counts) {
    out.push_back({static_cast<float*>(back.get()) + at, c});
    at += c;
  }
  ASSERT_TRUE(gpu_->unpack(bucket.get(), out, DType::kF32).ok());
  ASSERT_TRUE(gpu_->synchronize().ok());
  EXPECT_EQ(back.take<float>(total), host);
  EXPECT_TRUE(gpu_->pack({}, nullptr, DType::kF32).ok());
}

// 40 packs queued back to back without a synchronize, each with its own uploaded table (more
// tensors than go with the launch itself, and more in each, so that table slots are reallocated
// too), while the stream is held by a gate that another thread opens after 300 ms: the first 16
// uploads fill every slot, the 17th waits for the oldest, and each bucket still gets its own
// tensors.
TEST_F(KernelsGpu, ManyPacksInFlightKeepTheirOwnTables) {
  const size_t per = 1000, launches = 40, first = internal::kInlineEntries + 1;
  const size_t most = first + launches - 1;  // tensors in the last launch
  const auto host = randomFloats(per * most, 9);
  DeviceBytes src(host.size() * 4), buckets(host.size() * launches * 4);
  src.put(host);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  auto* base = static_cast<const float*>(src.get());
  std::atomic<bool> open{false};
  ASSERT_EQ(cudaLaunchHostFunc(
                nullptr,  // the kernels' stream: the legacy default one
                [](void* flag) {
                  while (!static_cast<std::atomic<bool>*>(flag)->load()) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(1));
                  }
                },
                &open),
            cudaSuccess);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    open = true;
  });
  for (size_t k = 0; k < launches; ++k) {
    // Launch k packs the first first + k tensors of `per` floats, in reverse order.
    const size_t n = first + k;
    std::vector<ConstTensorView> in;
    for (size_t t = 0; t < n; ++t) in.push_back({base + (n - 1 - t) * per, per});
    ASSERT_TRUE(
        gpu_->pack(in, static_cast<float*>(buckets.get()) + k * host.size(), DType::kF32).ok());
  }
  opener.join();
  ASSERT_TRUE(gpu_->synchronize().ok());
  const auto got = buckets.take<float>(host.size() * launches);
  for (size_t k = 0; k < launches; ++k) {
    const size_t n = first + k;
    for (size_t t = 0; t < n; ++t) {
      for (size_t i = 0; i < per; i += 97) {
        ASSERT_EQ(got[k * host.size() + t * per + i], host[(n - 1 - t) * per + i])
            << "launch " << k << ", tensor " << t << ", element " << i;
      }
    }
  }
}

TEST_F(KernelsGpu, ScaleAndCheckEqualsTheCpu) {
  // Aligned data takes 16-byte vectors (and the tail one element at a time); data one element
  // off takes single elements throughout.
  for (DType type : {DType::kF32, DType::kF16, DType::kBF16}) {
    const size_t es = dtypeSize(type);
    for (size_t n : {1u, 3u, 1000003u}) {
      for (size_t misalign : {size_t{0}, es}) {
        auto host = randomElements(n, type, static_cast<std::uint32_t>(n));
        DeviceBytes d(host.size(), misalign);
        d.put(host);
        auto finite = gpu_->scaleAndCheck(d.get(), n, type, 0.125f);
        ASSERT_TRUE(finite.ok()) << finite.status().toString();
        EXPECT_TRUE(*finite);
        auto cpu_finite = cpu_->scaleAndCheck(host.data(), n, type, 0.125f);
        ASSERT_TRUE(cpu_finite.ok() && *cpu_finite);
        EXPECT_EQ(d.take<unsigned char>(host.size()), host)
            << "dtype size " << es << ", n " << n << ", +" << misalign;
        for (size_t bad : {size_t{0}, n - 1}) {  // first and last (vectors or tail)
          auto with_inf = host;
          setElement(&with_inf, bad, type, std::numeric_limits<float>::infinity());
          d.put(with_inf);
          auto checked = gpu_->scaleAndCheck(d.get(), n, type, 1.0f);
          ASSERT_TRUE(checked.ok()) << checked.status().toString();
          EXPECT_FALSE(*checked) << "infinity at " << bad;
        }
      }
    }
  }
}

// A step's buckets scaled without waiting, read once: an infinity in the middle bucket is
// reported by that read, the next read starts over, and each bucket equals the CPU's.
TEST_F(KernelsGpu, ScaleAndCheckAsyncKeepsANonFiniteResultUntilRead) {
  std::vector<std::vector<float>> host = {randomFloats(1000003, 21), randomFloats(4099, 22),
                                          randomFloats(3, 23)};
  host[1][4098] = -std::numeric_limits<float>::infinity();  // in the tail
  std::vector<std::unique_ptr<DeviceBytes>> d;
  for (const auto& h : host) {
    d.push_back(std::make_unique<DeviceBytes>(h.size() * 4));
    d.back()->put(h);
  }
  for (size_t i = 0; i < host.size(); ++i) {
    ASSERT_TRUE(gpu_->scaleAndCheckAsync(d[i]->get(), host[i].size(), DType::kF32, 0.25f).ok());
  }
  auto read = gpu_->readFinite();
  ASSERT_TRUE(read.ok()) << read.status().toString();
  EXPECT_FALSE(*read);
  read = gpu_->readFinite();
  ASSERT_TRUE(read.ok());
  EXPECT_TRUE(*read);  // started over
  for (size_t i = 0; i < host.size(); ++i) {
    auto want = host[i];
    ASSERT_TRUE(cpu_->scaleAndCheckAsync(want.data(), want.size(), DType::kF32, 0.25f).ok());
    EXPECT_EQ(d[i]->take<float>(want.size()), want) << "bucket " << i;
  }
  ASSERT_TRUE(gpu_->scaleAndCheckAsync(d[0]->get(), host[0].size(), DType::kF32, 2.0f).ok());
  EXPECT_TRUE(*gpu_->readFinite());
}

// Inputs written on another stream (torch's, for DDP): after waitForEvent() with an event
// recorded there, the kernels wait for that stream's work on the GPU, the legacy default
// stream's too.
TEST_F(KernelsGpu, KernelsWaitForTheEventTheyWereGiven) {
  cudaStream_t mine = nullptr, other = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&mine, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
  auto k = cudaKernels({.device = 0, .stream = mine});
  ASSERT_TRUE(k.ok()) << k.status().toString();
  EXPECT_EQ((*k)->waitForEvent(nullptr).code(), StatusCode::kInvalidArgument);
  cudaEvent_t event = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), cudaSuccess);
  const std::vector<float> host = randomFloats(4099, 31);
  DeviceBytes d(host.size() * 4);
  d.put(host);
  // Loaded before any stream is held (lazy module loading may wait for the whole device).
  ASSERT_TRUE((*k)->scaleAndCheckAsync(d.get(), host.size(), DType::kF32, 1.0f).ok());
  ASSERT_TRUE((*k)->readFinite().ok());
  for (cudaStream_t producer : {other, static_cast<cudaStream_t>(nullptr)}) {
    const char* which = producer == nullptr ? "the legacy default stream" : "a stream of its own";
    test_support::StreamGate held(producer);
    ASSERT_EQ(cudaEventRecord(event, producer), cudaSuccess);
    ASSERT_TRUE((*k)->waitForEvent(event).ok());
    ASSERT_TRUE((*k)->scaleAndCheckAsync(d.get(), host.size(), DType::kF32, 2.0f).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(cudaStreamQuery(mine), cudaErrorNotReady)
        << which << ": the kernel ran before what it was told to wait for";
    held.release();
    auto finite = (*k)->readFinite();
    ASSERT_TRUE(finite.ok()) << finite.status().toString();
    EXPECT_TRUE(*finite);
    ASSERT_EQ(cudaStreamSynchronize(producer), cudaSuccess);
  }
  auto want = host;
  for (float& x : want) x *= 4.0f;  // scaled twice
  EXPECT_EQ(d.take<float>(want.size()), want);
  k->reset();
  (void)cudaEventDestroy(event);
  (void)cudaStreamDestroy(other);
  (void)cudaStreamDestroy(mine);
}

// Outputs read on another stream (NCCL's, for a compressed bucket): an event the kernels record
// after their work holds a stream that waits for it until that work is done, with no host wait.
TEST_F(KernelsGpu, AnEventTheKernelsRecordOrdersAnotherStreamAfterTheirWork) {
  cudaStream_t mine = nullptr, other = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&mine, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
  auto k = cudaKernels({.device = 0, .stream = mine});
  ASSERT_TRUE(k.ok()) << k.status().toString();
  EXPECT_EQ((*k)->recordEvent(nullptr).code(), StatusCode::kInvalidArgument);
  cudaEvent_t event = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), cudaSuccess);
  const std::vector<float> host = randomFloats(4099, 37);
  DeviceBytes d(host.size() * 4), copy(host.size() * 4);
  d.put(host);
  // Loaded before the stream is held (lazy module loading may wait for the whole device).
  ASSERT_TRUE((*k)->scaleAndCheckAsync(d.get(), host.size(), DType::kF32, 1.0f).ok());
  ASSERT_TRUE((*k)->readFinite().ok());
  {
    test_support::StreamGate held(mine);
    ASSERT_TRUE((*k)->scaleAndCheckAsync(d.get(), host.size(), DType::kF32, 2.0f).ok());
    ASSERT_TRUE((*k)->recordEvent(event).ok());
    ASSERT_EQ(cudaStreamWaitEvent(other, event, 0), cudaSuccess);
    // Device to device: queued on `other` without a host wait.
    ASSERT_EQ(
        cudaMemcpyAsync(copy.get(), d.get(), host.size() * 4, cudaMemcpyDeviceToDevice, other),
        cudaSuccess);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(cudaStreamQuery(other), cudaErrorNotReady)
        << "the other stream copied before the kernels' work it was to follow";
    held.release();
  }
  ASSERT_EQ(cudaStreamSynchronize(other), cudaSuccess);
  auto want = host;
  for (float& x : want) x *= 2.0f;
  EXPECT_EQ(copy.take<float>(want.size()), want) << "the copy is of the scaled values";
  auto finite = (*k)->readFinite();
  ASSERT_TRUE(finite.ok()) << finite.status().toString();
  EXPECT_TRUE(*finite);
  k->reset();
  (void)cudaEventDestroy(event);
  (void)cudaStreamDestroy(other);
  (void)cudaStreamDestroy(mine);
}

TEST_F(KernelsGpu, CompressionEqualsTheCpuBitForBit) {
  const size_t n = 1000003;
  const auto g = randomFloats(n, 3);
  // Aligned: 4-element vectors; the input one float off: single elements.
  for (size_t misalign : {0u, 4u}) {
    std::vector<float> res(n, 0.0f);
    std::vector<std::uint16_t> out(n);
    DeviceBytes dg(n * 4, misalign), dres(n * 4), dout(n * 2);
    dg.put(g);
    dres.put(res);
    for (int step = 0; step < 3; ++step) {
      ASSERT_TRUE(gpu_->compressBf16(static_cast<float*>(dg.get()), static_cast<float*>(dres.get()),
                                     static_cast<std::uint16_t*>(dout.get()), n)
                      .ok());
      ASSERT_TRUE(cpu_->compressBf16(g.data(), res.data(), out.data(), n).ok());
    }
    ASSERT_TRUE(gpu_->synchronize().ok());
    EXPECT_EQ(dout.take<std::uint16_t>(n), out) << "+" << misalign;
    EXPECT_EQ(dres.take<float>(n), res) << "+" << misalign;

    // And back: aligned (8-element vectors) and one bf16 off.
    DeviceBytes dh(n * 2, misalign / 2), dback(n * 4);
    dh.put(out);
    ASSERT_TRUE(gpu_->decompressBf16(static_cast<const std::uint16_t*>(dh.get()),
                                     static_cast<float*>(dback.get()), n)
                    .ok());
    std::vector<float> want(n);
    ASSERT_TRUE(cpu_->decompressBf16(out.data(), want.data(), n).ok());
    ASSERT_TRUE(gpu_->synchronize().ok());
    EXPECT_EQ(dback.take<float>(n), want) << "+" << misalign / 2;
  }
}

TEST_F(KernelsGpu, DeviceChecksumsEqualTheCpus) {
  std::vector<unsigned char> host(3000017);
  std::mt19937 rng(4);
  for (auto& b : host) b = static_cast<unsigned char>(rng());
  // Offset 0 takes the kernel's aligned loads, 3 its byte loads; 1 MiB blocks span several
  // groups of segments, 1000 ends in a partial segment, 17 takes the short path.
  for (size_t offset : {0u, 3u}) {
    DeviceBytes d(host.size(), offset);
    d.put(host);
    for (size_t block : {1u << 20, 65536u, 4104u, 1000u, 17u}) {
      const size_t blocks = (host.size() + block - 1) / block;
      std::vector<std::uint64_t> a(blocks), b(blocks);
      ASSERT_TRUE(gpu_->blockChecksums(d.get(), host.size(), block, a.data()).ok());
      ASSERT_TRUE(cpu_->blockChecksums(host.data(), host.size(), block, b.data()).ok());
      EXPECT_EQ(a, b) << "block " << block << ", offset " << offset;
      // Queued into device memory, for a check that stays on the device.
      DeviceBytes sums(blocks * sizeof(std::uint64_t));
      ASSERT_TRUE(gpu_->blockChecksumsAsync(d.get(), host.size(), block,
                                            static_cast<std::uint64_t*>(sums.get()))
                      .ok());
      ASSERT_TRUE(gpu_->synchronize().ok());
      EXPECT_EQ(sums.take<std::uint64_t>(blocks), b) << "queued, block " << block;
    }
  }
  // Host memory is refused for the queued form's output (the kernel would fault), saying why.
  std::vector<std::uint64_t> host_sums(4);
  DeviceBytes d(4096);
  const Status s = gpu_->blockChecksumsAsync(d.get(), 4096, 1024, host_sums.data());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
  EXPECT_NE(s.message().find("not device memory"), std::string::npos) << s.toString();
  // And device memory for the waiting form's (it copies on the host).
  DeviceBytes device_sums(4 * sizeof(std::uint64_t));
  const Status w =
      gpu_->blockChecksums(d.get(), 4096, 1024, static_cast<std::uint64_t*>(device_sums.get()));
  EXPECT_EQ(w.code(), StatusCode::kInvalidArgument) << w.toString();
}

TEST_F(KernelsGpu, AdamWEqualsTheCpu) {
  for (size_t misalign : {0u, 4u}) {  // the gradient one float off: single elements
    expectAdamWEqualsTheCpu(misalign);
  }
}

void KernelsGpu::expectAdamWEqualsTheCpu(size_t misalign) {
  const size_t n = 1000003;
  auto p = randomFloats(n, 5), g = randomFloats(n, 6);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  std::vector<std::uint16_t> b(n);
  DeviceBytes dp(n * 4), dg(n * 4, misalign), dm(n * 4), dv(n * 4), db(n * 2);
  dp.put(p);
  dg.put(g);
  dm.put(m);
  dv.put(v);
  for (std::int64_t step = 1; step <= 3; ++step) {
    const AdamWOptions o{.lr = 1e-2f, .step = step};
    ASSERT_TRUE(gpu_->adamw({{static_cast<float*>(dp.get()), static_cast<const float*>(dg.get()),
                              static_cast<float*>(dm.get()), static_cast<float*>(dv.get()),
                              static_cast<std::uint16_t*>(db.get()), n}},
                            o)
                    .ok());
    ASSERT_TRUE(cpu_->adamw({{p.data(), g.data(), m.data(), v.data(), b.data(), n}}, o).ok());
  }
  ASSERT_TRUE(gpu_->synchronize().ok());
  const auto got = dp.take<float>(n);
  for (size_t i = 0; i < n; ++i) {
    // The same formula; fused multiply-adds may differ in the last bit.
    ASSERT_NEAR(got[i], p[i], 1e-6f * (1 + std::fabs(p[i]))) << i << ", gradient +" << misalign;
  }
}

// More tensors than go with the launch itself: the uploaded table, each tensor's own tiles.
TEST_F(KernelsGpu, AdamWOfManyTensorsEqualsTheCpu) {
  const size_t tensors = internal::kInlineEntries * 2 + 3;
  std::vector<size_t> counts;
  size_t total = 0;
  for (size_t i = 0; i < tensors; ++i) total += counts.emplace_back(1 + 37 * i);
  auto p = randomFloats(total, 31), g = randomFloats(total, 32);
  std::vector<float> m(total, 0.01f), v(total, 0.0001f);
  DeviceBytes dp(total * 4), dg(total * 4), dm(total * 4), dv(total * 4);
  dp.put(p);
  dg.put(g);
  dm.put(m);
  dv.put(v);
  std::vector<AdamWTensor> on_gpu, on_cpu;
  for (size_t i = 0, at = 0; i < tensors; at += counts[i], ++i) {
    on_gpu.push_back({static_cast<float*>(dp.get()) + at, static_cast<const float*>(dg.get()) + at,
                      static_cast<float*>(dm.get()) + at, static_cast<float*>(dv.get()) + at,
                      nullptr, counts[i]});
    on_cpu.push_back(
        {p.data() + at, g.data() + at, m.data() + at, v.data() + at, nullptr, counts[i]});
  }
  const AdamWOptions o{.lr = 1e-2f, .step = 2};
  ASSERT_TRUE(gpu_->adamw(on_gpu, o).ok());
  ASSERT_TRUE(cpu_->adamw(on_cpu, o).ok());
  ASSERT_TRUE(gpu_->synchronize().ok());
  const auto got = dp.take<float>(total);
  for (size_t i = 0; i < total; ++i) {
    ASSERT_NEAR(got[i], p[i], 1e-6f * (1 + std::fabs(p[i]))) << i;
  }
}

}  // namespace
}  // namespace rally::kernels
