// Every tunable as a command-line flag (--heartbeat-interval for heartbeat_interval), shared by
// the subcommands, so that flags, environment variables and --print-config stay one registry.
#pragma once

#include <CLI/CLI.hpp>
#include <map>
#include <string>

#include "kernels/base/tunables.h"

namespace rally::cli {

// Adds the flags to `cmd`; values given land in `values`, by tunable name.
void addTunableFlags(CLI::App* cmd, std::map<std::string, std::string>* values);

// Applies `values` over `tunables` (each flag named as its source).
Status applyTunableFlags(const std::map<std::string, std::string>& values, Tunables* tunables);

}  // namespace rally::cli
