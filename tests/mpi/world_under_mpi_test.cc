// rally::init() under mpirun (run with 2 processes): the World takes its rank and size from MPI,
// its placement from Open MPI's local rank and size, builds an MPI communicator (the backend
// "auto" would pick gloo, which needs a store; under MPI it is "mpi" unless RALLY_BACKEND says
// otherwise), cannot re-form in place, and ElasticState::sync works over it.
#include <gtest/gtest.h>

#include <cstdlib>

#include "runtime/elastic/elastic_state.h"
#include "runtime/world/world.h"

namespace rally {
namespace {

TEST(WorldUnderMpi, TakesRankAndSizeFromMpiAndItsCommunicatorWorks) {
  ASSERT_NE(std::getenv("OMPI_COMM_WORLD_SIZE"), nullptr) << "run this under mpirun";
  auto world = init({.op_timeout = Milliseconds(20'000)});
  ASSERT_TRUE(world.ok()) << world.status().toString();
  World& w = **world;
  EXPECT_EQ(w.launcher(), Launcher::kMpi);
  EXPECT_EQ(w.size(), std::atoi(std::getenv("OMPI_COMM_WORLD_SIZE")));
  EXPECT_EQ(w.rank(), std::atoi(std::getenv("OMPI_COMM_WORLD_RANK")));
  EXPECT_EQ(w.localRank(), std::atoi(std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")));
  EXPECT_EQ(w.numNodes(), 1);  // mpirun on one host
  EXPECT_NE(w.describe().find("backend mpi"), std::string::npos) << w.describe();
  EXPECT_FALSE(w.canRecoverInPlace());
  EXPECT_EQ(w.recover(Milliseconds(10)).code(), StatusCode::kFailedPrecondition);

  double x = w.rank() + 1.0;
  ASSERT_TRUE(w.comm()
                  .allreduce(&x, 1, DataType::kF64, collectives::ReduceOp::kSum)
                  ->wait(Milliseconds(20'000))
                  .ok());
  EXPECT_EQ(x, w.size() * (w.size() + 1) / 2.0);

  // Every rank starts from rank 0's values.
  std::vector<float> weights(5, static_cast<float>(w.rank() * 10));
  ElasticState state;
  ASSERT_TRUE(state.registerBuffer("w", weights.data(), DataType::kF32, {5}).ok());
  auto synced = state.sync(w.comm());
  ASSERT_TRUE(synced.ok()) << synced.status().toString();
  EXPECT_EQ(weights, std::vector<float>(5, 0.0f));
}

}  // namespace
}  // namespace rally
