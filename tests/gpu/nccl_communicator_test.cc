// The NCCL communicator on one GPU (world size 1; NCCL refuses two ranks on one device): every
// operation x dtype x reduce op on device buffers against references computed here (counts 0, 1,
// 3, 1001), ordering on the caller's stream, split, shrink, abort() from another thread while an
// operation is queued behind a blocked stream, and refused arguments. Where no CUDA device exists
// the GPU tests skip (ctest reports the binary as skipped), or fail where RALLY_REQUIRE_GPU=1
// (tests/gpu/require_gpu.h); the checks that need no device run everywhere, among them that the
// NCCL library loaded is at least the header's version.
#include "collectives/nccl/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "tests/gpu/require_gpu.h"
#include "tests/gpu/stream_gate.h"
#include "tests/unit/collectives/collective_checks.h"

namespace rally::collectives {
namespace {

using namespace test_support;  // NOLINT(google-build-using-namespace)
using rally::test_support::StreamGate;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr Milliseconds kWait{20'000};

// Why this machine cannot run the GPU tests, or "" when it can.
std::string noGpuReason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fmt::format("{}: {}", cudaGetErrorName(e), cudaGetErrorString(e));
  }
  return n == 0 ? "cudaGetDeviceCount found none" : "";
}

// Device memory, at least one byte (so that zero counts still get a valid pointer).
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    const cudaError_t e = cudaMalloc(&data_, bytes_);
    EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) (void)cudaFree(data_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return data_; }
  size_t bytes() const { return bytes_; }

  // Enqueued on `stream`, so that it is ordered before the operations issued after it there.
  void upload(const std::vector<char>& host, cudaStream_t stream) {
    const cudaError_t e = cudaMemcpyAsync(data_, host.data(), std::min(host.size(), bytes_),
                                          cudaMemcpyHostToDevice, stream);
    EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  }
  // After the operations that wrote it completed (wait() returned).
  std::vector<char> download() const {
    std::vector<char> host(bytes_);
    const cudaError_t e = cudaMemcpy(host.data(), data_, bytes_, cudaMemcpyDeviceToHost);
    EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
    return host;
  }

 private:
  size_t bytes_;
  void* data_ = nullptr;
};

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = noGpuReason();
    if (!why.empty()) {
      RALLY_SKIP_WITHOUT_GPU("no CUDA device (" << why
                                                << "): the NCCL tests run where a GPU exists");
    }
  }

  // A one-rank world on device 0.
  std::unique_ptr<NcclCommunicator> makeWorld(std::uint64_t generation = 7) {
    CommunicatorOptions o;
    o.generation = generation;
    o.device = 0;
    o.connect_timeout = kWait;
    o.op_timeout = kWait;
    auto comm = NcclCommunicator::create(store_, o);
    EXPECT_TRUE(comm.ok()) << comm.status().toString();
    return comm.ok() ? std::move(*comm) : nullptr;
  }

  MemoryStore store_;
};

// Runs without a GPU too.
TEST(NcclBuildTest, CapabilitiesMatchTheNcclHeader) {
  // The library loaded must be at least the header's version: the build decided from the header
  // which functions to call (ncclCommShrink, ncclCommRevoke), and an older library's missing
  // symbol would only show at the first call.
  int loaded = 0;
  ASSERT_EQ(ncclGetVersion(&loaded), ncclSuccess);
  std::printf("NCCL: header %d, library %d\n", NCCL_VERSION_CODE, loaded);
  EXPECT_GE(loaded, NCCL_VERSION_CODE) << "the NCCL library loaded is older than nccl.h was";
  const Capabilities c = ncclCapabilities();
  EXPECT_TRUE(c.device_memory);
  EXPECT_FALSE(c.host_memory);
  EXPECT_TRUE(c.elastic);
  EXPECT_FALSE(c.needs_launcher);
#if defined(NCCL_SHRINK_ABORT) && defined(NCCL_REVOKE_DEFAULT)
  EXPECT_TRUE(c.can_shrink) << "nccl.h " << NCCL_MAJOR << "." << NCCL_MINOR << "." << NCCL_PATCH
                            << " has ncclCommShrink and ncclCommRevoke";
#else
  EXPECT_FALSE(c.can_shrink);
#endif
}

