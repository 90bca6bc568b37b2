#include "launcher/cli/coordinator_command.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>

#include "kernels/base/logging.h"
#include "kernels/base/tunables.h"
#include "launcher/cli/run_options.h"
#include "launcher/cli/tunable_flags.h"
#include "launcher/coordinator/coordinator_server.h"
#include "runtime/rendezvous/coordinator_client.h"

namespace rally::cli {
namespace {

struct CoordinatorFlags {
  std::string host = "0.0.0.0";
  int port = 29400;
  std::string token_file;
  std::string port_file;
  std::string job_id;
  std::string nnodes;
  bool print_config = false;
  // Tunables given as flags, by tunable name.
  std::map<std::string, std::string> tunables;
};

// Reads the token file, or creates it with a new random token (mode 0600) if it does not exist.
Result<std::string> loadOrCreateToken(const std::string& path, bool* created) {
  *created = false;
  if (access(path.c_str(), F_OK) == 0) return rendezvous::readTokenFile(path);
  std::random_device rd;
  std::string token;
  for (int i = 0; i < 4; ++i) token += fmt::format("{:08x}", rd());
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return errnoStatus(fmt::format("cannot create the token file {}", path), errno);
  const std::string line = token + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  ::close(fd);
  if (!ok) return ioError(fmt::format("cannot write the token file {}", path));
  *created = true;
  return token;
}

int runCoordinator(const CoordinatorFlags& flags) {
  auto tunables = Tunables::fromEnvironment();
  if (!tunables.ok()) {
    std::cerr << "rally coordinator: " << tunables.status().message() << "\n";
    return 2;
  }
  if (Status s = applyTunableFlags(flags.tunables, &*tunables); !s.ok()) {
    std::cerr << "rally coordinator: " << s.message() << "\n";
    return 2;
  }
  if (flags.print_config) {
    tunables->print(std::cout);
    return 0;
  }
  if (Status s = log::setup("coordinator", *tunables->string("log_level")); !s.ok()) {
    std::cerr << "rally coordinator: RALLY_LOG_LEVEL: " << s.message() << "\n";
    return 2;
  }

  coordinator::CoordinatorOptions options;
  options.rendezvous.job_id = flags.job_id;
  if (!flags.nnodes.empty()) {
    if (Status s =
            parseNnodes(flags.nnodes, &options.rendezvous.min_nodes, &options.rendezvous.max_nodes);
        !s.ok()) {
      std::cerr << "rally coordinator: " << s.message() << "\n";
      return 2;
    }
  }
  options.rendezvous.last_call = *tunables->duration("last_call");
  options.rendezvous.join_timeout = *tunables->duration("join_timeout");
  options.heartbeat_interval = *tunables->duration("heartbeat_interval");
  options.default_wait_timeout = *tunables->duration("rpc_timeout");
  options.kv.max_keys = *tunables->integer("max_keys");
  options.kv.max_key_bytes = *tunables->bytes("max_key_bytes");
  options.kv.max_value_bytes = *tunables->bytes("max_value_bytes");

  std::string token_source;
  if (!flags.token_file.empty()) {
    bool created = false;
    auto token = loadOrCreateToken(flags.token_file, &created);
    if (!token.ok()) {
      std::cerr << "rally coordinator: " << token.status().message() << "\n";
      return 2;
    }
    options.token = *token;
    token_source = created ? fmt::format("new token written to {}", flags.token_file)
                           : fmt::format("token from {}", flags.token_file);
  } else if (const char* env = std::getenv("RALLY_TOKEN"); env != nullptr && *env != '\0') {
    options.token = env;
    token_source = "token from RALLY_TOKEN";
  } else {
    std::cerr << "rally coordinator: no job token: pass --token-file FILE (created with a new "
                 "random token if it does not exist) or set RALLY_TOKEN\n";
    return 2;
  }

  // Signals are taken synchronously by this thread (sigwait), so block them before any thread
  // starts; the gRPC threads inherit the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  coordinator::ListenOptions listen{flags.host, flags.port, *tunables->bytes("max_message_bytes")};
  auto server = coordinator::CoordinatorServer::start(std::move(options), listen);
  if (!server.ok()) {
    std::cerr << "rally coordinator: " << server.status().message() << "\n";
    return 1;
  }
  if (!flags.port_file.empty()) {
    std::ofstream(flags.port_file) << (*server)->port() << "\n";
  }
  std::cout << fmt::format("rally coordinator listening on {} (job '{}', {})", (*server)->address(),
                           flags.job_id.empty() ? "any" : flags.job_id, token_source)
            << std::endl;

  int sig = 0;
  sigwait(&signals, &sig);
  const std::string reason = fmt::format("received {}", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->shutdown(reason);
  std::cout << "rally coordinator stopped: " << reason << std::endl;
  return 0;
}

}  // namespace

void addCoordinatorCommand(CLI::App& app, std::function<int()>* run) {
  auto flags = std::make_shared<CoordinatorFlags>();
  CLI::App* cmd = app.add_subcommand(
      "coordinator", "Host a job's rendezvous coordinator (rounds, liveness, generation, store)");
  cmd->add_option("--host", flags->host, "Address to listen on")->capture_default_str();
  cmd->add_option("--port", flags->port, "Port to listen on; 0 picks a free one (printed)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--token-file", flags->token_file,
                  "File holding the job token (created with a random token if missing); "
                  "otherwise RALLY_TOKEN");
  cmd->add_option("--port-file", flags->port_file, "Write the port it listens on to this file");
  cmd->add_option("--job-id,--rdzv-id,--rdzv_id", flags->job_id,
                  "The job's id; joins for another job are refused (default: the first join's)");
  cmd->add_option("--nnodes", flags->nnodes, "N or MIN:MAX nodes (default: the first join's)");
  addTunableFlags(cmd, &flags->tunables);
  cmd->add_flag("--print-config", flags->print_config,
                "Print every tunable with its value and source, then exit");
  cmd->callback([flags, run] { *run = [flags] { return runCoordinator(*flags); }; });
}

}  // namespace rally::cli
