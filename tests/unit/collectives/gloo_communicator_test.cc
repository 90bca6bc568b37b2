// The Gloo communicator with N ranks as threads over an in-memory bootstrap store: every operation
// x dtype x reduce op for world sizes 1-4 against references computed here (odd counts, zero-length
// buffers); abort() from another thread unblocks a waiting call; a peer that goes away surfaces as
// PeerLost; errors name the rank, the operation and the generation.
#include "collectives/gloo/gloo_communicator.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <thread>
#include <tuple>

#include "tests/unit/collectives/collective_checks.h"

namespace rally::collectives {
namespace {

using namespace test_support;  // NOLINT(google-build-using-namespace)

enum class Transport { kTcp, kSharedMemory };

// Creates `n` communicators (one per thread) and runs `body(rank, comm)` on each rank's thread.
// The ranks share a host, so by default collectives go through shared memory.
void runRanks(int n, const std::function<void(int, Communicator&)>& body,
              Transport transport = Transport::kSharedMemory, std::uint64_t generation = 7) {
  MemoryStore store;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      auto comm =
          createGlooCommunicator(store, {.rank = r,
                                         .size = n,
                                         .generation = generation,
                                         .connect_timeout = Milliseconds(20000),
                                         .op_timeout = Milliseconds(20000),
                                         .shared_memory = transport == Transport::kSharedMemory});
      ASSERT_TRUE(comm.ok()) << comm.status().toString();
      EXPECT_EQ(usesSharedMemory(**comm), transport == Transport::kSharedMemory && n > 1);
      body(r, **comm);
    });
  }
  for (auto& t : threads) t.join();
}

class GlooWorldTest : public ::testing::TestWithParam<std::tuple<int, Transport>> {};

TEST_P(GlooWorldTest, AllreduceEveryTypeAndOp) {
  const auto [n, transport] = GetParam();
  runRanks(
      n, [n = n](int rank, Communicator& comm) { checkAllreduceEveryTypeAndOp(rank, n, comm); },
      transport);
}

TEST_P(GlooWorldTest, BroadcastAllgatherAlltoallReduceScatter) {
  const auto [n, transport] = GetParam();
  runRanks(
      n,
      [n = n](int rank, Communicator& comm) {
        checkBroadcastAllgatherAlltoallReduceScatter(rank, n, comm);
      },
      transport);
}

TEST_P(GlooWorldTest, SendRecvAroundARing) {
  const auto [n, transport] = GetParam();
  if (n == 1) GTEST_SKIP() << "send/recv need a peer";
  runRanks(
      n, [n = n](int rank, Communicator& comm) { checkSendRecvAroundARing(rank, n, comm); },
      transport);
}