// Runs without a GPU too: the options are checked before any device.
TEST(NcclBuildTest, RefusesARankThatDoesNotExist) {
  MemoryStore store;
  CommunicatorOptions o;
  o.rank = 2;
  o.size = 2;
  o.generation = 5;
  auto comm = NcclCommunicator::create(store, o);
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kInvalidArgument) << comm.status().toString();
  EXPECT_THAT(comm.status().message(), HasSubstr("rank 2 of size 2"));
  EXPECT_THAT(comm.status().message(), HasSubstr("generation 5"));
}

// Runs everywhere: without a GPU, creation says so; with one, a device that does not exist.
TEST(NcclBuildTest, AMissingOrWrongDeviceIsRefusedWithTheReason) {
  MemoryStore store;
  CommunicatorOptions o;
  o.connect_timeout = Milliseconds(2000);
  const std::string why = noGpuReason();
  if (!why.empty()) {
    if (::rally::test_support::gpuRequired()) FAIL() << "RALLY_REQUIRE_GPU=1 but: " << why;
    auto comm = NcclCommunicator::create(store, o);
    ASSERT_FALSE(comm.ok());
    EXPECT_EQ(comm.status().code(), StatusCode::kFailedPrecondition) << comm.status().toString();
    EXPECT_THAT(comm.status().message(), HasSubstr("no CUDA device"));
    return;
  }
  int devices = 0;
  ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
  o.device = devices;
  auto comm = NcclCommunicator::create(store, o);
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kInvalidArgument) << comm.status().toString();
  EXPECT_THAT(comm.status().message(),
              HasSubstr(fmt::format("CUDA device {} does not exist", devices)));
}

TEST_F(NcclTest, IdentityAndCapabilities) {
  auto comm = makeWorld(/*generation=*/11);
  ASSERT_NE(comm, nullptr);
  EXPECT_EQ(comm->backend(), "nccl");
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  EXPECT_EQ(comm->generation(), 11u);
  EXPECT_EQ(comm->device(), 0);
  EXPECT_NE(comm->stream(), nullptr);
  EXPECT_FALSE(comm->aborted());
  const Capabilities c = comm->capabilities();
  const Capabilities build = ncclCapabilities();
  EXPECT_EQ(c.device_memory, build.device_memory);
  EXPECT_EQ(c.host_memory, build.host_memory);
  EXPECT_EQ(c.can_shrink, build.can_shrink);
  EXPECT_EQ(c.elastic, build.elastic);
  EXPECT_EQ(c.needs_launcher, build.needs_launcher);
  EXPECT_EQ(asNccl(*comm), comm.get());
  // The id went through the store under the documented key.
  EXPECT_TRUE(store_.get("nccl/11/world/id").ok());
}

TEST_F(NcclTest, AllreduceEveryTypeAndOp) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  for (DataType t : kTypes) {
    for (ReduceOp op : kOps) {
      for (size_t count : kCounts) {
        std::vector<char> host(count * dataTypeSize(t) + 1);
        for (size_t i = 0; i < count; ++i) store(t, host.data(), i, value(op, 0, i));
        DeviceBuffer dev(host.size());
        dev.upload(host, comm->stream());
        const Status s = comm->allreduce(dev.get(), count, t, op)->wait(kWait);
        ASSERT_TRUE(s.ok()) << s.toString();
        const std::vector<char> out = dev.download();
        for (size_t i = 0; i < count; ++i) {
          const double want = expected(t, op, 1, i);
          ASSERT_NEAR(load(t, out.data(), i), want, tolerance(t, want))
              << dataTypeName(t) << " " << reduceOpName(op) << " count " << count << " element "
              << i;
        }
      }
    }
  }
}

TEST_F(NcclTest, ReduceScatterEveryTypeAndOp) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  for (DataType t : kTypes) {
    for (ReduceOp op : kOps) {
      for (size_t count : kCounts) {
        const size_t es = dataTypeSize(t);
        std::vector<char> host(count * es + 1), sentinel(count * es + 1);
        for (size_t i = 0; i < count; ++i) {
          store(t, host.data(), i, value(op, 0, i));
          store(t, sentinel.data(), i, 99);
        }
        DeviceBuffer in(host.size()), out(host.size());
        in.upload(host, comm->stream());
        out.upload(sentinel, comm->stream());
        const Status s = comm->reduceScatter(in.get(), out.get(), count, t, op)->wait(kWait);
        ASSERT_TRUE(s.ok()) << s.toString();
        const std::vector<char> result = out.download();
        for (size_t i = 0; i < count; ++i) {
          const double want = expected(t, op, 1, i);
          ASSERT_NEAR(load(t, result.data(), i), want, tolerance(t, want))
              << dataTypeName(t) << " " << reduceOpName(op) << " count " << count << " element "
              << i;
        }
      }
    }
  }
}

