// A CUDA stream held at a host function, for the GPU tests of stream ordering: what is enqueued
// behind it stays queued until release() (or the gate's end: a failed ASSERT cannot leave the
// stream held).
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <memory>
#include <mutex>

namespace rally::test_support {

// Holds a stream at a host function until release(): what is enqueued behind it stays queued.
class StreamGate {
 public:
  explicit StreamGate(cudaStream_t stream) : shared_(std::make_shared<Shared>()) {
    // The host function owns a reference, so the gate may go before the stream reaches it.
    auto* ref = new std::shared_ptr<Shared>(shared_);
    const cudaError_t e = cudaLaunchHostFunc(stream, &StreamGate::hold, ref);
    EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
    if (e != cudaSuccess) delete ref;
  }
  ~StreamGate() { release(); }
  StreamGate(const StreamGate&) = delete;
  StreamGate& operator=(const StreamGate&) = delete;

  void release() {
    {
      std::lock_guard lock(shared_->mu);
      shared_->open = true;
    }
    shared_->cv.notify_all();
  }

 private:
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    bool open = false;
  };
  static void CUDART_CB hold(void* data) {
    std::unique_ptr<std::shared_ptr<Shared>> ref(static_cast<std::shared_ptr<Shared>*>(data));
    Shared& s = **ref;
    std::unique_lock lock(s.mu);
    s.cv.wait(lock, [&] { return s.open; });
  }
  std::shared_ptr<Shared> shared_;
};

}  // namespace rally::test_support
