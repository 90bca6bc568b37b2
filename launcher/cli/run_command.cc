#include "launcher/cli/run_command.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <iostream>

#include "launcher/agent/agent.h"
#include "launcher/cli/run_options.h"

namespace rally::cli {
namespace {

void printConfig(const RunOptions& o) {
  std::vector<std::string> signals;
  for (int sig : o.signals_to_handle) signals.emplace_back(signalName(sig));
  std::vector<std::string> endpoints;
  for (const HostPort& e : o.rdzv_endpoints) endpoints.push_back(e.toString());
  std::cout << fmt::format(
      "nnodes               {}:{}\n"
      "nproc_per_node       {} ({} worker(s))\n"
      "rdzv_backend         {}{}\n"
      "rdzv_endpoint        {}\n"
      "rdzv_id              {}\n"
      "master_addr:port     {}:{}{}\n"
      "max_restarts         {}\n"
      "recovery             {}\n"
      "role                 {}\n"
      "node_id              {}\n"
      "log_dir              {}\n"
      "fault_plan           {}\n"
      "events               {}\n"
      "signals_to_handle    {}\n"
      "command              {}\n\n",
      o.min_nodes, o.max_nodes, o.nproc_per_node, o.local_world_size, o.rdzv_backend,
      o.standalone ? " (standalone)" : "",
      endpoints.empty() ? "-"
                        : fmt::to_string(fmt::join(endpoints, ",")) +
                              (endpoints.size() > 1 ? " (the first hosts it; standbys after)" : ""),
      o.rdzv_id, o.staticBackend() ? o.master_addr : "(node rank 0's address)",
      o.staticBackend() || o.master_port_given ? std::to_string(o.master_port) : "(free port)",
      o.staticBackend() || o.master_port_given ? "" : " chosen by node rank 0", o.max_restarts,
      o.recovery, o.role, o.node_id.empty() ? "(HOST-PID)" : o.node_id,
      o.log_dir.empty() ? "(a temporary directory)" : o.log_dir,
      o.fault_plan.empty() ? "-" : o.fault_plan, o.events_file.empty() ? "-" : o.events_file,
      fmt::join(signals, ","),
      o.script.empty() ? "(none given)" : fmt::format("{}", fmt::join(o.command(), " ")));
  o.tunables.print(std::cout);
}

}  // namespace

int runRunCommand(const std::vector<std::string>& args) {
  auto options = parseRunOptions(args, processEnvironment());
  if (!options.ok()) {
    if (options.status().code() == StatusCode::kNotFound) {  // --help
      std::cout << options.status().message();
      return 0;
    }
    std::cerr << "rally run: " << options.status().message() << "\n";
    return 2;
  }
  if (options->print_config) {
    printConfig(*options);
    return 0;
  }
  agent::Agent agent(std::move(*options));
  return agent.run();
}

}  // namespace rally::cli
