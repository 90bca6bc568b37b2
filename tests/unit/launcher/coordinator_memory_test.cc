// A host's memory of where its job's coordinator is: kept per job in a directory of the user's
// alone, replaced whole, read back in order without repeats, another job of the same id kept
// apart, forgotten when the job ends; a directory others could write, or a bad job id, is refused
// with what was wrong, and nothing is changed.
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
  static unsigned modeOf(const std::filesystem::path& p) {
    struct stat st {};
    EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
    return st.st_mode & 07777;
  }
  std::filesystem::path dir_;
};

TEST_F(CoordinatorMemoryTest, RemembersInOrderWithoutRepeatsAndForgets) {
  const std::string state = (dir_ / "state").string();
  auto m = CoordinatorMemory::open(state, "job/7 a", "node0:29400\ntoken-1");
  ASSERT_TRUE(m.ok()) << m.status().toString();
  EXPECT_EQ(modeOf(state), 0700u) << "made for this user alone";
  EXPECT_TRUE(m->recall().empty()) << "nothing remembered yet";
  ASSERT_TRUE(
      m->remember({"10.0.0.1:29400", "", "10.0.0.2:29400", "10.0.0.1:29400", "[fd00::3]:29400"})
          .ok());
  EXPECT_EQ(m->recall(),
            (std::vector<std::string>{"10.0.0.1:29400", "10.0.0.2:29400", "[fd00::3]:29400"}));
  // Replaced whole by the next round's.
  ASSERT_TRUE(m->remember({"10.0.0.2:29400", "10.0.0.4:29400"}).ok());
  EXPECT_EQ(m->recall(), (std::vector<std::string>{"10.0.0.2:29400", "10.0.0.4:29400"}));
  // The same job opened again (an agent started again) recalls it; the token is not written.
  auto again = CoordinatorMemory::open(state, "job/7 a", "node0:29400\ntoken-1");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->recall().size(), 2u);
  std::ifstream file(m->path());
  const std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text.find("token-1"), std::string::npos) << text;
  // Another job's memory is its own: another id, or the same id at another address or token.
  auto other_id = CoordinatorMemory::open(state, "job-8", "node0:29400\ntoken-1");
  ASSERT_TRUE(other_id.ok());
  EXPECT_NE(other_id->path(), m->path());
  EXPECT_TRUE(other_id->recall().empty());
  auto other_job = CoordinatorMemory::open(state, "job/7 a", "node9:29500\ntoken-2");
  ASSERT_TRUE(other_job.ok());
  EXPECT_TRUE(other_job->recall().empty()) << "the same id, another job";
  EXPECT_NE(other_job->path(), m->path()) << "each keeps a file of its own";
  ASSERT_TRUE(other_job->remember({"10.0.0.9:29500"}).ok());
  EXPECT_EQ(m->recall().size(), 2u) << "another job's round does not overwrite this one's";
  other_job->forget();
  EXPECT_EQ(m->recall().size(), 2u) << "another job's end forgets nothing of this one";
  m->forget();
  EXPECT_TRUE(again->recall().empty());
  EXPECT_FALSE(std::filesystem::exists(m->path()));
  m->forget();  // twice: nothing to do
  // The directory removed while the job runs (a cleanup of /var/tmp): made again, 0700, at the
  // next round.
  std::filesystem::remove_all(state);
  ASSERT_TRUE(m->remember({"10.0.0.5:29400"}).ok());
  EXPECT_EQ(modeOf(state), 0700u);
  EXPECT_EQ(again->recall(), (std::vector<std::string>{"10.0.0.5:29400"}));
}

TEST_F(CoordinatorMemoryTest, AReaderMakesNoDirectory) {
  const auto state = dir_ / "never-made";
  auto m = CoordinatorMemory::open(state.string(), "job", "k", /*create=*/false);
  ASSERT_TRUE(m.ok()) << m.status().toString();
  EXPECT_TRUE(m->recall().empty());
  EXPECT_FALSE(std::filesystem::exists(state));
}

TEST_F(CoordinatorMemoryTest, ADirectoryOthersCouldWriteOrBadInputIsRefused) {
  auto no_id = CoordinatorMemory::open(dir_.string(), "", "k");
  ASSERT_FALSE(no_id.ok());
  EXPECT_EQ(no_id.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(no_id.status().message().find("job id"), std::string::npos);
  // A file where the directory should be.
  std::filesystem::create_directories(dir_);
  std::ofstream(dir_ / "file") << "x";
  auto file = CoordinatorMemory::open((dir_ / "file").string(), "job", "k");
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("--state-dir"), std::string::npos);
  EXPECT_NE(file.status().message().find("not a directory"), std::string::npos)
      << file.status().message();
  auto under_file = CoordinatorMemory::open((dir_ / "file" / "state").string(), "job", "k");
  ASSERT_FALSE(under_file.ok());
  EXPECT_NE(under_file.status().message().find((dir_ / "file" / "state").string()),
            std::string::npos)
      << under_file.status().message();
  // A directory others may write: refused, and left as it was (never chmod-ed).
  const auto shared = dir_ / "shared";
  std::filesystem::create_directories(shared);
  ::chmod(shared.c_str(), 0777);
  auto open_to_all = CoordinatorMemory::open(shared.string(), "job", "k");
  ASSERT_FALSE(open_to_all.ok());
  EXPECT_NE(open_to_all.status().message().find("others may write"), std::string::npos)
      << open_to_all.status().message();
  EXPECT_EQ(modeOf(shared), 0777u);
  // A link to a directory: refused too.
  std::filesystem::create_directory_symlink(dir_ / "shared", dir_ / "link");
  EXPECT_FALSE(CoordinatorMemory::open((dir_ / "link").string(), "job", "k").ok());
  // One of this user's that others may read: used as it is.
  const auto readable = dir_ / "readable";
  std::filesystem::create_directories(readable);
  ::chmod(readable.c_str(), 0755);
  EXPECT_TRUE(CoordinatorMemory::open(readable.string(), "job", "k").ok());
  EXPECT_EQ(modeOf(readable), 0755u);
}

TEST_F(CoordinatorMemoryTest, TheDefaultIsKeptAcrossReboots) {
  auto m = CoordinatorMemory::open("", "default-dir-test-" + std::to_string(::getpid()), "k");
  ASSERT_TRUE(m.ok()) << m.status().toString();
  const auto dir = std::filesystem::path(m->path()).parent_path();
  EXPECT_EQ(dir.filename().string(), "rally-" + std::to_string(::getuid()));
  if (std::filesystem::is_directory("/var/tmp") && ::access("/var/tmp", W_OK) == 0) {
    EXPECT_EQ(dir.parent_path(), "/var/tmp");
  }
  ASSERT_TRUE(m->remember({"127.0.0.1:1"}).ok());
  m->forget();
}

}  // namespace
}  // namespace rally::agent