TEST_F(NcclTest, BroadcastAllgatherAlltoallEveryType) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  for (DataType t : kTypes) {
    for (size_t count : kCounts) {
      const size_t es = dataTypeSize(t);
      std::vector<char> host(count * es + 1), sentinel(count * es + 1);
      for (size_t i = 0; i < count; ++i) store(t, sentinel.data(), i, 99);

      for (size_t i = 0; i < count; ++i) store(t, host.data(), i, static_cast<double>(i % 7));
      DeviceBuffer b(host.size());
      b.upload(host, comm->stream());
      Status s = comm->broadcast(b.get(), count, t, /*root=*/0)->wait(kWait);
      ASSERT_TRUE(s.ok()) << s.toString();
      std::vector<char> result = b.download();
      for (size_t i = 0; i < count; ++i) ASSERT_EQ(load(t, result.data(), i), i % 7);

      for (size_t i = 0; i < count; ++i) store(t, host.data(), i, static_cast<double>((i + 3) % 5));
      DeviceBuffer in(host.size()), out(host.size());
      in.upload(host, comm->stream());
      out.upload(sentinel, comm->stream());
      s = comm->allgather(in.get(), out.get(), count, t)->wait(kWait);
      ASSERT_TRUE(s.ok()) << s.toString();
      result = out.download();
      for (size_t i = 0; i < count; ++i) ASSERT_EQ(load(t, result.data(), i), (i + 3) % 5);

      for (size_t i = 0; i < count; ++i) store(t, host.data(), i, static_cast<double>(i % 100));
      in.upload(host, comm->stream());
      out.upload(sentinel, comm->stream());
      s = comm->alltoall(in.get(), out.get(), count, t)->wait(kWait);
      ASSERT_TRUE(s.ok()) << s.toString();
      result = out.download();
      for (size_t i = 0; i < count; ++i) {
        ASSERT_EQ(load(t, result.data(), i), i % 100) << dataTypeName(t) << " count " << count;
      }
    }
  }
}

TEST_F(NcclTest, SendRecvToItselfInOneGroupAndBarrier) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  constexpr size_t kCount = 1001;
  std::vector<std::int64_t> values(kCount);
  for (size_t i = 0; i < kCount; ++i) values[i] = static_cast<std::int64_t>(i) * 3 - 500;
  std::vector<char> host(kCount * sizeof(std::int64_t));
  std::memcpy(host.data(), values.data(), host.size());
  DeviceBuffer from(host.size()), to(host.size());
  from.upload(host, comm->stream());
  using T = NcclCommunicator::PeerTransfer;
  const Status s = comm->sendRecv({{T::Direction::kSend, from.get(), kCount, DataType::kI64, 0},
                                   {T::Direction::kRecv, to.get(), kCount, DataType::kI64, 0},
                                   {T::Direction::kSend, from.get(), 0, DataType::kI64, 0},
                                   {T::Direction::kRecv, to.get(), 0, DataType::kI64, 0}})
                       ->wait(kWait);
  ASSERT_TRUE(s.ok()) << s.toString();
  const std::vector<char> result = to.download();
  std::vector<std::int64_t> got(kCount);
  std::memcpy(got.data(), result.data(), host.size());
  EXPECT_EQ(got, values);

  const Status b = comm->barrier()->wait(kWait);
  EXPECT_TRUE(b.ok()) << b.toString();
  EXPECT_TRUE(comm->sendRecv({})->wait(kWait).ok());
}

TEST_F(NcclTest, BadRootPeerAndHostMemoryAreRefusedAndTheCommunicatorStaysUsable) {
  auto comm = makeWorld(/*generation=*/42);
  ASSERT_NE(comm, nullptr);
  DeviceBuffer dev(64);
  for (int root : {-1, 1}) {
    const Status s = comm->broadcast(dev.get(), 4, DataType::kF32, root)->wait(kWait);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
    EXPECT_THAT(s.message(), HasSubstr(fmt::format("root {}", root)));
    EXPECT_THAT(s.message(), HasSubstr("rank 0 of 1, generation 42"));
  }
  Status s = comm->send(dev.get(), 4, DataType::kF32, /*peer=*/0)->wait(kWait);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
  EXPECT_THAT(s.message(), HasSubstr("send(4 x f32 to rank 0)"));
  s = comm->recv(dev.get(), 4, DataType::kF32, /*peer=*/1)->wait(kWait);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
  using T = NcclCommunicator::PeerTransfer;
  s = comm->sendRecv({{T::Direction::kSend, dev.get(), 4, DataType::kF32, 3}})->wait(kWait);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();

  std::vector<float> host(16, 1.0f);
  s = comm->allreduce(host.data(), host.size(), DataType::kF32, ReduceOp::kSum)->wait(kWait);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
  EXPECT_THAT(s.message(), HasSubstr("host memory"));
  EXPECT_THAT(s.message(), HasSubstr("allreduce(16 x f32, sum)"));

  // Nothing reached NCCL: the communicator still works.
  s = comm->allreduce(dev.get(), 16, DataType::kF32, ReduceOp::kSum)->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();
}