// Buffers larger than one shared-memory step (several steps, both buffers, a partial last step)
// and than one TCP message: every element checked.
TEST_P(GlooWorldTest, LargeBuffersSpanManySteps) {
  const auto [n, transport] = GetParam();
  runRanks(
      n,
      [n = n](int rank, Communicator& comm) {
        const size_t count = (5u << 20) / 4 + 7;  // 5 MiB of f32 and a bit
        std::vector<float> data(count);
        for (size_t i = 0; i < count; ++i) data[i] = static_cast<float>((rank + i) % 13);
        ASSERT_TRUE(comm.allreduce(data.data(), count, DataType::kF32, ReduceOp::kSum)
                        ->wait(milliseconds(60000))
                        .ok());
        for (size_t i = 0; i < count; ++i) {
          float want = 0;
          for (int r = 0; r < n; ++r) want += static_cast<float>((r + i) % 13);
          ASSERT_EQ(data[i], want) << "element " << i;
        }
        // An average over many steps and reduction pieces: the division happens once per element.
        std::vector<double> avg(300'001);
        for (size_t i = 0; i < avg.size(); ++i) avg[i] = static_cast<double>((rank * 5 + i) % 17);
        ASSERT_TRUE(comm.allreduce(avg.data(), avg.size(), DataType::kF64, ReduceOp::kAvg)
                        ->wait(milliseconds(60000))
                        .ok());
        for (size_t i = 0; i < avg.size(); ++i) {
          double sum = 0;
          for (int r = 0; r < n; ++r) sum += static_cast<double>((r * 5 + i) % 17);
          ASSERT_EQ(avg[i], sum / n) << "element " << i;
        }
        std::vector<std::int32_t> in(count * n), out(count);
        for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<std::int32_t>(i % 1000 + rank);
        ASSERT_TRUE(comm.reduceScatter(in.data(), out.data(), count, DataType::kI32, ReduceOp::kMax)
                        ->wait(milliseconds(60000))
                        .ok());
        for (size_t i = 0; i < count; ++i) {
          ASSERT_EQ(out[i], static_cast<std::int32_t>((rank * count + i) % 1000 + n - 1))
              << "element " << i;
        }
        std::vector<std::int32_t> gathered(count * n);
        ASSERT_TRUE(comm.allgather(out.data(), gathered.data(), count, DataType::kI32)
                        ->wait(milliseconds(60000))
                        .ok());
        for (size_t i = 0; i < gathered.size(); ++i) {
          ASSERT_EQ(gathered[i], static_cast<std::int32_t>(i % 1000 + n - 1)) << "element " << i;
        }
        std::vector<std::uint8_t> bytes(count * 4 + 3, static_cast<std::uint8_t>(rank));
        ASSERT_TRUE(comm.broadcast(bytes.data(), bytes.size(), DataType::kU8, n - 1)
                        ->wait(milliseconds(60000))
                        .ok());
        ASSERT_EQ(std::count(bytes.begin(), bytes.end(), n - 1),
                  static_cast<std::ptrdiff_t>(bytes.size()));
      },
      transport);
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, GlooWorldTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(Transport::kTcp,
                                                              Transport::kSharedMemory)),
                         [](const auto& info) {
                           return fmt::format(
                               "{}ranks_{}", std::get<0>(info.param),
                               std::get<1>(info.param) == Transport::kTcp ? "tcp" : "shm");
                         });

TEST(GlooAbortTest, AbortFromAnotherThreadUnblocksAWaitingCallAtOnce) {
  runRanks(2, [&](int rank, Communicator& comm) {
    if (rank == 1) {
      std::this_thread::sleep_for(milliseconds(1500));  // never sends; rank 0 aborts meanwhile
      return;
    }
    std::vector<float> buf(16);
    auto work = comm.recv(buf.data(), buf.size(), DataType::kF32, 1);
    std::this_thread::sleep_for(milliseconds(200));
    const auto t0 = std::chrono::steady_clock::now();
    std::thread([&] { comm.abort("test: generation moved"); }).join();
    const Status s = work->wait(milliseconds(5000));
    EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(500));
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.toString();
    EXPECT_NE(s.message().find("rank 0 of 2, generation 7"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("recv"), std::string::npos);
    EXPECT_NE(s.message().find("generation moved"), std::string::npos);
    // Later calls fail at once, with the same distinct error.
    const Status later = comm.allreduce(buf.data(), buf.size(), DataType::kF32, ReduceOp::kSum)
                             ->wait(milliseconds(100));
    EXPECT_EQ(later.code(), StatusCode::kAborted);
    EXPECT_TRUE(comm.aborted());
  });
}

class GlooTransportTest : public ::testing::TestWithParam<Transport> {};

TEST_P(GlooTransportTest, PeerThatGoesAwaySurfacesAsPeerLostWithinABound) {
  runRanks(
      2,
      [&](int rank, Communicator& comm) {
        std::vector<float> big(1 << 20, 1.0f);
        if (rank == 1) {
          std::this_thread::sleep_for(milliseconds(300));
          comm.abort("test: this rank dies");  // its connections close, as when it dies
          return;
        }
        const auto t0 = std::chrono::steady_clock::now();
        const Status s = comm.allreduce(big.data(), big.size(), DataType::kF32, ReduceOp::kSum)
                             ->wait(milliseconds(15000));
        EXPECT_EQ(s.code(), StatusCode::kPeerLost) << s.toString();
        EXPECT_NE(s.message().find("allreduce"), std::string::npos);
        EXPECT_NE(s.message().find("rank 0 of 2, generation 7"), std::string::npos) << s.message();
        EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(3000))
            << "a peer that went away is seen at once, not at the operation timeout";
      },
      GetParam());
}

