#include "kernels/base/logging.h"

#include <execinfo.h>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <string>

namespace rally::log {
namespace {

// The process's logging configuration and its loggers. rally keeps its loggers itself, not in
// spdlog's registry, and never destroys any of this: threads that still log while the process
// exits (gRPC's, a reactor's last callback, gRPC's clean-up thread through routeGrpcLogs) must not
// find a logger or its sink destroyed under them, which aborts the process with "pure virtual
// method called" (seen once in about 800 runs of rally run before this).
struct Config {
  std::mutex mu;
  std::string pattern = "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [%n] %v";
  spdlog::level::level_enum default_level = spdlog::level::info;
  std::map<std::string, spdlog::level::level_enum, std::less<>> levels;
  std::map<std::string, std::shared_ptr<spdlog::logger>, std::less<>> loggers;
  spdlog::sink_ptr sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();

  spdlog::level::level_enum levelOf(const std::string& name) const {
    const auto it = levels.find(name);
    return it != levels.end() ? it->second : default_level;
  }
};

Config& config() {
  static Config* c = new Config();  // never destroyed (see above)
  return *c;
}

Result<spdlog::level::level_enum> parseLevel(std::string_view s) {
  const auto level = spdlog::level::from_str(std::string(s));
  if (level == spdlog::level::off && s != "off") {
    return invalidArgument(
        fmt::format("'{}' is not a log level: use trace, debug, info, warn, error or off", s));
  }
  return level;
}

}  // namespace

Status setup(std::string_view prefix, std::string_view level_spec) {
  Config& c = config();
  std::lock_guard lock(c.mu);
  c.levels.clear();
  std::string_view rest = level_spec;
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      RALLY_ASSIGN_OR_RETURN(c.default_level, parseLevel(item));
    } else {
      RALLY_ASSIGN_OR_RETURN(auto level, parseLevel(item.substr(eq + 1)));
      c.levels[std::string(item.substr(0, eq))] = level;
    }
  }
  c.pattern = fmt::format("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [{}] [%n] %v", prefix);
  for (auto& [name, logger] : c.loggers) {  // loggers made before setup() follow it too
    logger->set_pattern(c.pattern);
    logger->set_level(c.levelOf(name));
  }
  return okStatus();
}

std::shared_ptr<spdlog::logger> get(std::string_view subsystem) {
  Config& c = config();
  std::lock_guard lock(c.mu);
  if (auto it = c.loggers.find(subsystem); it != c.loggers.end()) return it->second;
  const std::string name(subsystem);
  auto logger = std::make_shared<spdlog::logger>(name, c.sink);
  logger->set_pattern(c.pattern);
  logger->set_level(c.levelOf(name));
  logger->flush_on(spdlog::level::warn);
  c.loggers.emplace(name, logger);
  return logger;
}

namespace {
char crash_program[64] = "rally";

void writeAll(const char* text, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(2, text, n);
    if (w <= 0) return;
    text += w;
    n -= static_cast<size_t>(w);
  }
}

[[noreturn]] void reportTerminate() {
  // No allocation here: the crash may be an out-of-memory one.
  char what[256] = "no exception (a pure virtual call, a joinable std::thread destroyed, ...)";
  if (std::exception_ptr e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      std::snprintf(what, sizeof(what), "uncaught exception: %s", x.what());
    } catch (...) {
      std::snprintf(what, sizeof(what), "uncaught exception of an unknown type");
    }
  }
  char line[512];
  const int n = std::snprintf(
      line, sizeof(line), "%s: std::terminate in pid %d, thread %ld: %s; its backtrace:\n",
      crash_program, static_cast<int>(getpid()), static_cast<long>(syscall(SYS_gettid)), what);
  writeAll(line, static_cast<size_t>(std::max(0, std::min<int>(n, sizeof(line) - 1))));
  void* frames[64];
  const int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, 2);
  std::abort();
}
}  // namespace

void installCrashReport(std::string_view program) {
  const size_t n = std::min(program.size(), sizeof(crash_program) - 1);
  program.copy(crash_program, n);
  crash_program[n] = '\0';
  // backtrace() loads its unwinder on first use, which allocates: do that now, not in a crash.
  void* frame[1];
  (void)backtrace(frame, 1);
  std::set_terminate(reportTerminate);
}

}  // namespace rally::log
