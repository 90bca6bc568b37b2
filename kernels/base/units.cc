#include "kernels/base/units.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstdlib>

namespace rally {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Splits "1.5ms" into 1.5 and "ms". Returns false when there is no leading number.
bool splitNumber(std::string_view s, double* number, std::string_view* unit) {
  size_t i = 0;
  while (i < s.size() && ((s[i] >= '0' && s[i] <= '9') || s[i] == '.')) ++i;
  if (i == 0) return false;
  const std::string digits(s.substr(0, i));
  char* end = nullptr;
  *number = std::strtod(digits.c_str(), &end);
  if (end != digits.c_str() + digits.size()) return false;
  *unit = trim(s.substr(i));
  return true;
}

}  // namespace

Result<Milliseconds> parseDuration(std::string_view text) {
  const std::string_view s = trim(text);
  double n = 0;
  std::string_view unit;
  if (!splitNumber(s, &n, &unit)) {
    return invalidArgument(fmt::format(
        "'{}' is not a duration: expected a number with an optional unit, like 500ms, 2s, 1.5m, 1h",
        text));
  }
  double ms = 0;
  if (unit.empty() || unit == "s") {
    ms = n * 1000;
  } else if (unit == "ms") {
    ms = n;
  } else if (unit == "m" || unit == "min") {
    ms = n * 60'000;
  } else if (unit == "h") {
    ms = n * 3'600'000;
  } else {
    return invalidArgument(
        fmt::format("'{}' has an unknown duration unit '{}': use ms, s, m or h", text, unit));
  }
  if (ms > 1e15) return invalidArgument(fmt::format("duration '{}' is too large", text));
  return Milliseconds(static_cast<std::int64_t>(std::llround(ms)));
}

Result<std::int64_t> parseBytes(std::string_view text) {
  const std::string_view s = trim(text);
  double n = 0;
  std::string_view unit;
  if (!splitNumber(s, &n, &unit)) {
    return invalidArgument(fmt::format(
        "'{}' is not a size: expected a number with an optional unit, like 512, 64KiB, 4MiB, 1GiB",
        text));
  }
  double mult = 0;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "KiB")
    mult = 1024.0;
  else if (unit == "MiB")
    mult = 1024.0 * 1024;
  else if (unit == "GiB")
    mult = 1024.0 * 1024 * 1024;
  else if (unit == "KB")
    mult = 1e3;
  else if (unit == "MB")
    mult = 1e6;
  else if (unit == "GB")
    mult = 1e9;
  else {
    return invalidArgument(fmt::format(
        "'{}' has an unknown size unit '{}': use B, KiB, MiB, GiB, KB, MB or GB", text, unit));
  }
  const double bytes = n * mult;
  if (bytes > 9e18) return invalidArgument(fmt::format("size '{}' is too large", text));
  return static_cast<std::int64_t>(std::llround(bytes));
}

Result<std::int64_t> parseInteger(std::string_view text) {
  const std::string_view s = trim(text);
  std::int64_t v = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || ptr != s.data() + s.size()) {
    return invalidArgument(fmt::format("'{}' is not an integer", text));
  }
  return v;
}

std::string formatDuration(Milliseconds d) {
  const auto ms = d.count();
  if (ms != 0 && ms % 3'600'000 == 0) return fmt::format("{}h", ms / 3'600'000);
  if (ms != 0 && ms % 60'000 == 0) return fmt::format("{}m", ms / 60'000);
  if (ms % 1000 == 0) return fmt::format("{}s", ms / 1000);
  return fmt::format("{}ms", ms);
}

std::string formatElapsed(std::int64_t us) {
  if (us < 0) us = 0;
  if (us < 1000) return fmt::format("{} us", us);
  if (us < 1'000'000) return fmt::format("{:.1f} ms", static_cast<double>(us) / 1e3);
  return fmt::format("{:.1f} s", static_cast<double>(us) / 1e6);
}

std::string formatBytes(std::int64_t b) {
  constexpr std::int64_t kKiB = 1024, kMiB = kKiB * 1024, kGiB = kMiB * 1024;
  if (b != 0 && b % kGiB == 0) return fmt::format("{}GiB", b / kGiB);
  if (b != 0 && b % kMiB == 0) return fmt::format("{}MiB", b / kMiB);
  if (b != 0 && b % kKiB == 0) return fmt::format("{}KiB", b / kKiB);
  return fmt::format("{}", b);
}

}  // namespace rally