TEST_P(GlooTransportTest, AbortUnblocksACollectiveWaitingForALatePeer) {
  runRanks(
      3,
      [&](int rank, Communicator& comm) {
        std::vector<double> buf(1000, 1.0);
        if (rank == 2) {
          std::this_thread::sleep_for(milliseconds(1500));  // late: never joins in time
          return;
        }
        auto work = comm.allreduce(buf.data(), buf.size(), DataType::kF64, ReduceOp::kSum);
        std::this_thread::sleep_for(milliseconds(200));
        EXPECT_FALSE(work->done()) << work->wait(milliseconds(0)).toString();
        if (rank == 0) std::this_thread::sleep_for(milliseconds(200));  // after rank 1's check
        const auto t0 = std::chrono::steady_clock::now();
        if (rank == 0) std::thread([&] { comm.abort("test: generation moved"); }).join();
        const Status s = work->wait(milliseconds(5000));
        // Every rank returns at once: the one that aborted, and rank 1, which was waiting on the
        // late rank 2 but sees rank 0's connection (TCP) or flag (shared memory) go.
        EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(rank == 0 ? 500 : 700))
            << s.toString();
        // The rank that aborted sees Aborted; the other one loses its peer.
        EXPECT_EQ(s.code(), rank == 0 ? StatusCode::kAborted : StatusCode::kPeerLost)
            << s.toString();
      },
      GetParam());
}

TEST_P(GlooTransportTest, SurvivorsShrinkAroundADeadRank) {
  runRanks(
      3,
      [&](int rank, Communicator& comm) {
        EXPECT_TRUE(comm.capabilities().can_shrink);
        // Every rank connected before rank 1 goes: aborting while a peer still completes its
        // connection to it resets that connection, and the peer's creation fails instead.
        ASSERT_TRUE(comm.barrier()->wait(milliseconds(20000)).ok());
        if (rank == 1) {
          comm.abort("test: rank 1 dies");
          return;
        }
        std::int64_t x = 1;
        EXPECT_FALSE(
            comm.allreduce(&x, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(5000)).ok());
        auto small = comm.shrink({1});
        ASSERT_TRUE(small.ok()) << small.status().toString();
        EXPECT_EQ((*small)->size(), 2);
        EXPECT_EQ((*small)->rank(), rank == 0 ? 0 : 1);
        x = rank;
        ASSERT_TRUE((*small)
                        ->allreduce(&x, 1, DataType::kI64, ReduceOp::kSum)
                        ->wait(milliseconds(10000))
                        .ok());
        EXPECT_EQ(x, 0 + 2);
        EXPECT_EQ(comm.shrink({rank}).status().code(), StatusCode::kInvalidArgument);
        EXPECT_EQ(comm.shrink({7}).status().code(), StatusCode::kInvalidArgument);
      },
      GetParam());
}

INSTANTIATE_TEST_SUITE_P(Transports, GlooTransportTest,
                         ::testing::Values(Transport::kTcp, Transport::kSharedMemory),
                         [](const auto& info) {
                           return info.param == Transport::kTcp ? "tcp" : "shm";
                         });

TEST(GlooCallCheckTest, MismatchedCountsAcrossRanksGiveAClearError) {
  runRanks(3, [&](int rank, Communicator& comm) {
    std::vector<float> buf(16, 1.0f);
    const size_t count = rank == 2 ? 12 : 10;
    const Status s = comm.allreduce(buf.data(), count, DataType::kF32, ReduceOp::kSum)
                         ->wait(milliseconds(10000));
    ASSERT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
    EXPECT_NE(s.message().find("rank 2: allreduce(12 x f32, sum)"), std::string::npos)
        << s.message();
    EXPECT_NE(s.message().find("rank 0: allreduce(10 x f32, sum)"), std::string::npos);
    EXPECT_EQ(buf[0], 1.0f) << "nothing was reduced";
    // The communicator stays usable once the ranks agree again.
    ASSERT_TRUE(comm.allreduce(buf.data(), 10, DataType::kF32, ReduceOp::kSum)
                    ->wait(milliseconds(10000))
                    .ok());
    EXPECT_EQ(buf[0], 3.0f);
    const Status op =
        (rank == 0 ? comm.barrier() : comm.broadcast(buf.data(), 1, DataType::kF32, 0))
            ->wait(milliseconds(10000));
    EXPECT_EQ(op.code(), StatusCode::kInvalidArgument) << "barrier against broadcast";
  });
}