TEST_F(NcclTest, OperationsAreOrderedOnTheCallersStream) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  cudaStream_t mine = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&mine, cudaStreamNonBlocking), cudaSuccess);
  const cudaStream_t own = comm->stream();
  ASSERT_TRUE(comm->setStream(mine).ok());
  EXPECT_EQ(comm->stream(), mine);

  // Upload, allgather and download all on `mine`, with no host wait in between: the download
  // sees the allgather's output only if the allgather was enqueued between the two.
  constexpr size_t kCount = 1 << 22;
  std::vector<char> host(kCount * sizeof(float)), sentinel(kCount * sizeof(float));
  for (size_t i = 0; i < kCount; ++i) {
    store(DataType::kF32, host.data(), i, static_cast<double>(i % 1000));
    store(DataType::kF32, sentinel.data(), i, -1);
  }
  DeviceBuffer in(host.size()), out(host.size());
  in.upload(host, mine);
  out.upload(sentinel, mine);
  auto work = comm->allgather(in.get(), out.get(), kCount, DataType::kF32);
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(reinterpret_cast<void**>(&pinned), host.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(pinned, out.get(), host.size(), cudaMemcpyDeviceToHost, mine),
            cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(mine), cudaSuccess);
  for (size_t i = 0; i < kCount; i += 997) {
    ASSERT_EQ(pinned[i], static_cast<float>(i % 1000)) << "element " << i;
  }
  EXPECT_TRUE(work->done());
  const Status s = work->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();
  (void)cudaFreeHost(pinned);

  ASSERT_TRUE(comm->setStream(nullptr).ok());
  EXPECT_EQ(comm->stream(), own);
  comm.reset();
  (void)cudaStreamDestroy(mine);
}

TEST_F(NcclTest, WaitTimesOutWhileQueuedThenCompletes) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  DeviceBuffer dev(1024 * sizeof(float));
  StreamGate gate(comm->stream());
  auto work = comm->allreduce(dev.get(), 1024, DataType::kF32, ReduceOp::kMax);
  const Status early = work->wait(Milliseconds(20));
  EXPECT_EQ(early.code(), StatusCode::kTimeout) << early.toString();
  EXPECT_THAT(early.message(), HasSubstr("allreduce(1024 x f32, max)"));
  EXPECT_FALSE(work->done());
  gate.release();
  const Status s = work->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();
  EXPECT_TRUE(work->done());
}

// A buffer written on another stream (autograd's, for DDP's buckets): after waitForEvent() with
// an event recorded there, the operations wait on the GPU for what that stream had queued, the
// legacy default stream's too.
TEST_F(NcclTest, OperationsWaitForTheEventTheyWereGiven) {
  auto comm = makeWorld();
  ASSERT_NE(comm, nullptr);
  DeviceBuffer dev(1024 * sizeof(float));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(comm->waitForEvent(nullptr).code(), StatusCode::kInvalidArgument);
  cudaStream_t other = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
  cudaEvent_t event = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), cudaSuccess);
  for (cudaStream_t producer : {other, static_cast<cudaStream_t>(nullptr)}) {
    const char* which = producer == nullptr ? "the legacy default stream" : "a stream of its own";
    StreamGate gate(producer);  // the "kernels" that write the buffer, not yet run
    ASSERT_EQ(cudaEventRecord(event, producer), cudaSuccess);
    const Status ordered = comm->waitForEvent(event);
    ASSERT_TRUE(ordered.ok()) << ordered.toString();
    auto work = comm->allreduce(dev.get(), 1024, DataType::kF32, ReduceOp::kSum);
    const Status early = work->wait(Milliseconds(50));
    EXPECT_EQ(early.code(), StatusCode::kTimeout)
        << which << ": the allreduce ran before what it was told to wait for: " << early.toString();
    gate.release();
    const Status s = work->wait(kWait);
    EXPECT_TRUE(s.ok()) << which << ": " << s.toString();
  }
  comm.reset();
  (void)cudaEventDestroy(event);
  (void)cudaStreamDestroy(other);
}

