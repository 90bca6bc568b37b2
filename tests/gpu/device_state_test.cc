// CUDA buffers in ElasticState and checkpoints, through the CUDA copier (its own stream, ordered
// after the training stream, into page-locked memory): commit and restore round trips, and a
// checkpoint saved by 2 ranks (both on device 0: one GPU here) loaded by 3 ranks into fresh device
// buffers, bit for bit. Without a CUDA device every case skips, saying why, or fails where
// RALLY_REQUIRE_GPU=1 (tests/gpu/require_gpu.h).
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <thread>
#include <vector>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"
#include "runtime/checkpoint/checkpointer.h"
#include "runtime/cuda/cuda_copier.h"
#include "tests/gpu/require_gpu.h"

namespace rally {
namespace {

// A device buffer of n floats holding base + i / 8.
struct DeviceFloats {
  float* ptr = nullptr;
  size_t n;
  explicit DeviceFloats(size_t count, float base) : n(count) {
    EXPECT_EQ(cudaMalloc(&ptr, n * 4), cudaSuccess);
    set(base);
  }
  ~DeviceFloats() { cudaFree(ptr); }
  void set(float base) {
    std::vector<float> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = base + static_cast<float>(i) / 8;
    EXPECT_EQ(cudaMemcpy(ptr, h.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  }
  bool holds(float base) const {
    std::vector<float> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), ptr, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; ++i) {
      if (h[i] != base + static_cast<float>(i) / 8) return false;
    }
    return true;
  }
};

std::unique_ptr<DeviceCopier> copierOrSkipReason(std::string* why) {
  auto c = cuda::createCudaCopier({.device = 0});
  if (!c.ok()) {
    *why = c.status().message();
    return nullptr;
  }
  return std::move(*c);
}

TEST(DeviceState, CommitAndRestoreThroughTheCopier) {
  std::string why;
  auto copier = copierOrSkipReason(&why);
  if (!copier)
    RALLY_SKIP_WITHOUT_GPU("no CUDA device (" << why << "): device state tests need a GPU");
  DeviceFloats w(1 << 20, 1.0f);
  ElasticState state;
  state.setDeviceCopier(copier.get());
  ASSERT_TRUE(state.registerBuffer("w", w.ptr, DataType::kF32, {1024, 1024}, Device::cuda(0)).ok());
  ASSERT_TRUE(state.commit().ok());
  w.set(5.0f);
  ASSERT_TRUE(state.restore().ok());
  EXPECT_TRUE(w.holds(1.0f));
}

TEST(DeviceState, CheckpointSavedBy2LoadsInto3) {
  std::string why;
  if (!copierOrSkipReason(&why)) RALLY_SKIP_WITHOUT_GPU("no CUDA device (" << why << ")");
  char tmpl[] = "/tmp/rally-gpu-ckpt-XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  auto ranks = [&](int n, const std::function<void(int, collectives::Communicator&)>& body) {
    collectives::MemoryBootstrapStore store;
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        auto comm = collectives::createGlooCommunicator(store, {.rank = r, .size = n});
        ASSERT_TRUE(comm.ok()) << comm.status().toString();
        body(r, **comm);
      });
    }
    for (auto& t : threads) t.join();
  };
  ranks(2, [&](int r, collectives::Communicator& comm) {
    auto copier = copierOrSkipReason(&why);
    ASSERT_TRUE(copier);
    DeviceFloats w(3 * 1000 * 1000 + 7, 2.0f);
    ElasticState state;
    state.setDeviceCopier(copier.get());
    ASSERT_TRUE(state.registerBuffer("w", w.ptr, DataType::kF32, {3000007}, Device::cuda(0)).ok());
    checkpoint::Checkpointer ckpt(dir);
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(*ckpt.save(1));
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
    if (r == 0) std::printf("rank 0: save() of its half (%.1f MB) took %.2f ms\n", 6.0, ms);
  });
  ranks(3, [&](int, collectives::Communicator& comm) {
    auto copier = copierOrSkipReason(&why);
    ASSERT_TRUE(copier);
    DeviceFloats w(3000007, 0.0f);
    ElasticState state;
    state.setDeviceCopier(copier.get());
    ASSERT_TRUE(state.registerBuffer("w", w.ptr, DataType::kF32, {3000007}, Device::cuda(0)).ok());
    checkpoint::Checkpointer ckpt(dir);
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    auto loaded = ckpt.loadNewest();
    ASSERT_TRUE(loaded.ok()) << loaded.status().toString();
    EXPECT_TRUE(w.holds(2.0f));
  });
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace rally
