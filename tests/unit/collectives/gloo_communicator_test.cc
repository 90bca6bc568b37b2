// The Gloo communicator with N ranks as threads over an in-memory bootstrap store: every operation
// x dtype x reduce op for world sizes 1-4 against references computed here (odd counts, zero-length
// buffers); abort() from another thread unblocks a waiting call; a peer that goes away surfaces as
// PeerLost; errors name the rank, the operation and the generation.
#include "collectives/gloo/gloo_communicator.h"

#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <thread>

#include "collectives/internal/reduce.h"

namespace rally::collectives {
namespace {

using std::chrono::milliseconds;

class MemoryStore : public BootstrapStore {
 public:
  Status set(const std::string& key, const std::string& value) override {
    {
      std::lock_guard lock(mu_);
      data_[key] = value;
    }
    cv_.notify_all();
    return okStatus();
  }
  Result<std::string> get(const std::string& key) override {
    std::lock_guard lock(mu_);
    auto it = data_.find(key);
    if (it == data_.end()) return notFound(key);
    return it->second;
  }
  Status wait(const std::vector<std::string>& keys, Milliseconds timeout) override {
    std::unique_lock lock(mu_);
    const bool ok = cv_.wait_for(lock, timeout, [&] {
      for (const auto& k : keys) {
        if (data_.count(k) == 0) return false;
      }
      return true;
    });
    return ok ? okStatus() : timeoutError("keys never set");
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> data_;
};

// Creates `n` communicators (one per thread) and runs `body(rank, comm)` on each rank's thread.
void runRanks(int n, const std::function<void(int, Communicator&)>& body,
              std::uint64_t generation = 7) {
  MemoryStore store;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      auto comm = createGlooCommunicator(store, {.rank = r,
                                                 .size = n,
                                                 .generation = generation,
                                                 .connect_timeout = Milliseconds(20000),
                                                 .op_timeout = Milliseconds(20000)});
      ASSERT_TRUE(comm.ok()) << comm.status().toString();
      body(r, **comm);
    });
  }
  for (auto& t : threads) t.join();
}

// Values as doubles, stored in and read from any dtype.
void store(DataType t, void* p, size_t i, double v) {
  switch (t) {
    case DataType::kF32:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case DataType::kF64:
      static_cast<double*>(p)[i] = v;
      break;
    case DataType::kI32:
      static_cast<std::int32_t*>(p)[i] = static_cast<std::int32_t>(v);
      break;
    case DataType::kI64:
      static_cast<std::int64_t*>(p)[i] = static_cast<std::int64_t>(v);
      break;
    case DataType::kU8:
      static_cast<std::uint8_t*>(p)[i] = static_cast<std::uint8_t>(v);
      break;
    case DataType::kF16:
      static_cast<std::uint16_t*>(p)[i] = internal::floatToHalf(static_cast<float>(v));
      break;
    case DataType::kBF16:
      static_cast<std::uint16_t*>(p)[i] = internal::floatToBf16(static_cast<float>(v));
      break;
  }
}
double load(DataType t, const void* p, size_t i) {
  switch (t) {
    case DataType::kF32:
      return static_cast<const float*>(p)[i];
    case DataType::kF64:
      return static_cast<const double*>(p)[i];
    case DataType::kI32:
      return static_cast<const std::int32_t*>(p)[i];
    case DataType::kI64:
      return static_cast<const std::int64_t*>(p)[i];
    case DataType::kU8:
      return static_cast<const std::uint8_t*>(p)[i];
    case DataType::kF16:
      return internal::halfToFloat(static_cast<const std::uint16_t*>(p)[i]);
    case DataType::kBF16:
      return internal::bf16ToFloat(static_cast<const std::uint16_t*>(p)[i]);
  }
  return 0;
}
bool isFloat(DataType t) {
  return t == DataType::kF32 || t == DataType::kF64 || t == DataType::kF16 || t == DataType::kBF16;
}
double tolerance(DataType t, double expected) {
  switch (t) {
    case DataType::kF16:
      return 2e-3 * std::abs(expected) + 1e-3;
    case DataType::kBF16:
      return 1e-2 * std::abs(expected) + 1e-2;
    default:
      return 1e-6 * std::abs(expected) + 1e-9;
  }
}

// Small values, so that sums and products are exact in every dtype (u8 products stay below 256).
double value(ReduceOp op, int rank, size_t i) {
  if (op == ReduceOp::kProd) return 1 + static_cast<double>((rank + i) % 2);
  return static_cast<double>((rank * 3 + i * 7) % 6);
}

double expected(DataType t, ReduceOp op, int n, size_t i) {
  double acc = value(op, 0, i);
  for (int r = 1; r < n; ++r) {
    const double v = value(op, r, i);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc += v;
        break;
      case ReduceOp::kProd:
        acc *= v;
        break;
      case ReduceOp::kMin:
        acc = std::min(acc, v);
        break;
      case ReduceOp::kMax:
        acc = std::max(acc, v);
        break;
    }
  }
  if (op == ReduceOp::kAvg) acc = isFloat(t) ? acc / n : std::trunc(acc / n);
  return acc;
}

constexpr DataType kTypes[] = {DataType::kF32, DataType::kF64, DataType::kF16, DataType::kBF16,
                               DataType::kI32, DataType::kI64, DataType::kU8};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax,
                             ReduceOp::kProd};
constexpr size_t kCounts[] = {0, 1, 3, 1001};

class GlooWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(GlooWorldTest, AllreduceEveryTypeAndOp) {
  const int n = GetParam();
  runRanks(n, [&](int rank, Communicator& comm) {
    for (DataType t : kTypes) {
      for (ReduceOp op : kOps) {
        for (size_t count : kCounts) {
          std::vector<char> buf(count * dataTypeSize(t) + 1);
          for (size_t i = 0; i < count; ++i) store(t, buf.data(), i, value(op, rank, i));
          ASSERT_TRUE(comm.allreduce(buf.data(), count, t, op)->wait(milliseconds(20000)).ok());
          for (size_t i = 0; i < count; ++i) {
            const double want = expected(t, op, n, i);
            ASSERT_NEAR(load(t, buf.data(), i), want, tolerance(t, want))
                << "rank " << rank << " " << dataTypeName(t) << " " << reduceOpName(op) << " count "
                << count << " element " << i;
          }
        }
      }
    }
  });
}

TEST_P(GlooWorldTest, BroadcastAllgatherAlltoallReduceScatter) {
  const int n = GetParam();
  runRanks(n, [&](int rank, Communicator& comm) {
    for (DataType t : kTypes) {
      for (size_t count : kCounts) {
        const size_t es = dataTypeSize(t);
        for (int root = 0; root < n; ++root) {  // broadcast from every root
          std::vector<char> b(count * es + 1);
          for (size_t i = 0; i < count; ++i)
            store(t, b.data(), i, rank == root ? (i + root) % 7 : 99);
          ASSERT_TRUE(comm.broadcast(b.data(), count, t, root)->wait(milliseconds(20000)).ok());
          for (size_t i = 0; i < count; ++i) ASSERT_EQ(load(t, b.data(), i), (i + root) % 7);
        }
        std::vector<char> in(count * es * n + 1), out(count * es * n + 1);
        for (size_t i = 0; i < count; ++i) store(t, in.data(), i, (rank + i) % 5);
        ASSERT_TRUE(
            comm.allgather(in.data(), out.data(), count, t)->wait(milliseconds(20000)).ok());
        for (int r = 0; r < n; ++r) {
          for (size_t i = 0; i < count; ++i)
            ASSERT_EQ(load(t, out.data(), r * count + i), (r + i) % 5);
        }
        // alltoall: block j of rank r's input holds r*10 + j; rank r receives j*10 + r from rank j.
        for (int j = 0; j < n; ++j) {
          for (size_t i = 0; i < count; ++i)
            store(t, in.data(), j * count + i, (rank * 10 + j) % 100);
        }
        ASSERT_TRUE(comm.alltoall(in.data(), out.data(), count, t)->wait(milliseconds(20000)).ok());
        for (int j = 0; j < n; ++j) {
          for (size_t i = 0; i < count; ++i) {
            ASSERT_EQ(load(t, out.data(), j * count + i), (j * 10 + rank) % 100);
          }
        }
        // reduce_scatter (sum): element i of block b is sum over ranks of (r + b + i) % 3.
        for (int b = 0; b < n; ++b) {
          for (size_t i = 0; i < count; ++i) store(t, in.data(), b * count + i, (rank + b + i) % 3);
        }
        ASSERT_TRUE(comm.reduceScatter(in.data(), out.data(), count, t, ReduceOp::kSum)
                        ->wait(milliseconds(20000))
                        .ok());
        for (size_t i = 0; i < count; ++i) {
          double want = 0;
          for (int r = 0; r < n; ++r) want += (r + rank + i) % 3;
          ASSERT_NEAR(load(t, out.data(), i), want, tolerance(t, want));
        }
      }
    }
    ASSERT_TRUE(comm.barrier()->wait(milliseconds(20000)).ok());
  });
}

TEST_P(GlooWorldTest, SendRecvAroundARing) {
  const int n = GetParam();
  if (n == 1) GTEST_SKIP() << "send/recv need a peer";
  runRanks(n, [&](int rank, Communicator& comm) {
    for (int round = 0; round < 3; ++round) {
      std::vector<std::int64_t> out(257, rank * 1000 + round), in(257, -1);
      auto s = comm.send(out.data(), out.size(), DataType::kI64, (rank + 1) % n);
      auto r = comm.recv(in.data(), in.size(), DataType::kI64, (rank + n - 1) % n);
      ASSERT_TRUE(r->wait(milliseconds(20000)).ok());
      ASSERT_TRUE(s->wait(milliseconds(20000)).ok());
      EXPECT_EQ(in.front(), ((rank + n - 1) % n) * 1000 + round);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, GlooWorldTest, ::testing::Values(1, 2, 3, 4));

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

TEST(GlooAbortTest, PeerThatGoesAwaySurfacesAsPeerLostWithinABound) {
  runRanks(2, [&](int rank, Communicator& comm) {
    std::vector<float> big(1 << 20, 1.0f);
    if (rank == 1) {
      std::this_thread::sleep_for(milliseconds(300));
      comm.abort("test: this rank dies");  // its connections close, as when its process dies
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = comm.allreduce(big.data(), big.size(), DataType::kF32, ReduceOp::kSum)
                         ->wait(milliseconds(15000));
    EXPECT_EQ(s.code(), StatusCode::kPeerLost) << s.toString();
    EXPECT_NE(s.message().find("allreduce"), std::string::npos);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(3000))
        << "a peer's broken connection is seen at once, not at the operation timeout";
  });
}

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
