// The MPI communicator under mpirun: each process is one rank, and ctest runs this executable with
// 1, 2, 3 and 4 processes (tests/mpi/CMakeLists.txt); tests that need more ranks than the job has
// skip, on every rank alike. Every operation x dtype x reduce op against the references of
// collective_checks.h (odd and zero counts), buffers large enough for MPI's rendezvous protocols,
// split and makeGrid, mismatched calls, abort() from another thread and op_timeout, and the
// refusals (shrink, wrong rank or size, bad arguments).
//
// Every rank makes the same collective calls in the same order, in the error tests too; each test's
// TearDown joins a barrier on the test's world communicator, which keeps the ranks in step.
#include "collectives/mpi/mpi_communicator.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "tests/unit/collectives/collective_checks.h"

namespace rally::collectives {
namespace {

using namespace test_support;  // NOLINT(google-build-using-namespace)
using std::chrono::steady_clock;

constexpr std::uint64_t kGeneration = 7;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// First in this file, so that it runs before MPI starts threads that might read the environment
// while it is changed.
TEST(MpiLaunchTest, LaunchedByMpiReadsTheLaunchersEnvironment) {
  EXPECT_TRUE(launchedByMpi()) << "this test runs under mpirun, which sets OMPI_COMM_WORLD_SIZE";
  const char* kNames[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"};
  std::vector<std::pair<std::string, std::string>> saved;
  for (const char* name : kNames) {
    if (const char* v = std::getenv(name)) saved.emplace_back(name, v);
    unsetenv(name);
  }
  EXPECT_FALSE(launchedByMpi()) << "none of the launchers' variables is set";
  setenv("PMI_SIZE", "2", 1);
  EXPECT_TRUE(launchedByMpi()) << "srun with PMI sets PMI_SIZE";
  unsetenv("PMI_SIZE");
  for (const auto& [name, value] : saved) setenv(name.c_str(), value.c_str(), 1);
}

class MpiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto world = create(Milliseconds(20'000), /*check_calls=*/true);
    ASSERT_TRUE(world.ok()) << world.status().toString();
    world_ = std::move(*world);
    rank_ = world_->rank();
    n_ = world_->size();
  }
  void TearDown() override {
    if (world_ != nullptr) {
      const Status s = world_->barrier()->wait(Milliseconds(30'000));
      EXPECT_TRUE(s.ok()) << "the ranks fell out of step: " << s.toString();
    }
  }

  // A new communicator over all ranks (collective).
  static Result<std::unique_ptr<Communicator>> create(Milliseconds op_timeout, bool check_calls) {
    RALLY_ASSIGN_OR_RETURN(CommunicatorOptions options, mpiWorldOptions());
    options.generation = kGeneration;
    options.connect_timeout = Milliseconds(20'000);
    options.op_timeout = op_timeout;
    options.check_calls = check_calls;
    return createMpiCommunicator(options);
  }

  std::unique_ptr<Communicator> world_;
  int rank_ = -1;
  int n_ = 0;
};

TEST_F(MpiTest, RanksAndCapabilitiesComeFromMpi) {
  auto options = mpiWorldOptions();
  ASSERT_TRUE(options.ok()) << options.status().toString();
  EXPECT_EQ(world_->rank(), options->rank);
  EXPECT_EQ(world_->size(), options->size);
  EXPECT_GE(n_, 1);
  EXPECT_EQ(world_->generation(), kGeneration);
  EXPECT_EQ(world_->backend(), "mpi");
  const Capabilities caps = world_->capabilities();
  EXPECT_TRUE(caps.host_memory);
  EXPECT_FALSE(caps.device_memory);
  EXPECT_FALSE(caps.can_shrink);
  EXPECT_FALSE(caps.elastic);
  EXPECT_TRUE(caps.needs_launcher);
  EXPECT_FALSE(world_->aborted());
}

TEST_F(MpiTest, AllreduceEveryTypeAndOp) { checkAllreduceEveryTypeAndOp(rank_, n_, *world_); }

TEST_F(MpiTest, BroadcastAllgatherAlltoallReduceScatter) {
  checkBroadcastAllgatherAlltoallReduceScatter(rank_, n_, *world_);
}

TEST_F(MpiTest, SendRecvAroundARing) {
  if (n_ == 1) GTEST_SKIP() << "send/recv need a peer";
  checkSendRecvAroundARing(rank_, n_, *world_);
}

// Messages far above Open MPI's eager limits (rendezvous, single copy), and the f16/bf16 user
// operations through reduce-scatter.
TEST_F(MpiTest, LargeBuffersAndHalfPrecisionReduceScatter) {
  const milliseconds kWait(30'000);
  std::vector<float> big(1 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>((rank_ + i) % 5);
  ASSERT_TRUE(
      world_->allreduce(big.data(), big.size(), DataType::kF32, ReduceOp::kSum)->wait(kWait).ok());
  for (size_t i = 0; i < big.size(); i += 4099) {
    float want = 0;
    for (int r = 0; r < n_; ++r) want += static_cast<float>((r + i) % 5);
    ASSERT_EQ(big[i], want) << "element " << i;
  }

  const size_t block = 1 << 18;  // 1 MiB of i32 per rank pair
  std::vector<std::int32_t> in(block * n_), out(block * n_, -1);
  for (int j = 0; j < n_; ++j) std::fill_n(in.begin() + j * block, block, rank_ * 100 + j);
  ASSERT_TRUE(world_->alltoall(in.data(), out.data(), block, DataType::kI32)->wait(kWait).ok());
  for (int j = 0; j < n_; ++j) {
    EXPECT_EQ(out[j * block], j * 100 + rank_);
    EXPECT_EQ(out[j * block + block - 1], j * 100 + rank_);
  }

  // reduce_scatter with the f16 and bf16 user operations, avg and max.
  for (DataType t : {DataType::kF16, DataType::kBF16}) {
    for (ReduceOp op : {ReduceOp::kAvg, ReduceOp::kMax}) {
      const size_t count = 5001;
      std::vector<char> rin(count * n_ * 2), rout(count * 2);
      for (int b = 0; b < n_; ++b) {
        for (size_t i = 0; i < count; ++i) store(t, rin.data(), b * count + i, value(op, rank_, i));
      }
      ASSERT_TRUE(world_->reduceScatter(rin.data(), rout.data(), count, t, op)->wait(kWait).ok());
      for (size_t i = 0; i < count; ++i) {
        const double want = expected(t, op, n_, i);
        ASSERT_NEAR(load(t, rout.data(), i), want, tolerance(t, want))
            << dataTypeName(t) << " " << reduceOpName(op) << " element " << i;
      }
    }
  }

  if (n_ == 1) return;
  // Every rank sends 8 MiB before it receives: both are posted without waiting for each other.
  std::vector<std::int64_t> send_buf(1 << 20, rank_), recv_buf(1 << 20, -1);
  auto s = world_->send(send_buf.data(), send_buf.size(), DataType::kI64, (rank_ + 1) % n_);
  auto r = world_->recv(recv_buf.data(), recv_buf.size(), DataType::kI64, (rank_ + n_ - 1) % n_);
  ASSERT_TRUE(s->wait(kWait).ok());
  ASSERT_TRUE(r->wait(kWait).ok());
  EXPECT_EQ(recv_buf.front(), (rank_ + n_ - 1) % n_);
  EXPECT_EQ(recv_buf.back(), (rank_ + n_ - 1) % n_);
}

TEST_F(MpiTest, SplitByColorOrdersByKey) {
  // Any int is a color (MPI's must be non-negative); key -rank reverses the order in each color.
  const int color = rank_ % 2 == 0 ? -5 : 1000;
  auto sub = world_->split(color, -rank_);
  ASSERT_TRUE(sub.ok()) << sub.status().toString();
  EXPECT_EQ((*sub)->size(), rank_ % 2 == 0 ? (n_ + 1) / 2 : n_ / 2);
  EXPECT_EQ((*sub)->rank(), (n_ - 1 - rank_) / 2) << "ranks of my color above me come first";
  EXPECT_EQ((*sub)->generation(), kGeneration);
  std::int64_t x = rank_;
  ASSERT_TRUE(
      (*sub)->allreduce(&x, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(10000)).ok());
  std::int64_t want = 0;
  for (int r = rank_ % 2; r < n_; r += 2) want += r;
  EXPECT_EQ(x, want);
}

TEST_F(MpiTest, MakeGridGivesCorrectDpAndTpGroups) {
  const int tp = n_ % 2 == 0 ? 2 : n_;  // 4 ranks: 2 x 2; 2 ranks: 1 x 2; 1 or 3: one TP group
  auto grid = makeGrid(*world_, tp);
  ASSERT_TRUE(grid.ok()) << grid.status().toString();
  EXPECT_EQ(grid->tp->size(), tp);
  EXPECT_EQ(grid->dp->size(), n_ / tp);
  EXPECT_EQ(grid->tp->rank(), rank_ % tp);
  EXPECT_EQ(grid->dp->rank(), rank_ / tp);
  // TP group g holds ranks g*tp .. g*tp+tp-1; DP group j holds ranks j, j+tp, ...
  std::int64_t t = rank_, d = rank_;
  ASSERT_TRUE(
      grid->tp->allreduce(&t, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(10000)).ok());
  ASSERT_TRUE(
      grid->dp->allreduce(&d, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(10000)).ok());
  std::int64_t want_t = 0, want_d = 0;
  for (int i = 0; i < tp; ++i) want_t += (rank_ / tp) * tp + i;
  for (int j = 0; j < n_ / tp; ++j) want_d += j * tp + rank_ % tp;
  EXPECT_EQ(t, want_t);
  EXPECT_EQ(d, want_d);
  std::vector<float> g(n_ / tp);
  float mine = static_cast<float>(rank_);
  ASSERT_TRUE(
      grid->dp->allgather(&mine, g.data(), 1, DataType::kF32)->wait(milliseconds(10000)).ok());
  for (int j = 0; j < n_ / tp; ++j) EXPECT_EQ(g[j], j * tp + rank_ % tp);

  auto bad = makeGrid(*world_, n_ + 1);  // refused before any exchange, on every rank
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(bad.status().message(), "multiple")) << bad.status().message();
}

TEST_F(MpiTest, WithoutCheckCallsOperationsAndSplitStillWork) {
  auto comm = create(Milliseconds(20'000), /*check_calls=*/false);
  ASSERT_TRUE(comm.ok()) << comm.status().toString();
  std::vector<double> x(3, rank_ + 1.0);
  ASSERT_TRUE((*comm)
                  ->allreduce(x.data(), 3, DataType::kF64, ReduceOp::kAvg)
                  ->wait(milliseconds(10000))
                  .ok());
  EXPECT_DOUBLE_EQ(x[2], (n_ + 1) / 2.0);
  auto sub = (*comm)->split(0, rank_);
  ASSERT_TRUE(sub.ok()) << sub.status().toString();
  EXPECT_EQ((*sub)->rank(), rank_);
  ASSERT_TRUE((*sub)->barrier()->wait(milliseconds(10000)).ok());
}

TEST_F(MpiTest, MismatchedCountsAcrossRanksGiveAClearError) {
  if (n_ == 1) GTEST_SKIP() << "one rank cannot disagree with itself";
  const int last = n_ - 1;
  std::vector<float> buf(16, 1.0f);
  const size_t count = rank_ == last ? 12 : 10;
  const Status s = world_->allreduce(buf.data(), count, DataType::kF32, ReduceOp::kSum)
                       ->wait(milliseconds(10000));
  ASSERT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
  EXPECT_TRUE(contains(s.message(), fmt::format("rank {}: allreduce(12 x f32, sum)", last)))
      << s.message();
  EXPECT_TRUE(contains(s.message(), "rank 0: allreduce(10 x f32, sum)")) << s.message();
  EXPECT_TRUE(contains(s.message(), fmt::format("rank {} of {}, generation 7", rank_, n_)))
      << s.message();
  EXPECT_EQ(buf[0], 1.0f) << "nothing was reduced";
  // The communicator stays usable once the ranks agree again.
  ASSERT_TRUE(world_->allreduce(buf.data(), 10, DataType::kF32, ReduceOp::kSum)
                  ->wait(milliseconds(10000))
                  .ok());
  EXPECT_EQ(buf[0], static_cast<float>(n_));
  const Status op =
      (rank_ == 0 ? world_->barrier() : world_->broadcast(buf.data(), 1, DataType::kF32, 0))
          ->wait(milliseconds(10000));
  EXPECT_EQ(op.code(), StatusCode::kInvalidArgument) << "barrier against broadcast";
  EXPECT_TRUE(contains(op.message(), "rank 0: barrier")) << op.message();
  EXPECT_TRUE(contains(op.message(), "rank 1: broadcast(1 x f32, root 0)")) << op.message();
}

TEST_F(MpiTest, ARecvShorterThanItsMessageIsInvalidArgument) {
  if (n_ == 1) GTEST_SKIP() << "send/recv need a peer";
  std::vector<std::int32_t> buf(32, 5);
  if (rank_ == 0) {
    EXPECT_TRUE(world_->send(buf.data(), 32, DataType::kI32, 1)->wait(milliseconds(10000)).ok());
  } else if (rank_ == 1) {
    const Status s = world_->recv(buf.data(), 16, DataType::kI32, 0)->wait(milliseconds(10000));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.toString();
    EXPECT_TRUE(contains(s.message(), "recv(16 x i32 from rank 0)")) << s.message();
    EXPECT_TRUE(contains(s.message(), "MPI_ERR_TRUNCATE")) << s.message();
  }
}

TEST_F(MpiTest, AbortFromAnotherThreadUnblocksARecvWhoseSenderNeverSends) {
  if (n_ == 1) GTEST_SKIP() << "recv needs a peer";
  auto comm = create(Milliseconds(20'000), /*check_calls=*/true);
  ASSERT_TRUE(comm.ok()) << comm.status().toString();
  if (rank_ != 0) return;  // rank 1 never sends
  std::vector<float> buf(16);
  auto work = (*comm)->recv(buf.data(), buf.size(), DataType::kF32, 1);
  std::this_thread::sleep_for(milliseconds(200));
  EXPECT_FALSE(work->done());
  const auto t0 = steady_clock::now();
  std::vector<std::thread> aborters;  // idempotent, from any thread: the first reason stays
  aborters.emplace_back([&] { (*comm)->abort("test: generation moved"); });
  for (int i = 0; i < 3; ++i) {
    aborters.emplace_back([&] {
      std::this_thread::sleep_for(milliseconds(5));
      (*comm)->abort("a later reason");
    });
  }
  const Status s = work->wait(milliseconds(5000));
  EXPECT_LT(steady_clock::now() - t0, milliseconds(500));
  for (auto& t : aborters) t.join();
  EXPECT_EQ(s.code(), StatusCode::kAborted) << s.toString();
  EXPECT_TRUE(contains(s.message(), fmt::format("rank 0 of {}, generation 7", n_))) << s.message();
  EXPECT_TRUE(contains(s.message(), "recv(16 x f32 from rank 1)")) << s.message();
  EXPECT_TRUE(contains(s.message(), "generation moved")) << s.message();
  // Later calls fail at once, with the same distinct error.
  const auto t1 = steady_clock::now();
  const Status later = (*comm)
                           ->allreduce(buf.data(), buf.size(), DataType::kF32, ReduceOp::kSum)
                           ->wait(milliseconds(100));
  EXPECT_LT(steady_clock::now() - t1, milliseconds(50));
  EXPECT_EQ(later.code(), StatusCode::kAborted) << later.toString();
  EXPECT_TRUE(contains(later.message(), "generation moved")) << later.message();
  EXPECT_TRUE((*comm)->aborted());
}

TEST_F(MpiTest, AbortFromAnotherThreadUnblocksABarrierTheOthersJoinLate) {
  if (n_ == 1) GTEST_SKIP() << "a barrier of one rank does not wait";
  // Without check_calls the abandoned request is the barrier itself, which MPI still completes
  // when the others join (rank 0 keeps calling MPI in TearDown's barrier).
  auto comm = create(Milliseconds(20'000), /*check_calls=*/false);
  ASSERT_TRUE(comm.ok()) << comm.status().toString();
  if (rank_ == 0) {
    auto work = (*comm)->barrier();
    std::this_thread::sleep_for(milliseconds(200));
    EXPECT_FALSE(work->done()) << "the others join after a second";
    const auto t0 = steady_clock::now();
    std::thread([&] { (*comm)->abort("test: job is stopping"); }).join();
    const Status s = work->wait(milliseconds(5000));
    EXPECT_LT(steady_clock::now() - t0, milliseconds(500));
    EXPECT_EQ(s.code(), StatusCode::kAborted) << s.toString();
    EXPECT_TRUE(contains(s.message(), "barrier on rank 0")) << s.message();
    EXPECT_TRUE(contains(s.message(), "job is stopping")) << s.message();
  } else {
    std::this_thread::sleep_for(milliseconds(1000));
    const Status s = (*comm)->barrier()->wait(milliseconds(20000));
    EXPECT_TRUE(s.ok()) << s.toString();
  }
}

TEST_F(MpiTest, AbortBeforeAnOperationFailsItAtOnce) {
  auto comm = create(Milliseconds(20'000), /*check_calls=*/true);
  ASSERT_TRUE(comm.ok()) << comm.status().toString();
  (*comm)->abort("test: before anything");
  float x = 1;
  const auto t0 = steady_clock::now();
  const Status s = (*comm)->broadcast(&x, 1, DataType::kF32, 0)->wait(milliseconds(1000));
  EXPECT_LT(steady_clock::now() - t0, milliseconds(50));
  EXPECT_EQ(s.code(), StatusCode::kAborted) << s.toString();
  EXPECT_TRUE(contains(s.message(), "broadcast(1 x f32, root 0)")) << s.message();
  EXPECT_TRUE(contains(s.message(), "before anything")) << s.message();
  auto sub = (*comm)->split(0, 0);
  EXPECT_EQ(sub.status().code(), StatusCode::kAborted) << sub.status().toString();
}

TEST_F(MpiTest, AnOperationPastOpTimeoutFailsWithTimeoutAndAbortsTheCommunicator) {
  if (n_ == 1) GTEST_SKIP() << "a barrier of one rank does not wait";
  // Rank 0 gives up after 300 ms; the others join after a second and complete normally.
  auto comm = create(Milliseconds(rank_ == 0 ? 300 : 20'000), /*check_calls=*/false);
  ASSERT_TRUE(comm.ok()) << comm.status().toString();
  if (rank_ == 0) {
    const auto t0 = steady_clock::now();
    const Status s = (*comm)->barrier()->wait(milliseconds(10000));
    const auto took = steady_clock::now() - t0;
    EXPECT_GE(took, milliseconds(300));
    EXPECT_LT(took, milliseconds(3000)) << "op_timeout is 300 ms, not the Work's 10 s";
    EXPECT_EQ(s.code(), StatusCode::kTimeout) << s.toString();
    EXPECT_TRUE(contains(s.message(), "barrier on rank 0")) << s.message();
    EXPECT_TRUE(contains(s.message(), "300ms")) << s.message();
    EXPECT_TRUE(contains(s.message(), "op_timeout")) << s.message();
    EXPECT_TRUE((*comm)->aborted());
    float x = 0;
    const Status later =
        (*comm)->allreduce(&x, 1, DataType::kF32, ReduceOp::kSum)->wait(milliseconds(100));
    EXPECT_EQ(later.code(), StatusCode::kAborted) << later.toString();
    EXPECT_TRUE(contains(later.message(), "barrier timed out after 300ms")) << later.message();
  } else {
    std::this_thread::sleep_for(milliseconds(1000));
    const Status s = (*comm)->barrier()->wait(milliseconds(20000));
    EXPECT_TRUE(s.ok()) << s.toString();
  }
}

TEST_F(MpiTest, ShrinkIsUnimplementedAndSaysWhatToUseInstead) {
  auto shrunk = world_->shrink({});
  ASSERT_EQ(shrunk.status().code(), StatusCode::kUnimplemented) << shrunk.status().toString();
  const std::string& m = shrunk.status().message();
  EXPECT_TRUE(contains(m, "ULFM")) << m;
  EXPECT_TRUE(contains(m, "gloo")) << m;
  EXPECT_TRUE(contains(m, "nccl")) << m;
  EXPECT_TRUE(contains(m, fmt::format("rank {} of {}", rank_, n_))) << m;
}

TEST_F(MpiTest, ARankOrSizeOtherThanMpisIsInvalidArgument) {
  CommunicatorOptions options;
  options.rank = -1;
  options.size = n_ + 1;
  auto c = createMpiCommunicator(options);
  ASSERT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().toString();
  EXPECT_TRUE(contains(c.status().message(), fmt::format("options.size is {}", n_ + 1)))
      << c.status().message();
  EXPECT_TRUE(contains(c.status().message(), fmt::format("has {} processes", n_)))
      << c.status().message();

  options.size = 0;
  options.rank = rank_ + 1;
  c = createMpiCommunicator(options);
  ASSERT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().toString();
  EXPECT_TRUE(contains(c.status().message(), fmt::format("options.rank is {}", rank_ + 1)))
      << c.status().message();
  EXPECT_TRUE(contains(c.status().message(), fmt::format("this process is rank {}", rank_)))
      << c.status().message();

  options.rank = -1;  // -1 and 0 take MPI's (collective: every rank gets here)
  c = createMpiCommunicator(options);
  ASSERT_TRUE(c.ok()) << c.status().toString();
  EXPECT_EQ((*c)->rank(), rank_);
  EXPECT_EQ((*c)->size(), n_);
}

TEST_F(MpiTest, BadArgumentsAreRefusedAtOnceWithReasons) {
  float x = 0;
  const Status root = world_->broadcast(&x, 1, DataType::kF32, n_)->wait(milliseconds(100));
  EXPECT_EQ(root.code(), StatusCode::kInvalidArgument) << root.toString();
  EXPECT_TRUE(contains(root.message(), fmt::format("root {} is not a rank of {}", n_, n_)))
      << root.message();
  const Status self = world_->send(&x, 1, DataType::kF32, rank_)->wait(milliseconds(100));
  EXPECT_EQ(self.code(), StatusCode::kInvalidArgument) << self.toString();
  EXPECT_TRUE(contains(self.message(), "is not another rank")) << self.message();
  const Status negative = world_->recv(&x, 1, DataType::kF32, -1)->wait(milliseconds(100));
  EXPECT_EQ(negative.code(), StatusCode::kInvalidArgument) << negative.toString();
  const size_t too_many = static_cast<size_t>(INT32_MAX) + 1;
  const Status huge =
      world_->allreduce(&x, too_many, DataType::kF32, ReduceOp::kSum)->wait(milliseconds(100));
  EXPECT_EQ(huge.code(), StatusCode::kInvalidArgument) << huge.toString();
  EXPECT_TRUE(contains(huge.message(), "at most 2147483647 elements")) << huge.message();
}

}  // namespace
}  // namespace rally::collectives
