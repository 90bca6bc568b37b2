#include "launcher/agent/failure_report.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace rally::agent {

nlohmann::json WorkerFailure::toJson() const {
  return {{"time", time},
          {"node_id", node_id},
          {"host", host},
          {"node_rank", node_rank},
          {"local_rank", local_rank},
          {"global_rank", global_rank},
          {"exit_code", exit_code},
          {"signal", signal},
          {"oom_killed", oom_killed},
          {"error_message", error_message},
          {"error_traceback", error_traceback},
          {"stderr_tail", stderr_tail},
          {"generation", generation},
          {"restart", restart}};
}

WorkerFailure WorkerFailure::fromJson(const nlohmann::json& j) {
  WorkerFailure f;
  f.time = j.value("time", "");
  f.node_id = j.value("node_id", "");
  f.host = j.value("host", "");
  f.node_rank = j.value("node_rank", 0);
  f.local_rank = j.value("local_rank", 0);
  f.global_rank = j.value("global_rank", 0);
  f.exit_code = j.value("exit_code", 0);
  f.signal = j.value("signal", "");
  f.oom_killed = j.value("oom_killed", false);
  f.error_message = j.value("error_message", "");
  f.error_traceback = j.value("error_traceback", "");
  f.stderr_tail = j.value("stderr_tail", std::vector<std::string>());
  f.generation = j.value("generation", std::uint64_t{0});
  f.restart = j.value("restart", 0);
  return f;
}

std::string WorkerFailure::describe() const {
  if (!signal.empty()) {
    return fmt::format("signal {}{}", signal,
                       oom_killed ? " (killed by the kernel's OOM killer)" : "");
  }
  return fmt::format("exit code {}", exit_code);
}

bool readErrorFile(const std::string& path, std::string* message, std::string* traceback) {
  std::ifstream in(path);
  if (!in) return false;
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    const auto& m = j.at("message");
    if (m.is_string()) {
      *message = m.get<std::string>();
      return true;
    }
    *message = m.value("message", "");
    if (m.contains("extraInfo")) *traceback = m["extraInfo"].value("py_callstack", "");
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

std::string formatReport(std::vector<WorkerFailure> failures, const std::string& headline) {
  std::sort(failures.begin(), failures.end(),
            [](const WorkerFailure& a, const WorkerFailure& b) { return a.time < b.time; });
  std::ostringstream out;
  const std::string rule(72, '=');
  out << rule << "\n" << headline << "\n" << std::string(72, '-') << "\n";
  if (failures.empty()) {
    out << "no worker failure was recorded\n" << rule << "\n";
    return out.str();
  }
  const WorkerFailure& root = failures.front();
  out << "root cause (first failure by time):\n";
  out << fmt::format("  time        : {}\n", root.time);
  out << fmt::format("  host        : {}, node '{}'\n", root.host, root.node_id);
  out << fmt::format("  ranks       : node {}, local {}, global {}\n", root.node_rank,
                     root.local_rank, root.global_rank);
  out << fmt::format("  exit        : {}\n", root.describe());
  out << fmt::format("  generation  : {} (restart {})\n", root.generation, root.restart);
  if (!root.error_message.empty()) {
    out << fmt::format("  error file  : {}\n", root.error_message);
    std::istringstream tb(root.error_traceback);
    for (std::string line; std::getline(tb, line);) out << "                " << line << "\n";
  }
  if (!root.stderr_tail.empty()) {
    out << "  stderr (last lines):\n";
    for (const auto& line : root.stderr_tail) out << "    " << line << "\n";
  }
  if (failures.size() > 1) {
    out << "other failures:\n";
    for (size_t i = 1; i < failures.size(); ++i) {
      const auto& f = failures[i];
      out << fmt::format("  {}  node {} local {} global {}: {}\n", f.time, f.node_rank,
                         f.local_rank, f.global_rank, f.describe());
    }
  }
  out << rule << "\n";
  return out.str();
}

}  // namespace rally::agent
