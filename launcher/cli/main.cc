// The `rally` executable: `rally coordinator` today; `rally run` (the torchrun-compatible launcher)
// and `rally checkpoint` join it as they are built.
#include <CLI/CLI.hpp>
#include <iostream>

#include "launcher/cli/coordinator_command.h"
#include "rally/config.h"
#include "runtime/rendezvous/grpc_status.h"

int main(int argc, char** argv) {
  rally::rendezvous::routeGrpcLogs();
  CLI::App app{"rally: elastic distributed training that survives node loss in place"};
  app.set_version_flag("--version", std::string("rally ") + RALLY_VERSION);
  app.require_subcommand(1);
  std::function<int()> run;
  rally::cli::addCoordinatorCommand(app, &run);
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
