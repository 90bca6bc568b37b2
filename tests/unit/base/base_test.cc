// Status/Result propagation with context, unit parsing, the tunables registry, and the crash
// report.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "kernels/base/logging.h"
#include "kernels/base/status.h"
#include "kernels/base/telemetry_files.h"
#include "kernels/base/tunables.h"
#include "kernels/base/units.h"

namespace rally {
namespace {

Status failing() { return timeoutError("waiting for keys [a]"); }
Status wrapper(int x) {
  RALLY_RETURN_IF_ERROR(failing()) << "while bootstrapping rank " << x;
  return okStatus();
}
Result<int> half(int x) {
  if (x % 2 != 0) return invalidArgument("odd");
  return x / 2;
}
Result<int> quarter(int x) {
  RALLY_ASSIGN_OR_RETURN(int h, half(x));
  RALLY_ASSIGN_OR_RETURN(h, half(h));
  return h;
}

TEST(StatusTest, ReturnIfErrorAddsContext) {
  const Status s = wrapper(3);
  EXPECT_EQ(s.code(), StatusCode::kTimeout);
  EXPECT_EQ(s.message(), "waiting for keys [a]: while bootstrapping rank 3");
  EXPECT_EQ(s.toString(), "Timeout: waiting for keys [a]: while bootstrapping rank 3");
}

TEST(StatusTest, AssignOrReturn) {
  EXPECT_EQ(*quarter(8), 2);
  EXPECT_EQ(quarter(6).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(quarter(7).status().message(), "odd");
}

TEST(StatusTest, ResultFromOkStatusIsAnInternalError) {
  Result<int> r{okStatus()};
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

TEST(UnitsTest, Durations) {
  EXPECT_EQ(*parseDuration("250ms"), Milliseconds(250));
  EXPECT_EQ(*parseDuration("2"), Milliseconds(2000)) << "bare numbers are seconds, as in torchrun";
  EXPECT_EQ(*parseDuration("1.5s"), Milliseconds(1500));
  EXPECT_EQ(*parseDuration("2m"), Milliseconds(120000));
  EXPECT_EQ(*parseDuration(" 1h "), Milliseconds(3600000));
  EXPECT_EQ(parseDuration("fast").status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(parseDuration("3 weeks").status().message().find("unknown duration unit"),
            std::string::npos);
  EXPECT_EQ(formatDuration(Milliseconds(1500)), "1500ms");
  EXPECT_EQ(formatDuration(Milliseconds(2000)), "2s");
  EXPECT_EQ(formatDuration(Milliseconds(600000)), "10m");
}

TEST(UnitsTest, Bytes) {
  EXPECT_EQ(*parseBytes("4MiB"), 4 << 20);
  EXPECT_EQ(*parseBytes("1KB"), 1000);
  EXPECT_EQ(*parseBytes("17"), 17);
  EXPECT_EQ(parseBytes("4XB").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(formatBytes(1 << 20), "1MiB");
  EXPECT_EQ(*parseInteger("-12"), -12);
  EXPECT_FALSE(parseInteger("12x").ok());
}

TEST(TunablesTest, EnvironmentOverridesDefaultsAndBadValuesNameTheVariable) {
  ::setenv("RALLY_LAST_CALL", "750ms", 1);
  auto t = Tunables::fromEnvironment();
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t->duration("last_call"), Milliseconds(750));
  EXPECT_EQ(*t->duration("heartbeat_interval"), Milliseconds(1000));
  ::setenv("RALLY_LAST_CALL", "soon", 1);
  auto bad = Tunables::fromEnvironment();
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("RALLY_LAST_CALL"), std::string::npos);
  EXPECT_NE(bad.status().message().find("soon"), std::string::npos);
  ::unsetenv("RALLY_LAST_CALL");
}

TEST(TunablesTest, SetAndPrint) {
  Tunables t = Tunables::defaults();
  ASSERT_TRUE(t.set("max_keys", "10", "--max-keys").ok());
  EXPECT_EQ(*t.integer("max_keys"), 10);
  EXPECT_EQ(t.set("max_keys", "many", "--max-keys").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t.set("no_such", "1", "x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t.duration("max_keys").status().code(), StatusCode::kInternal)
      << "reading a tunable as the wrong kind is a bug";
  std::ostringstream out;
  t.print(out);
  EXPECT_NE(out.str().find("max_keys             10"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("--max-keys"), std::string::npos);
  EXPECT_NE(out.str().find("RALLY_HEARTBEAT_INTERVAL"), std::string::npos);
}

}  // namespace
TEST(TelemetryFilesTest, PrometheusLabelsAreEscapedAndSorted) {
  EXPECT_EQ(prometheusLabels({}), "");
  EXPECT_EQ(prometheusLabels({{"node", "n\"1\\x\ny"}, {"a", "b"}}),
            "{a=\"b\",node=\"n\\\"1\\\\x\\ny\"}");
}

TEST(TelemetryFilesTest, AFileIsReplacedWholeAndItsDirectoryMade) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("rally-tf-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  const std::string path = (dir / "sub" / "m.prom").string();
  ASSERT_TRUE(writeFileReplacing(path, "one\n").ok());
  ASSERT_TRUE(writeFileReplacing(path, "two\n").ok());
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), "two\n");
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir / "sub")) ++files;
  EXPECT_EQ(files, 1u);  // no temporary file left behind
  const Status bad = writeFileReplacing("/proc/no/such/file", "x");
  EXPECT_EQ(bad.code(), StatusCode::kIo);
  EXPECT_NE(bad.message().find("/proc/no"), std::string::npos) << bad.toString();
  std::filesystem::remove_all(dir);
}

TEST(UnitsTest, ElapsedTimesForPeople) {
  EXPECT_EQ(formatElapsed(-5), "0 us");
  EXPECT_EQ(formatElapsed(850), "850 us");
  EXPECT_EQ(formatElapsed(3149), "3.1 ms");
  EXPECT_EQ(formatElapsed(2'049'000), "2.0 s");
}

TEST(TelemetryFilesTest, PrometheusHeaderLines) {
  EXPECT_EQ(prometheusHeader("rally_x_total", "counter", "What x counts."),
            "# HELP rally_x_total What x counts.\n# TYPE rally_x_total counter\n");
}

TEST(TelemetryFilesTest, NodeIdsBecomeSafeFileNameParts) {
  EXPECT_EQ(fileNameSafe("host-1.example_2"), "host-1.example_2");
  EXPECT_EQ(fileNameSafe("a/b c:d"), "a_b_c_d");
}

struct Base {
  Base();
  virtual ~Base() = default;
  virtual void f() = 0;
};
void callF(Base* b) { b->f(); }
Base::Base() { callF(this); }  // f() of an object not yet a Derived: "pure virtual method called"
struct Derived : Base {
  void f() override {}
};

// A crash that std::terminate ends (the agent's rare exit crash was one) says what it was and
// where, so that one occurrence in a CI log is enough to diagnose it.
TEST(CrashReportDeathTest, TerminateWritesWhatAndABacktrace) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        log::installCrashReport("crash-test");
        std::thread([] { throw std::runtime_error("no one catches this"); }).join();
      },
      "crash-test: std::terminate in pid [0-9]+, thread [0-9]+: uncaught exception: no one "
      "catches this; its backtrace:\n(.*\n)+");
  EXPECT_DEATH(
      {
        log::installCrashReport("crash-test");
        Derived d;
      },
      "pure virtual method called(.|\n)*crash-test: std::terminate in pid [0-9]+, thread [0-9]+: "
      "no exception \\(a pure virtual call");
}

}  // namespace rally
