// What happened when workers failed: one record per failed worker, shared between agents through
// the coordinator's store (JSON), and a report whose root cause is the first failure by time across
// the job.
//
//   WorkerFailure f = WorkerFailure::from(exit, ctx);    // on the node where it happened
//   store.set("failures/...", f.toJson().dump());
//   std::cout << formatReport(all_failures_of_the_job);
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "launcher/agent/worker_group.h"

namespace rally::agent {

struct WorkerFailure {
  std::string time;  // ISO 8601, for ordering and display
  std::string node_id;
  std::string host;
  int node_rank = 0;
  int local_rank = 0;
  int global_rank = 0;
  int exit_code = 0;
  std::string signal;  // "SIGKILL", empty if it exited
  bool oom_killed = false;
  std::string error_message;  // from the worker's error file (PyTorch's @record), if written
  std::string error_traceback;
  std::vector<std::string> stderr_tail;
  std::uint64_t generation = 0;
  int restart = 0;

  nlohmann::json toJson() const;
  static WorkerFailure fromJson(const nlohmann::json& j);
  std::string describe() const;  // "exit code 3" / "signal SIGKILL (OOM killer)"
};

// Reads PyTorch's error file ({"message": {"message": ..., "extraInfo": {"py_callstack": ...}}}),
// or a plain {"message": "..."}; false if absent or unreadable.
bool readErrorFile(const std::string& path, std::string* message, std::string* traceback);

// The report printed when a job fails: the root cause (earliest failure) in full, then a line for
// every other failure.
std::string formatReport(std::vector<WorkerFailure> failures, const std::string& headline);

}  // namespace rally::agent
