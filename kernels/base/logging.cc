#include "kernels/base/logging.h"

#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <map>
#include <mutex>
#include <string>

namespace rally::log {
namespace {

// The process's logging configuration. spdlog keeps its own registry of loggers; this holds only
// what rally adds on top (prefix and per-subsystem levels), guarded for lazy logger creation.
struct Config {
  std::mutex mu;
  std::string pattern = "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [%n] %v";
  spdlog::level::level_enum default_level = spdlog::level::info;
  std::map<std::string, spdlog::level::level_enum, std::less<>> levels;
};

Config& config() {
  static Config c;
  return c;
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
  spdlog::drop_all();
  return okStatus();
}

std::shared_ptr<spdlog::logger> get(std::string_view subsystem) {
  Config& c = config();
  std::lock_guard lock(c.mu);
  const std::string name(subsystem);
  if (auto existing = spdlog::get(name)) return existing;
  auto logger = spdlog::stderr_color_mt(name);
  logger->set_pattern(c.pattern);
  const auto it = c.levels.find(name);
  logger->set_level(it != c.levels.end() ? it->second : c.default_level);
  logger->flush_on(spdlog::level::warn);
  return logger;
}

}  // namespace rally::log
