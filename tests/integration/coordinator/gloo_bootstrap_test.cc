// Gloo communicators bootstrapped through the coordinator's generation-scoped store: ranks of a
// formed round build a communicator and allreduce; when the generation moves, the old generation's
// bootstrap keys are gone and a bootstrap still waiting on them ends at once (Aborted).
#include <thread>

#include "collectives/gloo/gloo_communicator.h"
#include "runtime/rendezvous/coordinator_bootstrap_store.h"
#include "tests/integration/coordinator/coordinator_fixture.h"

namespace rally::testing {
namespace {

using std::chrono::milliseconds;

class GlooBootstrapTest : public CoordinatorFixture {};

TEST_F(GlooBootstrapTest, RanksOfARoundBuildACommunicatorThroughTheStore) {
  auto a = join("a");
  auto b = join("b");
  for (auto* s : {a.get(), b.get()})
    ASSERT_TRUE(s->waitFor(isRoundFormed, milliseconds(5000)).ok());
  const std::uint64_t gen = server_->service().stats().generation;
  std::vector<std::thread> ranks;
  std::vector<float> results(2);
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      rendezvous::CoordinatorBootstrapStore boot(
          rendezvous::StoreClient(connect(kToken, true)).scoped("comm/", gen));
      auto comm = collectives::createGlooCommunicator(
          boot, {.rank = r, .size = 2, .generation = gen, .connect_timeout = Milliseconds(10000)});
      ASSERT_TRUE(comm.ok()) << comm.status().toString();
      float x = static_cast<float>(r + 1);
      ASSERT_TRUE((*comm)
                      ->allreduce(&x, 1, collectives::DataType::kF32, collectives::ReduceOp::kSum)
                      ->wait(milliseconds(10000))
                      .ok());
      results[r] = x;
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_EQ(results, (std::vector<float>{3.0f, 3.0f}));
  auto keys = rendezvous::StoreClient(connect()).scoped("comm/", gen).list();
  ASSERT_TRUE(keys.ok());
  EXPECT_FALSE(keys->empty()) << "the bootstrap data is in the generation's scope";
}

TEST_F(GlooBootstrapTest, BootstrapWaitingOnADeadGenerationEndsAtOnce) {
  auto a = join("a");
  auto b = join("b");
  for (auto* s : {a.get(), b.get()})
    ASSERT_TRUE(s->waitFor(isRoundFormed, milliseconds(5000)).ok());
  const std::uint64_t gen = server_->service().stats().generation;
  Status status;
  std::thread lonely([&] {
    rendezvous::CoordinatorBootstrapStore boot(
        rendezvous::StoreClient(connect(kToken, true)).scoped("comm/", gen));
    // Rank 0 of 2 whose peer never comes: it waits for rank 1's address.
    status =
        collectives::createGlooCommunicator(
            boot, {.rank = 0, .size = 2, .generation = gen, .connect_timeout = Milliseconds(20000)})
            .status();
  });
  std::this_thread::sleep_for(milliseconds(300));
  const auto t0 = std::chrono::steady_clock::now();
  b->cancel();  // a member dies: the generation moves
  lonely.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(3000))
      << "the bootstrap ended when its generation did, not at its 20 s timeout";
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("ended"), std::string::npos) << status.toString();
}

}  // namespace
}  // namespace rally::testing
