// The backend registry: every backend listed with its capabilities and, when it cannot run here,
// why; "auto" picks by capability; unknown names and misfits are refused with reasons.
#include "collectives/registry.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "rally/config.h"
#include "tests/unit/collectives/collective_checks.h"

namespace rally::collectives {
namespace {

const BackendInfo* find(const std::vector<BackendInfo>& all, const std::string& name) {
  for (const auto& b : all) {
    if (b.name == name) return &b;
  }
  return nullptr;
}

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // As a process not started by an MPI launcher.
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) ::unsetenv(v);
  }
};

TEST_F(RegistryTest, ListsEveryBackendWithItsCapabilitiesAndWhyNot) {
  const auto all = listBackends();
  ASSERT_EQ(all.size(), 3u);
  const auto* gloo = find(all, "gloo");
  const auto* nccl = find(all, "nccl");
  const auto* mpi = find(all, "mpi");
  ASSERT_TRUE(gloo && nccl && mpi);
  EXPECT_TRUE(gloo->capabilities.host_memory);
  EXPECT_TRUE(gloo->capabilities.can_shrink);
  EXPECT_TRUE(nccl->capabilities.device_memory);
  EXPECT_FALSE(nccl->capabilities.host_memory);
  EXPECT_FALSE(mpi->capabilities.can_shrink);
  EXPECT_TRUE(mpi->capabilities.needs_launcher);
  EXPECT_EQ(gloo->available, RALLY_HAVE_GLOO == 1);
  EXPECT_FALSE(mpi->available) << "not started by mpirun";
  EXPECT_NE(mpi->unavailable_because.find("mpirun"), std::string::npos) << mpi->unavailable_because;
  for (const auto& b : all) {
    EXPECT_EQ(b.available, b.unavailable_because.empty())
        << b.name << ": " << b.unavailable_because;
  }
}

TEST_F(RegistryTest, AutoChoosesByCapability) {
  const auto all = listBackends();
  if (find(all, "gloo")->available) {
    EXPECT_EQ(chooseBackend("auto").value(), "gloo");
    EXPECT_EQ(chooseBackend("auto", {.can_shrink = true, .elastic = true}).value(), "gloo");
  }
  auto device = chooseBackend("auto", {.device_memory = true});
  if (find(all, "nccl")->available) {
    EXPECT_EQ(device.value(), "nccl");
  } else {
    ASSERT_EQ(device.status().code(), StatusCode::kUnavailable);
    // The refusal names every backend and why it does not fit.
    for (const char* name : {"nccl:", "gloo: no device memory", "mpi:"}) {
      EXPECT_NE(device.status().message().find(name), std::string::npos)
          << device.status().message();
    }
  }
}

TEST_F(RegistryTest, NamesAreCheckedAgainstWhatTheJobNeeds) {
  EXPECT_EQ(chooseBackend("gloo-tcp").status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(chooseBackend("gloo-tcp").status().message().find("use gloo, nccl, mpi or auto"),
            std::string::npos);
  EXPECT_EQ(chooseBackend("mpi").status().code(), StatusCode::kUnavailable);
  if (RALLY_HAVE_GLOO) {
    const auto s = chooseBackend("gloo", {.device_memory = true}).status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("no device memory"), std::string::npos) << s.message();
  }
}

TEST_F(RegistryTest, CreatesTheChosenBackend) {
  if (!RALLY_HAVE_GLOO) GTEST_SKIP() << "built without Gloo";
  test_support::MemoryStore store;
  auto comm = createCommunicator("auto", store, {.rank = 0, .size = 1});
  ASSERT_TRUE(comm.ok()) << comm.status().toString();
  EXPECT_EQ((*comm)->backend(), "gloo");
  EXPECT_TRUE((*comm)->capabilities().can_shrink);
  std::int64_t x = 5;
  ASSERT_TRUE(
      (*comm)->allreduce(&x, 1, DataType::kI64, ReduceOp::kSum)->wait(Milliseconds(5000)).ok());
  EXPECT_EQ(x, 5);
  EXPECT_EQ(createCommunicator("mpi", store, {}).status().code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace rally::collectives
