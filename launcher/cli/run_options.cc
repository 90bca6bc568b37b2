#include "launcher/cli/run_options.h"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <thread>

#include "launcher/cli/tunable_flags.h"
#include "runtime/faults/fault_plan.h"

extern char** environ;

namespace rally::cli {
namespace {

struct SignalEntry {
  const char* name;
  int number;
};
constexpr SignalEntry kSignals[] = {
    {"SIGHUP", SIGHUP},   {"SIGINT", SIGINT},   {"SIGQUIT", SIGQUIT}, {"SIGTERM", SIGTERM},
    {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}, {"SIGABRT", SIGABRT}, {"SIGKILL", SIGKILL},
    {"SIGSEGV", SIGSEGV}, {"SIGBUS", SIGBUS},   {"SIGFPE", SIGFPE},   {"SIGILL", SIGILL},
    {"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM}};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

Result<int> parseInt(const std::string& flag, const std::string& text, int min, int max) {
  auto v = parseInteger(text);
  if (!v.ok() || *v < min || *v > max) {
    return invalidArgument(
        fmt::format("{} '{}' is not an integer from {} to {}", flag, text, min, max));
  }
  return static_cast<int>(*v);
}

Result<StdStreams> parseStreams(const std::string& flag, const std::string& text) {
  auto v = parseInt(flag, text, 0, 3);
  if (!v.ok()) {
    return invalidArgument(
        fmt::format("{} '{}' is not 0 (none), 1 (stdout), 2 (stderr), 3 (both) or LOCAL_RANK:N,...",
                    flag, text));
  }
  return StdStreams{(*v & 1) != 0, (*v & 2) != 0};
}

Result<StdSpec> parseStdSpec(const std::string& flag, const std::string& text) {
  StdSpec spec;
  if (text.find(':') == std::string::npos) {
    RALLY_ASSIGN_OR_RETURN(StdStreams s, parseStreams(flag, text));
    spec.all = s;
    return spec;
  }
  for (const std::string& item : split(text, ',')) {
    const auto colon = item.find(':');
    if (colon == std::string::npos) {
      return invalidArgument(fmt::format("{} '{}': '{}' is not LOCAL_RANK:N", flag, text, item));
    }
    RALLY_ASSIGN_OR_RETURN(int rank, parseInt(flag, item.substr(0, colon), 0, 1 << 20));
    RALLY_ASSIGN_OR_RETURN(StdStreams s, parseStreams(flag, item.substr(colon + 1)));
    spec.per_rank[rank] = s;
  }
  return spec;
}

// torchrun's option names: each flag is registered as --a-b and --a_b, and PET_A_B sets it when the
// command line does not.
struct Flag {
  const char* name;  // with dashes
  bool is_flag;      // takes no value
};
constexpr Flag kTorchrunFlags[] = {{"nnodes", false},
                                   {"nproc-per-node", false},
                                   {"rdzv-backend", false},
                                   {"rdzv-endpoint", false},
                                   {"rdzv-id", false},
                                   {"rdzv-conf", false},
                                   {"standalone", true},
                                   {"max-restarts", false},
                                   {"monitor-interval", false},
                                   {"start-method", false},
                                   {"role", false},
                                   {"module", true},
                                   {"no-python", true},
                                   {"run-path", true},
                                   {"log-dir", false},
                                   {"redirects", false},
                                   {"tee", false},
                                   {"node-rank", false},
                                   {"master-addr", false},
                                   {"master-port", false},
                                   {"local-ranks-filter", false},
                                   {"local-addr", false},
                                   {"signals-to-handle", false}};

std::string petName(const char* dashed) {
  std::string out = "PET_";
  for (const char* p = dashed; *p != '\0'; ++p) {
    out += *p == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(*p)));
  }
  return out;
}

std::string names(const char* dashed, const char* short_name = nullptr) {
  std::string dashes = std::string("--") + dashed;
  std::string under = dashes;
  std::replace(under.begin() + 2, under.end(), '-', '_');
  std::string out = short_name != nullptr ? std::string(short_name) + "," : std::string();
  out += dashes;
  if (under != dashes) out += "," + under;
  return out;
}

}  // namespace

std::string HostPort::toString() const {
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port)
                                             : fmt::format("{}:{}", host, port);
}

