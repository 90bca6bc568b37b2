// `rally status`: asks a job's coordinator, at each address of --rdzv-endpoint, for its round: the
// job, the generation and its state, the members (node rank, id, address, workers, standby
// address) and the nodes waiting. For operators: where the coordinator is now (after a takeover it
// serves at a standby address), and who is in the job.
//
//   rally status --rdzv-endpoint node0:29400,node1:29400 --rdzv-id job7
//   rally status --rdzv-endpoint node0 --json
//
// The token: RALLY_TOKEN, or --token-file, or (as agents without one) the one derived from
// --rdzv-id. Exit status: 0 a coordinator of the job answered, 1 none did, 2 bad usage.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace rally::cli {

void addStatusCommand(CLI::App& app, std::function<int()>* run);

}  // namespace rally::cli
