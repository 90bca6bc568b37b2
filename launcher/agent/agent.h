// The node agent behind `rally run`: joins the job's rendezvous, starts this node's workers with
// torchrun's environment, watches them, and restarts the whole job's workers when one fails or the
// membership changes (restart-level elasticity: any program, torchrun semantics).
//
//   rally::agent::Agent agent(options);   // options from rally::cli::parseRunOptions
//   return agent.run();                   // the process's exit code
//
// The coordinator is embedded in the agent whose address matches --rdzv-endpoint (or started on
// a free local port with --standalone); other agents reach it there. Restarts are counted for the
// job by the coordinator (one per failed generation, whichever nodes saw failures); a lost node
// makes the survivors re-form with fewer nodes while at least MIN remain; a node that joins while
// the job runs is admitted by a restart at once (node rank 0 asks for it).
//
// Thread-safety: run() once, from the main thread (workers get PR_SET_PDEATHSIG from it).
#pragma once

#include <memory>

#include "launcher/cli/run_options.h"

namespace rally::agent {

class Agent {
 public:
  explicit Agent(cli::RunOptions options);
  ~Agent();
  // Runs until the job finishes here: 0 when every worker of the job succeeded, 1 when the job
  // failed (the report says why), 128+N when stopped by signal N.
  int run();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rally::agent