Result<std::vector<HostPort>> parseRdzvEndpoints(const std::string& text) {
  std::vector<HostPort> out;
  for (const std::string& entry : split(text, ',')) {
    std::string one = entry;
    one.erase(0, one.find_first_not_of(" \t"));
    one.erase(one.find_last_not_of(" \t") + 1);
    if (one.empty()) continue;  // "a, ,b": nothing between two commas
    // torchrun's default rendezvous port for an entry without one.
    auto hp = parseHostPort(one, 29400);
    if (!hp.ok()) {
      return invalidArgument(fmt::format("--rdzv-endpoint '{}': {}", text, hp.status().message()));
    }
    if (std::find(out.begin(), out.end(), *hp) != out.end()) {
      return invalidArgument(fmt::format(
          "--rdzv-endpoint '{}' names {} twice: give each address once", text, hp->toString()));
    }
    out.push_back(*hp);
  }
  if (out.empty()) {
    return invalidArgument(fmt::format(
        "--rdzv-endpoint '{}' names no address: give HOST[:PORT][,HOST[:PORT]...]", text));
  }
  return out;
}

std::string derivedJobToken(const std::string& job_id) {
  return fmt::format("rally-job-{}", job_id);
}

Result<HostPort> parseHostPort(const std::string& text, int default_port) {
  HostPort hp;
  std::string port;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string::npos) {
      return invalidArgument(fmt::format("'{}' opens a bracket it does not close", text));
    }
    hp.host = text.substr(1, close - 1);
    const std::string rest = text.substr(close + 1);
    if (!rest.empty() && rest.front() != ':') {
      return invalidArgument(
          fmt::format("'{}' has '{}' after the address: give [ADDRESS]:PORT", text, rest));
    }
    if (!rest.empty()) port = rest.substr(1);
    if (!rest.empty() && port.empty()) {
      return invalidArgument(fmt::format("'{}' has no port after the colon", text));
    }
  } else {
    const auto colon = text.find(':');
    if (colon != std::string::npos && text.find(':', colon + 1) != std::string::npos) {
      return invalidArgument(fmt::format(
          "'{}' looks like an IPv6 address: put it in brackets, as [ADDRESS]:PORT", text));
    }
    hp.host = text.substr(0, colon);
    if (colon != std::string::npos) {
      port = text.substr(colon + 1);
      if (port.empty())
        return invalidArgument(fmt::format("'{}' has no port after the colon", text));
    }
  }
  if (hp.host.empty()) {
    return invalidArgument(fmt::format("'{}' has no host: give HOST:PORT", text));
  }
  hp.port = default_port;
  if (!port.empty()) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(port.c_str(), &end, 10);
    if (port.find_first_not_of("0123456789") != std::string::npos || errno != 0 ||
        end == port.c_str() || *end != '\0' || v < 1 || v > 65535) {
      return invalidArgument(
          fmt::format("'{}' has port '{}': give a number from 1 to 65535", text, port));
    }
    hp.port = static_cast<int>(v);
  }
  return hp;
}

Status parseNnodes(const std::string& text, std::uint32_t* min, std::uint32_t* max) {
  const std::string hint = fmt::format(
      "--nnodes '{}' is not N or MIN:MAX with 1 <= MIN <= MAX (for example 2 or 1:4)", text);
  const auto colon = text.find(':');
  auto one = [&](const std::string& part) -> Result<std::uint32_t> {
    auto v = parseInteger(part);
    if (!v.ok() || *v < 1 || *v > 1'000'000) return invalidArgument(hint);
    return static_cast<std::uint32_t>(*v);
  };
  if (colon == std::string::npos) {
    RALLY_ASSIGN_OR_RETURN(*min, one(text));
    *max = *min;
  } else {
    RALLY_ASSIGN_OR_RETURN(*min, one(text.substr(0, colon)));
    RALLY_ASSIGN_OR_RETURN(*max, one(text.substr(colon + 1)));
  }
  if (*min > *max) return invalidArgument(hint + ": MIN is larger than MAX");
  return okStatus();
}

StdStreams StdSpec::forRank(int local_rank) const {
  if (all) return *all;
  const auto it = per_rank.find(local_rank);
  return it == per_rank.end() ? StdStreams{} : it->second;
}

Environment processEnvironment() {
  Environment env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq != nullptr)
      env.emplace(std::string(*e, static_cast<size_t>(eq - *e)), std::string(eq + 1));
  }
  return env;
}

const char* signalName(int sig) {
  for (const auto& s : kSignals) {
    if (s.number == sig) return s.name;
  }
  return "signal";
}

