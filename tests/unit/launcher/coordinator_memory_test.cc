// A host's memory of where its job's coordinator is: kept per job in a directory of the user's
// alone, replaced whole, read back in order without repeats, forgotten when the job ends; a bad
// directory or job id is refused with what was wrong.
#include "launcher/agent/coordinator_memory.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace rally::agent {
namespace {

class CoordinatorMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("memory-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(CoordinatorMemoryTest, RemembersInOrderWithoutRepeatsAndForgets) {
  auto m = CoordinatorMemory::open((dir_ / "state").string(), "job/7 a");
  ASSERT_TRUE(m.ok()) << m.status().toString();
  EXPECT_TRUE(m->recall().empty()) << "nothing remembered yet";
  ASSERT_TRUE(
      m->remember({"10.0.0.1:29400", "", "10.0.0.2:29400", "10.0.0.1:29400", "[fd00::3]:29400"})
          .ok());
  EXPECT_EQ(m->recall(),
            (std::vector<std::string>{"10.0.0.1:29400", "10.0.0.2:29400", "[fd00::3]:29400"}));
  // Replaced whole by the next round's.
  ASSERT_TRUE(m->remember({"10.0.0.2:29400", "10.0.0.4:29400"}).ok());
  EXPECT_EQ(m->recall(), (std::vector<std::string>{"10.0.0.2:29400", "10.0.0.4:29400"}));
  // Another job's memory is its own; the same job's, opened again (an agent started again), is
  // this one.
  auto other = CoordinatorMemory::open((dir_ / "state").string(), "job-8");
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->path(), m->path());
  EXPECT_TRUE(other->recall().empty());
  auto again = CoordinatorMemory::open((dir_ / "state").string(), "job/7 a");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->recall().size(), 2u);
  // The directory is the user's alone: others must not steer an agent to their coordinator.
  struct stat st {};
  ASSERT_EQ(::stat((dir_ / "state").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  m->forget();
  EXPECT_TRUE(again->recall().empty());
  EXPECT_FALSE(std::filesystem::exists(m->path()));
  m->forget();  // twice: nothing to do
}

TEST_F(CoordinatorMemoryTest, BadInputIsRefusedWithWhatWasWrong) {
  auto no_id = CoordinatorMemory::open(dir_.string(), "");
  ASSERT_FALSE(no_id.ok());
  EXPECT_EQ(no_id.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(no_id.status().message().find("job id"), std::string::npos);
  // A file where the directory should be.
  std::filesystem::create_directories(dir_);
  std::ofstream(dir_ / "file") << "x";
  auto bad = CoordinatorMemory::open((dir_ / "file" / "state").string(), "job");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--state-dir"), std::string::npos)
      << bad.status().message();
  EXPECT_NE(bad.status().message().find((dir_ / "file" / "state").string()), std::string::npos)
      << bad.status().message();
}

TEST_F(CoordinatorMemoryTest, TheDefaultIsInTheTemporaryDirectory) {
  auto m = CoordinatorMemory::open("", "default-dir-test-" + std::to_string(::getpid()));
  ASSERT_TRUE(m.ok()) << m.status().toString();
  EXPECT_EQ(std::filesystem::path(m->path()).parent_path().filename().string(),
            "rally-" + std::to_string(::getuid()));
  ASSERT_TRUE(m->remember({"127.0.0.1:1"}).ok());
  m->forget();
}

}  // namespace
}  // namespace rally::agent
