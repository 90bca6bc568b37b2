// The `rally` executable: `rally run` (the torchrun-compatible launcher and node agent) and
// `rally coordinator` (a job's coordinator on its own), `rally checkpoint` (look into checkpoints),
// `rally trace` (read the workers' collective traces) and `rally status` (ask a job's coordinator
// for its round).
#include <CLI/CLI.hpp>
#include <iostream>

#include "kernels/base/logging.h"
#include "launcher/cli/checkpoint_command.h"
#include "launcher/cli/coordinator_command.h"
#include "launcher/cli/run_command.h"
#include "launcher/cli/status_command.h"
#include "launcher/cli/trace_command.h"
#include "rally/config.h"
#include "runtime/rendezvous/grpc_status.h"

int main(int argc, char** argv) {
  rally::log::installCrashReport("rally");
  // First, so that it goes last: gRPC's final clean-up runs here when main ends.
  const rally::rendezvous::GrpcLifetime grpc;
  rally::rendezvous::routeGrpcLogs();
  // `rally run` takes torchrun's command line, whose program arguments are the program's: it is
  // parsed by its own parser, not as a subcommand here.
  if (argc >= 2 && std::string(argv[1]) == "run") {
    return rally::cli::runRunCommand(std::vector<std::string>(argv + 2, argv + argc));
  }
  CLI::App app{"rally: elastic distributed training that survives node loss in place"};
  app.set_version_flag("--version", std::string("rally ") + RALLY_VERSION);
  app.require_subcommand(1);
  std::function<int()> run;
  app.add_subcommand("run",
                     "Run a training program on this node's workers, torchrun-compatible "
                     "(rally run --help)");
  rally::cli::addCoordinatorCommand(app, &run);
  rally::cli::addCheckpointCommand(app, &run);
  rally::cli::addTraceCommand(app, &run);
  rally::cli::addStatusCommand(app, &run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "rally: " << e.what() << " (see rally --help)\n";
    return 2;
  }
  return run ? run() : 2;
}