Result<std::vector<int>> parseSignals(const std::string& text) {
  std::vector<int> out;
  for (std::string item : split(text, ',')) {
    item.erase(std::remove(item.begin(), item.end(), ' '), item.end());
    int number = -1;
    if (!item.empty() && std::isdigit(static_cast<unsigned char>(item[0]))) {
      auto v = parseInteger(item);
      if (v.ok() && *v > 0 && *v < 65) number = static_cast<int>(*v);
    } else {
      const std::string name = item.rfind("SIG", 0) == 0 ? item : "SIG" + item;
      for (const auto& s : kSignals) {
        if (name == s.name) number = s.number;
      }
    }
    if (number < 0 || number == SIGKILL) {
      return invalidArgument(
          fmt::format("--signals-to-handle: '{}' is not a signal that can be handled (for example "
                      "SIGTERM,SIGINT,SIGHUP,SIGQUIT or their numbers)",
                      item));
    }
    out.push_back(number);
  }
  return out;
}

int visibleGpuCount(const Environment& env) {
  int devices = 0;
  for (int i = 0; i < 64; ++i) {
    if (std::filesystem::exists(fmt::format("/dev/nvidia{}", i))) ++devices;
  }
  if (auto it = env.find("CUDA_VISIBLE_DEVICES"); it != env.end()) {
    const auto listed = static_cast<int>(split(it->second, ',').size());
    devices = std::min(devices, listed);
  }
  return devices;
}

std::vector<std::string> RunOptions::command() const {
  std::vector<std::string> cmd;
  const bool py_file = script.size() >= 3 && script.compare(script.size() - 3, 3, ".py") == 0;
  const bool python = !no_python && (module || run_path || py_file);
  if (python) {
    cmd = {this->python, "-u"};
    if (module) cmd.push_back("-m");
  }
  cmd.push_back(script);
  cmd.insert(cmd.end(), script_args.begin(), script_args.end());
  return cmd;
}