TEST_F(NcclTest, AbortFromAnotherThreadEndsAQueuedOperationsWaitWithin500ms) {
  auto comm = makeWorld(/*generation=*/3);
  ASSERT_NE(comm, nullptr);
  DeviceBuffer dev(4096 * sizeof(float));
  StreamGate gate(comm->stream());  // the allreduce stays queued behind it
  auto work = comm->allreduce(dev.get(), 4096, DataType::kF32, ReduceOp::kSum);
  EXPECT_FALSE(work->done());

  std::atomic<std::int64_t> aborted_at{0};
  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    aborted_at = Clock::now().time_since_epoch().count();
    comm->abort("test: the generation moved");
  });
  const Status s = work->wait(kWait);
  const auto returned = Clock::now();
  gate.release();  // the aborter may be waiting for the stream (ncclCommAbort)
  aborter.join();

  EXPECT_EQ(s.code(), StatusCode::kAborted) << s.toString();
  EXPECT_THAT(s.message(), HasSubstr("test: the generation moved"));
  EXPECT_THAT(s.message(), HasSubstr("allreduce(4096 x f32, sum) on rank 0 of 1, generation 3"));
  const auto latency = returned - Clock::time_point(Clock::duration(aborted_at.load()));
  EXPECT_LT(latency, std::chrono::milliseconds(500))
      << std::chrono::duration_cast<std::chrono::milliseconds>(latency).count() << " ms";
  EXPECT_TRUE(comm->aborted());
  EXPECT_TRUE(work->done());

  // Later calls fail at once, naming the first reason (abort() is idempotent).
  comm->abort("a second reason");
  const auto start = Clock::now();
  const Status later = comm->allreduce(dev.get(), 16, DataType::kF32, ReduceOp::kSum)->wait(kWait);
  EXPECT_EQ(later.code(), StatusCode::kAborted) << later.toString();
  EXPECT_THAT(later.message(), HasSubstr("test: the generation moved"));
  EXPECT_EQ(comm->barrier()->wait(kWait).code(), StatusCode::kAborted);
  EXPECT_EQ(comm->split(0, 0).status().code(), StatusCode::kAborted);
  EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(100));
}

TEST_F(NcclTest, SplitMakesAWorkingCommunicator) {
  auto world = makeWorld(/*generation=*/9);
  ASSERT_NE(world, nullptr);
  auto sub = world->split(/*color=*/3, /*key=*/0);
  ASSERT_TRUE(sub.ok()) << sub.status().toString();
  Communicator& c = **sub;
  EXPECT_EQ(c.backend(), "nccl");
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.generation(), 9u);
  NcclCommunicator* nccl = asNccl(c);
  ASSERT_NE(nccl, nullptr);
  EXPECT_EQ(nccl->device(), 0);
  EXPECT_NE(nccl->stream(), world->stream());

  DeviceBuffer dev(3 * sizeof(double));
  Status s = c.allreduce(dev.get(), 3, DataType::kF64, ReduceOp::kSum)->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();
  s = world->allreduce(dev.get(), 3, DataType::kF64, ReduceOp::kSum)->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();

  auto negative = world->split(-1, 0);
  ASSERT_FALSE(negative.ok());
  EXPECT_EQ(negative.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(negative.status().message(), HasSubstr("color -1"));
}

TEST_F(NcclTest, ShrinkWithNoExclusionsGivesAWorkingCommunicatorAlsoAfterAbort) {
  auto world = makeWorld();
  ASSERT_NE(world, nullptr);
  if (!world->capabilities().can_shrink) {
    auto r = world->shrink({});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented) << r.status().toString();
    return;
  }
  for (const std::vector<int>& bad : std::vector<std::vector<int>>{{0}, {3}, {-1}}) {
    auto r = world->shrink(bad);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().toString();
  }
  DeviceBuffer dev(5 * sizeof(std::int32_t));
  auto healthy = world->shrink({});
  ASSERT_TRUE(healthy.ok()) << healthy.status().toString();
  EXPECT_EQ((*healthy)->size(), 1);
  Status s = (*healthy)->allreduce(dev.get(), 5, DataType::kI32, ReduceOp::kMin)->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();

  // The elastic path: abort (revoke), then shrink the survivors.
  world->abort("test: a peer died");
  auto survivors = world->shrink({});
  ASSERT_TRUE(survivors.ok()) << survivors.status().toString();
  EXPECT_FALSE((*survivors)->aborted());
  s = (*survivors)->allreduce(dev.get(), 5, DataType::kI32, ReduceOp::kSum)->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();
  s = (*survivors)->barrier()->wait(kWait);
  EXPECT_TRUE(s.ok()) << s.toString();
}

