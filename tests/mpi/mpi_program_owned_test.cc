// The MPI backend in a program that initialised MPI itself, at MPI_THREAD_SERIALIZED (as some
// frameworks do), run under mpirun with 2 ranks: the backend serialises its MPI calls behind one
// lock, so communicators with their own executor threads work side by side; and it leaves MPI to
// the program, which can still use MPI once the communicators are gone and finalizes it itself.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <thread>
#include <vector>

#include "collectives/mpi/mpi_communicator.h"
#include "tests/unit/collectives/collective_checks.h"

// The C API only (see collectives/mpi/mpi_communicator.cc).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

namespace rally::collectives {
namespace {

using namespace test_support;  // NOLINT(google-build-using-namespace)

int g_provided = -1;  // the thread level main() got

Result<std::unique_ptr<Communicator>> createWorld() {
  RALLY_ASSIGN_OR_RETURN(CommunicatorOptions options, mpiWorldOptions());
  options.op_timeout = Milliseconds(20'000);
  return createMpiCommunicator(options);
}

TEST(MpiProgramOwnedTest, MpiGaveTheSerializedLevelTheProgramAskedFor) {
  EXPECT_EQ(g_provided, MPI_THREAD_SERIALIZED);
}

TEST(MpiProgramOwnedTest, EveryOperationWorksUnderSerialized) {
  auto world = createWorld();
  ASSERT_TRUE(world.ok()) << world.status().toString();
  const int rank = (*world)->rank(), n = (*world)->size();
  checkAllreduceEveryTypeAndOp(rank, n, **world);
  checkBroadcastAllgatherAlltoallReduceScatter(rank, n, **world);
  if (n > 1) checkSendRecvAroundARing(rank, n, **world);
}

TEST(MpiProgramOwnedTest, CommunicatorsRunSideBySideFromTwoThreads) {
  auto first = createWorld();
  ASSERT_TRUE(first.ok()) << first.status().toString();
  auto second = createWorld();
  ASSERT_TRUE(second.ok()) << second.status().toString();
  const int n = (*first)->size();
  // Two threads, each driving its own communicator (and so its own executor thread) at once.
  auto hammer = [n](Communicator& comm, int offset) {
    for (int i = 0; i < 200; ++i) {
      std::int64_t x = comm.rank() + offset + i;
      ASSERT_TRUE(
          comm.allreduce(&x, 1, DataType::kI64, ReduceOp::kSum)->wait(milliseconds(20000)).ok());
      ASSERT_EQ(x, n * (n - 1) / 2 + n * (offset + i)) << "round " << i;
    }
  };
  std::thread a([&] { hammer(**first, 0); });
  std::thread b([&] { hammer(**second, 1000); });
  a.join();
  b.join();
}

}  // namespace
}  // namespace rally::collectives

int main(int argc, char** argv) {
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &rally::collectives::g_provided);
  ::testing::InitGoogleTest(&argc, argv);
  int result = RUN_ALL_TESTS();
  // Every communicator is gone; MPI is still the program's to use and to finalize.
  int finalized = 1;
  MPI_Finalized(&finalized);
  int one = 1, ranks = 0;
  if (finalized ||
      MPI_Allreduce(&one, &ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS) {
    std::fprintf(stderr, "FAILED: MPI is not usable after the communicators are gone\n");
    result = 1;
  }
  if (MPI_Finalize() != MPI_SUCCESS) {
    std::fprintf(stderr, "FAILED: the program's MPI_Finalize failed\n");
    result = 1;
  }
  return result;
}