Result<RunOptions> parseRunOptions(const std::vector<std::string>& args, const Environment& env) {
  RunOptions o;
  std::string nnodes = "1:1", rdzv_conf, redirects = "0", tee = "0", ranks_filter,
              signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT";
  std::string max_restarts = "0", node_rank = "0", master_port, monitor_interval = "5";
  std::map<std::string, std::string> tunable_flags;

  CLI::App app{"Launch a training program on this node's workers (torchrun-compatible)",
               "rally run"};
  app.prefix_command();  // everything from the program on belongs to the program
  app.footer(
      "rally run [OPTIONS] PROGRAM [ARGS...]\n"
      "PROGRAM: a .py script runs under python3 -u (PYTHON_EXEC overrides the interpreter); "
      "anything else runs directly.\nEvery torchrun option can also be set by PET_<NAME> "
      "(PET_NPROC_PER_NODE=2); the command line wins. Every tunable has a RALLY_ variable.\n"
      "Exit codes: 0 every worker of the job succeeded, 1 the job failed (a report says why), "
      "2 bad input, 128+N stopped by signal N. See docs/cli.md.");
  app.set_help_flag("-h,--help", "Print this help message and exit");
  auto opt = [&](const char* dashed, std::string* into, const char* help,
                 const char* short_name = nullptr) {
    app.add_option(names(dashed, short_name), *into, help)
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  };
  opt("nnodes", &nnodes, "Nodes: N, or MIN:MAX for an elastic job [1:1]");
  opt("nproc-per-node", &o.nproc_per_node, "Workers per node: N, auto, cpu or gpu [1]");
  opt("rdzv-backend", &o.rdzv_backend,
      "rally (rally's coordinator; c10d and etcd-v2 are accepted as aliases) or static [rally]");
  opt("rdzv-endpoint", &o.rdzv_endpoint,
      "HOST[:PORT][,HOST[:PORT]...]: the job's coordinator. The agent on the first HOST hosts it; "
      "the others are where it may be found after that host is lost [port 29400]");
  opt("rdzv-id", &o.rdzv_id, "The job's id; every node of a job must give the same [none]");
  opt("rdzv-conf", &rdzv_conf,
      "KEY=VALUE,...: join_timeout, last_call_timeout (seconds), is_host (true/false)");
  app.add_flag(names("standalone"), o.standalone,
               "One node, with a coordinator on a free local port (ignores --rdzv-*)");
  opt("max-restarts", &max_restarts, "Worker-group restarts for the job before it fails [0]");
  opt("monitor-interval", &monitor_interval,
      "Accepted for torchrun compatibility; rally sees worker exits at once [5]");
  opt("start-method", &o.start_method,
      "Accepted for torchrun compatibility (spawn, fork, forkserver)");
  opt("role", &o.role, "The workers' role (ROLE_NAME) [default]");
  app.add_flag(names("module", "-m"), o.module, "Run the program as a Python module (python -m)");
  app.add_flag(names("no-python"), o.no_python, "Run the program directly, not under python");
  app.add_flag(names("run-path"), o.run_path,
               "Accepted for torchrun compatibility: the script runs under python");
  opt("log-dir", &o.log_dir, "Directory for the workers' log and error files");
  opt("redirects", &redirects,
      "Workers' streams to log files only: 0 none, 1 stdout, 2 stderr, 3 both, or LR:N,...", "-r");
  opt("tee", &tee, "Workers' streams to log files and the console (as --redirects)", "-t");
  opt("node-rank", &node_rank, "This node's rank (static backend) [0]");
  opt("master-addr", &o.master_addr, "MASTER_ADDR (static backend) [127.0.0.1]");
  opt("master-port", &master_port, "MASTER_PORT; without it a free port is chosen");
  opt("local-ranks-filter", &ranks_filter, "Show only these local ranks' output: 0,2,...");
  opt("local-addr", &o.local_addr, "This node's address for other nodes [its host name]");
  opt("signals-to-handle", &signals,
      "Signals forwarded to the workers [SIGTERM,SIGINT,SIGHUP,SIGQUIT]");
  app.add_option("--recovery", o.recovery,
                 "rally: restart (stop and restart every worker, as torchrun) or in-place "
                 "(survivors re-form without restarting; programs using librally) [restart]");
  app.add_option("--fault-plan", o.fault_plan,
                 "rally: a fault plan FILE (kill, stall, hang, delay or fail a rank or node at a "
                 "step, time, commit or recovery); see docs/faults.md");
  app.add_option("--node-id", o.node_id, "rally: this node's id in the job [HOST-PID]");
  app.add_option("--events", o.events_file, "rally: append JSON-lines events to FILE");
  app.add_flag("--print-config", o.print_config,
               "rally: print the resolved options and every tunable, then exit (no program "
               "needed)");
  addTunableFlags(&app, &tunable_flags);

  // PET_* variables first, so that the command line (later, last one wins) overrides them.
  std::vector<std::string> full;
  for (const Flag& f : kTorchrunFlags) {
    const auto it = env.find(petName(f.name));
    if (it == env.end()) continue;
    if (f.is_flag) {
      if (it->second == "1" || it->second == "true" || it->second == "True") {
        full.push_back(std::string("--") + f.name);
      }
    } else {
      full.push_back(std::string("--") + f.name + "=" + it->second);
    }
  }
  full.insert(full.end(), args.begin(), args.end());
  std::vector<std::string> reversed(full.rbegin(), full.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    return notFound(app.help());
  } catch (const CLI::ParseError& e) {
    return invalidArgument(e.what());
  }

  std::vector<std::string> rest = app.remaining();
  if (rest.empty() && !o.print_config) {
    return invalidArgument(
        "no program to run: give a script or program, e.g. rally run --nproc-per-node 2 train.py");
  }
  if (!rest.empty() && rest[0].size() > 1 && rest[0][0] == '-') {
    return invalidArgument(
        fmt::format("unknown option '{}' before the program (see rally run --help)", rest[0]));
  }
  if (!rest.empty()) {
    o.script = rest[0];
    o.script_args.assign(rest.begin() + 1, rest.end());
  }

  RALLY_RETURN_IF_ERROR(parseNnodes(nnodes, &o.min_nodes, &o.max_nodes));
  if (o.nproc_per_node == "cpu") {
    o.local_world_size = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  } else if (o.nproc_per_node == "gpu" || o.nproc_per_node == "auto") {
    const int gpus = visibleGpuCount(env);
    if (o.nproc_per_node == "gpu" && gpus == 0) {
      return invalidArgument(
          "--nproc-per-node gpu: this node has no visible GPU (use a number or cpu)");
    }
    o.local_world_size =
        gpus > 0 ? gpus : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  } else {
    auto n = parseInteger(o.nproc_per_node);
    if (!n.ok() || *n < 1 || *n > 4096) {
      return invalidArgument(fmt::format(
          "--nproc-per-node '{}' is not a number of workers from 1 to 4096, auto, cpu or gpu",
          o.nproc_per_node));
    }
    o.local_world_size = static_cast<int>(*n);
  }
  if (o.rdzv_backend == "c10d" || o.rdzv_backend == "etcd-v2" || o.rdzv_backend == "rally") {
    o.rdzv_backend = "rally";
  } else if (o.rdzv_backend != "static") {
    return invalidArgument(fmt::format(
        "--rdzv-backend '{}' is not known: use rally (the default; c10d and etcd-v2 are aliases) "
        "or static",
        o.rdzv_backend));
  }
  for (const std::string& item : split(rdzv_conf, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      return invalidArgument(
          fmt::format("--rdzv-conf '{}': '{}' is not KEY=VALUE", rdzv_conf, item));
    }
    o.rdzv_conf[item.substr(0, eq)] = item.substr(eq + 1);
  }
  RALLY_ASSIGN_OR_RETURN(o.max_restarts, parseInt("--max-restarts", max_restarts, 0, 1 << 20));
  RALLY_ASSIGN_OR_RETURN(o.node_rank, parseInt("--node-rank", node_rank, 0, 1 << 20));
  if (!master_port.empty()) {
    RALLY_ASSIGN_OR_RETURN(o.master_port, parseInt("--master-port", master_port, 1, 65535));
    o.master_port_given = true;
  }
  try {
    o.monitor_interval = std::stod(monitor_interval);
  } catch (...) {
    return invalidArgument(
        fmt::format("--monitor-interval '{}' is not a number of seconds", monitor_interval));
  }
  if (o.start_method != "spawn" && o.start_method != "fork" && o.start_method != "forkserver") {
    return invalidArgument(
        fmt::format("--start-method '{}' is not spawn, fork or forkserver", o.start_method));
  }
  if (o.recovery != "restart" && o.recovery != "in-place") {
    return invalidArgument(fmt::format("--recovery '{}' is not restart or in-place", o.recovery));
  }
  if (!o.fault_plan.empty()) {
    auto plan = FaultPlan::fromFile(o.fault_plan);
    if (!plan.ok())
      return invalidArgument(fmt::format("--fault-plan: {}", plan.status().message()));
  }
  RALLY_ASSIGN_OR_RETURN(o.redirects, parseStdSpec("--redirects", redirects));
  RALLY_ASSIGN_OR_RETURN(o.tee, parseStdSpec("--tee", tee));
  if (!ranks_filter.empty()) {
    std::set<int> ranks;
    for (const std::string& r : split(ranks_filter, ',')) {
      RALLY_ASSIGN_OR_RETURN(int v, parseInt("--local-ranks-filter", r, 0, 1 << 20));
      ranks.insert(v);
    }
    o.local_ranks_filter = ranks;
  }
  RALLY_ASSIGN_OR_RETURN(o.signals_to_handle, parseSignals(signals));
  if (o.module && o.no_python) {
    return invalidArgument("--module and --no-python contradict each other: use one");
  }
  if (o.standalone) {
    o.rdzv_backend = "rally";
    o.rdzv_endpoint.clear();
    if (o.max_nodes != 1) {
      return invalidArgument(
          fmt::format("--standalone runs one node but --nnodes is {}:{}: drop one of them",
                      o.min_nodes, o.max_nodes));
    }
  } else if (o.staticBackend()) {
    if (o.min_nodes != o.max_nodes) {
      return invalidArgument("--rdzv-backend static needs a fixed --nnodes N, not MIN:MAX");
    }
    if (static_cast<std::uint32_t>(o.node_rank) >= o.max_nodes) {
      return invalidArgument(
          fmt::format("--node-rank {} is not below --nnodes {}", o.node_rank, o.max_nodes));
    }
  } else if (o.rdzv_endpoint.empty()) {
    if (o.max_nodes > 1) {
      return invalidArgument(
          "--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the node that hosts the "
          "coordinator), or --rdzv-backend static");
    }
    o.standalone = true;  // one node, no endpoint: as torchrun, a local rendezvous
  } else {
    RALLY_ASSIGN_OR_RETURN(o.rdzv_endpoints, parseRdzvEndpoints(o.rdzv_endpoint));
    o.rdzv_endpoint = o.rdzv_endpoints.front().toString();
  }
  if (auto it = env.find("PYTHON_EXEC"); it != env.end() && !it->second.empty()) {
    o.python = it->second;
  }
  for (const TunableSpec& spec : tunableSpecs()) {
    if (auto it = env.find(std::string(spec.env)); it != env.end() && !it->second.empty()) {
      RALLY_RETURN_IF_ERROR(o.tunables.set(spec.name, it->second, "env " + std::string(spec.env)));
    }
  }
  RALLY_RETURN_IF_ERROR(applyTunableFlags(tunable_flags, &o.tunables));
  return o;
}

}  // namespace rally::cli
