#include "launcher/cli/status_command.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <future>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "launcher/agent/coordinator_memory.h"
#include "launcher/cli/run_options.h"
#include "runtime/rendezvous/coordinator_client.h"

namespace rally::cli {
namespace {

namespace v1 = rally::v1;

struct StatusFlags {
  std::string endpoints;
  std::string job_id;
  std::string token_file;
  std::string state_dir;  // empty: RALLY_STATE_DIR, else the agents' default
  bool json = false;
  int timeout_ms = 2000;
};

const char* stateName(v1::GenerationEvent::State s) {
  switch (s) {
    case v1::GenerationEvent::WAITING:
      return "gathering its first round";
    case v1::GenerationEvent::FORMED:
      return "formed";
    case v1::GenerationEvent::REFORMING:
      return "re-forming";
    case v1::GenerationEvent::CLOSED:
      return "ended";
    default:
      return "unknown";
  }
}

int runStatus(const StatusFlags& f) {
  if (f.endpoints.empty()) {
    std::cerr << "rally status: give --rdzv-endpoint HOST[:PORT][,HOST[:PORT]...]\n";
    return 2;
  }
  auto endpoints = parseRdzvEndpoints(f.endpoints);
  if (!endpoints.ok()) {
    std::cerr << "rally status: " << endpoints.status().message() << "\n";
    return 2;
  }
  std::string token;
  if (!f.token_file.empty()) {
    auto t = rendezvous::readTokenFile(f.token_file);
    if (!t.ok()) {
      std::cerr << "rally status: " << t.status().message() << "\n";
      return 2;
    }
    token = *t;
  } else if (const char* t = std::getenv("RALLY_TOKEN"); t != nullptr && *t != '\0') {
    token = t;
  } else if (!f.job_id.empty()) {
    token = derivedJobToken(f.job_id);  // what agents use without RALLY_TOKEN
  } else {
    std::cerr << "rally status: no job token: set RALLY_TOKEN, or give --token-file, or "
                 "--rdzv-id for a job started without a token\n";
    return 2;
  }
  std::vector<std::string> addresses;
  for (const HostPort& e : *endpoints) addresses.push_back(e.toString());
  const size_t listed = addresses.size();
  // What this host's agents of the job remember (rally run --state-dir): a coordinator that moved
  // to a node --rdzv-endpoint does not list is found there.
  if (!f.job_id.empty()) {
    std::string dir = f.state_dir;
    if (dir.empty()) {
      if (const char* d = std::getenv("RALLY_STATE_DIR"); d != nullptr) dir = d;
    }
    auto memory = agent::CoordinatorMemory::open(
        dir, f.job_id, agent::CoordinatorMemory::jobKey(addresses.front(), token),
        /*create=*/false);
    if (!memory.ok() && !f.json) {
      std::cerr << "rally status: not asking where this host last saw the job: "
                << memory.status().message() << "\n";
    }
    if (memory.ok()) {
      for (const std::string& e : memory->recall()) {
        if (std::find(addresses.begin(), addresses.end(), e) == addresses.end()) {
          addresses.push_back(e);
        }
      }
    }
  }
  // Every address at once, each on its own thread: one slow to answer (up to --timeout-ms) costs
  // that once, not once per address. Reported in order.
  std::vector<std::future<Result<v1::RoundInfo>>> answers;
  for (const std::string& endpoint : addresses) {
    answers.push_back(std::async(std::launch::async, [endpoint, &token, &f] {
      return rendezvous::probeRound({.endpoint = endpoint, .token = token},
                                    Milliseconds(f.timeout_ms));
    }));
  }
  nlohmann::json out = nlohmann::json::array();
  bool found = false;
  for (size_t i = 0; i < addresses.size(); ++i) {
    const std::string& endpoint = addresses[i];
    const bool remembered = i >= listed;
    nlohmann::json j = {{"endpoint", endpoint}, {"remembered", remembered}};
    auto round = answers[i].get();
    const Status st = round.status();
    if (!st.ok() && remembered) continue;  // an old address of the job's: news only if it serves
    if (!st.ok()) {
      j["answer"] = st.code() == StatusCode::kUnauthenticated ? "refuses the token" : "none";
      j["error"] = st.message();
      if (!f.json) {
        std::cout << fmt::format("{}: {}: {}\n", endpoint,
                                 st.code() == StatusCode::kUnauthenticated
                                     ? "a coordinator that refuses the token"
                                     : "no coordinator answers",
                                 st.message());
      }
      out.push_back(j);
      continue;
    }
    const v1::RoundInfo& info = *round;
    const bool ours = f.job_id.empty() || info.job_id().empty() || info.job_id() == f.job_id;
    found = found || ours;
    j["answer"] = ours ? "serves" : "another job";
    j["job_id"] = info.job_id();
    j["generation"] = info.generation();
    j["state"] = v1::GenerationEvent::State_Name(info.state());
    j["waiting"] = info.waiting();
    j["members"] = nlohmann::json::array();
    for (const auto& m : info.members()) {
      j["members"].push_back({{"node_rank", m.node_rank()},
                              {"node_id", m.node_id()},
                              {"address", m.address()},
                              {"local_world_size", m.local_world_size()},
                              {"standby_endpoint", m.standby_endpoint()}});
    }
    out.push_back(j);
    if (f.json) continue;
    std::uint32_t workers = 0;
    for (const auto& m : info.members()) workers += m.local_world_size();
    std::cout << fmt::format(
        "{}{}: job '{}'{}, generation {}, {}; {} node(s), {} worker(s); {} "
        "waiting\n",
        endpoint,
        remembered ? " (where this host last saw the job's coordinator or successors)" : "",
        info.job_id(), ours ? "" : " (not this job)", info.generation(), stateName(info.state()),
        info.members_size(), workers, info.waiting());
    for (const auto& m : info.members()) {
      std::cout << fmt::format(
          "  node rank {:>3}  {}  at {}  {} worker(s){}\n", m.node_rank(), m.node_id(), m.address(),
          m.local_world_size(),
          m.standby_endpoint().empty() ? "" : fmt::format("  standby {}", m.standby_endpoint()));
    }
  }
  if (f.json) std::cout << out.dump(2) << "\n";
  if (!found && !f.json) {
    std::cerr << "rally status: no coordinator of "
              << (f.job_id.empty() ? std::string("the job") : "job '" + f.job_id + "'")
              << " answers at " << f.endpoints << "\n";
  }
  return found ? 0 : 1;
}

}  // namespace

void addStatusCommand(CLI::App& app, std::function<int()>* run) {
  auto flags = std::make_shared<StatusFlags>();
  CLI::App* cmd = app.add_subcommand(
      "status",
      "Ask a job's coordinator (at each address of --rdzv-endpoint, and with --rdzv-id where this "
      "host's agents last saw it or its successors) for its round: generation, members, waiting "
      "nodes");
  cmd->add_option("--rdzv-endpoint,--rdzv_endpoint", flags->endpoints,
                  "HOST[:PORT][,HOST[:PORT]...]: where the coordinator may be [port 29400]")
      ->required();
  cmd->add_option("--rdzv-id,--rdzv_id,--job-id", flags->job_id,
                  "The job's id: another job's coordinator does not count; without RALLY_TOKEN "
                  "or --token-file, the token agents derive from it");
  cmd->add_option("--token-file", flags->token_file, "File holding the job token (first line)");
  cmd->add_option("--state-dir", flags->state_dir,
                  "With --rdzv-id: where this host's agents remember the job's coordinator and "
                  "successors (rally run --state-dir); those addresses are asked too [env "
                  "RALLY_STATE_DIR, else /var/tmp/rally-UID]");
  cmd->add_flag("--json", flags->json,
                "One JSON array, an object per address (\"remembered\": from this host's memory)");
  cmd->add_option("--timeout-ms", flags->timeout_ms,
                  "How long each address gets to answer (all are asked at once)")
      ->capture_default_str()
      ->check(CLI::Range(1, 600000));
  cmd->callback([flags, run] { *run = [flags] { return runStatus(*flags); }; });
}

}  // namespace rally::cli
