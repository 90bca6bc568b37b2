// What rally writes for other tools to read: the Prometheus text exposition format, and files
// replaced whole (a reader never sees half of one).
//
//   std::string text = fmt::format("rally_step{} {}\n", prometheusLabels({{"node", "n0"}}), 12);
//   RALLY_RETURN_IF_ERROR(writeFileReplacing("/metrics/rally-n0.prom", text));
#pragma once

#include <map>
#include <string>
#include <string_view>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally {

// A label value with backslash, double quote and newline escaped.
std::string prometheusLabelValue(const std::string& value);
// `{k="v",...}` ("" for no labels), values escaped.
std::string prometheusLabels(const std::map<std::string, std::string>& labels);
// A metric family's "# HELP" and "# TYPE" lines (type: counter, gauge).
std::string prometheusHeader(std::string_view name, std::string_view type, std::string_view help);

// The shortest --telemetry-interval (RALLY_TELEMETRY_INTERVAL) workers accept.
inline constexpr Milliseconds kMinTelemetryInterval{100};

// Writes `text` to a temporary file beside `path` (named for this process) and renames it over
// `path`; makes the directory. No fsync: these files are rewritten every few seconds, and a crash
// leaves the previous version or none.
Status writeFileReplacing(const std::string& path, const std::string& text);

// `s` as part of a file name: anything but [A-Za-z0-9._-] becomes '_' (node ids are free text).
std::string fileNameSafe(std::string s);

}  // namespace rally