TEST(GlooSplitTest, SplitByColorOrdersByKey) {
  runRanks(4, [&](int rank, Communicator& comm) {
    auto sub = comm.split(rank % 2, -rank);  // key -rank: reverse order within each color
    ASSERT_TRUE(sub.ok()) << sub.status().toString();
    EXPECT_EQ((*sub)->size(), 2);
    EXPECT_EQ((*sub)->rank(), rank < 2 ? 1 : 0);
    std::int64_t x = rank;
    ASSERT_TRUE(
        (*sub)->allreduce(&x, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(10000)).ok());
    EXPECT_EQ(x, rank % 2 == 0 ? 0 + 2 : 1 + 3);
  });
}

class GlooGridTest : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(GlooGridTest, CollectivesOnDpAndTpGroupsAreCorrect) {
  const auto [world, tp] = GetParam();
  runRanks(world, [&, tp = tp, world = world](int rank, Communicator& comm) {
    auto grid = makeGrid(comm, tp);
    ASSERT_TRUE(grid.ok()) << grid.status().toString();
    EXPECT_EQ(grid->tp->size(), tp);
    EXPECT_EQ(grid->dp->size(), world / tp);
    EXPECT_EQ(grid->tp->rank(), rank % tp);
    EXPECT_EQ(grid->dp->rank(), rank / tp);
    // TP group g holds ranks g*tp .. g*tp+tp-1; DP group j holds ranks j, j+tp, ...
    std::int64_t t = rank, d = rank;
    ASSERT_TRUE(
        grid->tp->allreduce(&t, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(10000)).ok());
    ASSERT_TRUE(
        grid->dp->allreduce(&d, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(10000)).ok());
    std::int64_t want_t = 0, want_d = 0;
    for (int i = 0; i < tp; ++i) want_t += (rank / tp) * tp + i;
    for (int j = 0; j < world / tp; ++j) want_d += j * tp + rank % tp;
    EXPECT_EQ(t, want_t);
    EXPECT_EQ(d, want_d);
    std::vector<float> g(world / tp);
    float mine = static_cast<float>(rank);
    ASSERT_TRUE(
        grid->dp->allgather(&mine, g.data(), 1, DataType::kF32)->wait(milliseconds(10000)).ok());
    for (int j = 0; j < world / tp; ++j) EXPECT_EQ(g[j], j * tp + rank % tp);
  });
}

INSTANTIATE_TEST_SUITE_P(Grids, GlooGridTest,
                         ::testing::Values(std::pair{4, 2}, std::pair{6, 2}, std::pair{6, 3}));

TEST(GlooGridBadInputTest, TpSizeMustDivideTheWorld) {
  runRanks(1, [&](int, Communicator& comm) {
    auto grid = makeGrid(comm, 2);
    EXPECT_EQ(grid.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(grid.status().message().find("multiple"), std::string::npos);
  });
}

TEST(GlooBadInputTest, BadRanksAreRefusedWithReasons) {
  MemoryStore store;
  auto c = createGlooCommunicator(store, {.rank = 3, .size = 2});
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  runRanks(1, [&](int, Communicator& comm) {
    float x = 0;
    EXPECT_EQ(comm.broadcast(&x, 1, DataType::kF32, 5)->wait(milliseconds(100)).code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(comm.send(&x, 1, DataType::kF32, 0)->wait(milliseconds(100)).code(),
              StatusCode::kInvalidArgument);
  });
}

}  // namespace
}  // namespace rally::collectives
