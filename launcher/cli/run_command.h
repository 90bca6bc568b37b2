// `rally run [options] PROGRAM [args...]`: torchrun's command line, run by rally's node agent.
#pragma once

#include <string>
#include <vector>

namespace rally::cli {

// Runs `rally run` with the arguments after "run"; returns the process exit code (2 for bad input).
int runRunCommand(const std::vector<std::string>& args);

}  // namespace rally::cli