TEST_F(NcclTest, CreationWaitsForRankZerosIdUntilStoppedOrTimedOut) {
  MemoryStore store;
  CommunicatorOptions o;
  o.rank = 1;
  o.size = 2;
  o.generation = 12;
  o.device = 0;
  o.connect_timeout = Milliseconds(30'000);
  std::stop_source stop;
  std::atomic<std::int64_t> stopped_at{0};
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    stopped_at = Clock::now().time_since_epoch().count();
    stop.request_stop();
  });
  auto comm = NcclCommunicator::create(store, o, stop.get_token());
  const auto returned = Clock::now();
  stopper.join();
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kAborted) << comm.status().toString();
  EXPECT_LT(returned - Clock::time_point(Clock::duration(stopped_at.load())),
            std::chrono::milliseconds(500));

  o.connect_timeout = Milliseconds(300);
  comm = NcclCommunicator::create(store, o);
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), StatusCode::kTimeout) << comm.status().toString();
  EXPECT_THAT(comm.status().message(), HasSubstr("nccl/12/world/id"));
}

// NCCL usually refuses two ranks on one GPU; where it accepts them this checks real reductions
// and a ring exchange. A refusal is reported, not failed (nor skipped: that would mark the whole
// binary skipped in ctest).
TEST_F(NcclTest, TwoRanksOnOneGpuWhereNcclAllowsIt) {
  MemoryStore store;
  std::unique_ptr<NcclCommunicator> comms[2];
  Status statuses[2];
  {
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        CommunicatorOptions o;
        o.rank = r;
        o.size = 2;
        o.name = "pair";
        o.device = 0;
        o.connect_timeout = kWait;
        o.op_timeout = kWait;
        auto c = NcclCommunicator::create(store, o);
        if (c.ok()) {
          comms[r] = std::move(*c);
        } else {
          statuses[r] = c.status();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  if (comms[0] == nullptr || comms[1] == nullptr) {
    std::cout << "NCCL did not form two ranks on one GPU (as expected): "
              << (statuses[0].ok() ? statuses[1] : statuses[0]).toString() << "\n";
    return;
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      NcclCommunicator& c = *comms[r];
      std::vector<float> host = {static_cast<float>(r + 1), static_cast<float>(10 * r), 3.0f};
      std::vector<char> bytes(host.size() * sizeof(float));
      std::memcpy(bytes.data(), host.data(), bytes.size());
      DeviceBuffer dev(bytes.size());
      dev.upload(bytes, c.stream());
      Status s = c.allreduce(dev.get(), 3, DataType::kF32, ReduceOp::kSum)->wait(kWait);
      EXPECT_TRUE(s.ok()) << s.toString();
      std::vector<char> out = dev.download();
      EXPECT_EQ(load(DataType::kF32, out.data(), 0), 3.0);
      EXPECT_EQ(load(DataType::kF32, out.data(), 1), 10.0);
      EXPECT_EQ(load(DataType::kF32, out.data(), 2), 6.0);
      dev.upload(bytes, c.stream());
      s = c.allreduce(dev.get(), 3, DataType::kF32, ReduceOp::kMin)->wait(kWait);
      EXPECT_TRUE(s.ok()) << s.toString();
      out = dev.download();
      EXPECT_EQ(load(DataType::kF32, out.data(), 0), 1.0);
      EXPECT_EQ(load(DataType::kF32, out.data(), 1), 0.0);

      // Ring exchange in one group: send to the other rank, receive from it.
      DeviceBuffer from(bytes.size()), to(bytes.size());
      from.upload(bytes, c.stream());
      using T = NcclCommunicator::PeerTransfer;
      s = c.sendRecv({{T::Direction::kSend, from.get(), 3, DataType::kF32, 1 - r},
                      {T::Direction::kRecv, to.get(), 3, DataType::kF32, 1 - r}})
              ->wait(kWait);
      EXPECT_TRUE(s.ok()) << s.toString();
      out = to.download();
      EXPECT_EQ(load(DataType::kF32, out.data(), 0), static_cast<double>(2 - r));
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace
}  // namespace rally::collectives
