// `rally coordinator`: hosts a job's coordinator alone (rather than embedded in an agent).
//
//   rally coordinator --port 0 --token-file job.token --nnodes 2:4 --job-id train1
//
// It prints "rally coordinator listening on HOST:PORT" once it serves, and on SIGTERM or SIGINT
// tells every agent and watcher that it is shutting down before it stops.
#pragma once

#include <CLI/CLI.hpp>

namespace rally::cli {

// Adds the subcommand to `app`; `run` is set to the function that executes it once parsed.
void addCoordinatorCommand(CLI::App& app, std::function<int()>* run);

}  // namespace rally::cli
