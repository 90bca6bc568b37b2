// Parsing of the human units that flags and environment variables take: durations ("250ms", "2s",
// "1.5m", "1h"; a bare number means seconds, as in torchrun) and byte sizes ("512", "64KiB",
// "4MiB", "1GiB"; KB/MB/GB are powers of ten).
//
//   RALLY_ASSIGN_OR_RETURN(auto interval, rally::parseDuration("500ms"));
//   std::string text = rally::formatDuration(interval);  // "500ms"
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "kernels/base/status.h"

namespace rally {

using Milliseconds = std::chrono::milliseconds;

Result<Milliseconds> parseDuration(std::string_view text);
Result<std::int64_t> parseBytes(std::string_view text);
Result<std::int64_t> parseInteger(std::string_view text);
std::string formatDuration(Milliseconds d);
// An elapsed time for people, rounded: "850 us", "3.1 ms", "2.0 s" (negative counts as 0).
std::string formatElapsed(std::int64_t microseconds);
std::string formatBytes(std::int64_t bytes);

}  // namespace rally
