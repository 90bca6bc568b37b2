// `rally run`'s options: torchrun's, in both spellings and from PET_* variables, plus rally's own.
// Parsing and validation are pure (no processes), so every rule is unit-tested; each bad value gets
// one line that names the flag, what was wrong and what would be right.
//
//   RALLY_ASSIGN_OR_RETURN(RunOptions o, parseRunOptions({"--nnodes", "1:2", "train.py", "--lr",
//                                                         "0.1"}, environment));
//   o.command();  // {"python3", "-u", "train.py", "--lr", "0.1"}
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "kernels/base/status.h"
#include "kernels/base/tunables.h"

namespace rally::cli {

// Which of a worker's streams go to a log file (redirect), or to a file and the console (tee).
struct StdStreams {
  bool out = false;
  bool err = false;
};

// "3" (both), "1" (stdout), "2" (stderr), "0" (none), or per local rank "0:1,1:2".
struct StdSpec {
  std::optional<StdStreams> all;
  std::map<int, StdStreams> per_rank;
  StdStreams forRank(int local_rank) const;
};

// One entry of --rdzv-endpoint: a host name or address (an IPv6 one without its brackets) and a
// port.
struct HostPort {
  std::string host;
  int port = 0;
  std::string toString() const;  // HOST:PORT, [V6]:PORT
  bool operator==(const HostPort&) const = default;
};

// Parses "HOST[:PORT]" or "[V6][:PORT]"; `default_port` when there is none. InvalidArgument
// naming `text` for an empty host, a bad port, or an IPv6 address without brackets.
Result<HostPort> parseHostPort(const std::string& text, int default_port);

// Parses --rdzv-endpoint's "HOST[:PORT][,HOST[:PORT]...]" (port 29400 where none is given; empty
// entries skipped). InvalidArgument quoting the flag's text for a bad entry, a repeated address, or
// none at all.
Result<std::vector<HostPort>> parseRdzvEndpoints(const std::string& text);

// The job token agents use when RALLY_TOKEN is not set: derived from --rdzv-id (anyone who knows
// the id can join; rally run warns about it).
std::string derivedJobToken(const std::string& job_id);

struct RunOptions {
  // Node and worker counts.
  std::uint32_t min_nodes = 1;
  std::uint32_t max_nodes = 1;
  std::string nproc_per_node = "1";  // as given: N, auto, cpu or gpu
  int local_world_size = 1;          // resolved

  // Rendezvous.
  std::string rdzv_backend = "rally";  // rally (c10d is an alias) or static
  // --rdzv-endpoint HOST[:PORT][,HOST[:PORT]...]: the first is where the job's coordinator starts
  // (the agent on that host hosts it); the others are standby addresses where it may be found
  // after its host was lost (the agent on such a host serves it there if it takes it over).
  // Agents that join later, or come back, look for the job's coordinator at all of them.
  std::vector<HostPort> rdzv_endpoints;
  std::string rdzv_endpoint;  // the first, as HOST:PORT
  std::string rdzv_id = "none";
  std::map<std::string, std::string> rdzv_conf;
  bool standalone = false;
  int node_rank = 0;  // static backend
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool master_port_given = false;

  // Workers.
  int max_restarts = 0;
  double monitor_interval = 5;  // accepted for compatibility; rally sees exits at once
  std::string start_method = "spawn";
  std::string role = "default";
  bool module = false;
  bool no_python = false;
  bool run_path = false;
  std::string log_dir;
  StdSpec redirects;
  StdSpec tee;
  std::optional<std::set<int>> local_ranks_filter;
  std::string local_addr;
  std::vector<int> signals_to_handle;
  std::string python = "python3";  // PYTHON_EXEC
  std::string script;
  std::vector<std::string> script_args;

  // rally's own.
  // restart: any worker failure stops the job's workers and restarts them (torchrun's way);
  // in-place: the survivors keep running and re-form the group themselves (programs that use
  // librally's World and ElasticState); the agent starts only a replacement for the failed worker.
  std::string recovery = "restart";
  bool inPlace() const { return recovery == "in-place"; }
  std::string fault_plan;  // --fault-plan FILE, checked and given to the workers as RALLY_FAULTS
  std::string node_id;
  std::string events_file;
  bool print_config = false;
  Tunables tunables = Tunables::defaults();

  // The worker's command line: python for .py targets and -m, the program itself otherwise.
  std::vector<std::string> command() const;
  bool staticBackend() const { return rdzv_backend == "static"; }
};

// Environment lookups, injectable for tests.
using Environment = std::map<std::string, std::string>;
Environment processEnvironment();

// Parses `args` (everything after `rally run`). Errors are InvalidArgument with one line; --help is
// reported as NotFound with the help text as the message.
Result<RunOptions> parseRunOptions(const std::vector<std::string>& args, const Environment& env);

// Parses --nnodes: "N" or "MIN:MAX" with 1 <= MIN <= MAX <= 1,000,000.
Status parseNnodes(const std::string& text, std::uint32_t* min, std::uint32_t* max);

// Parses "SIGTERM,SIGINT" or "15,2".
Result<std::vector<int>> parseSignals(const std::string& text);
const char* signalName(int sig);

// Number of GPUs visible (/dev/nvidiaN devices, limited by CUDA_VISIBLE_DEVICES), 0 without any.
int visibleGpuCount(const Environment& env);

}  // namespace rally::cli
