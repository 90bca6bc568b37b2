// The agent's JSON-lines event log (`rally run --events FILE`): one object per line with the time,
// the node and the event, e.g. {"time":"2026-11-22T03:40:01.123Z","node":"n0","event":
// "worker_exited","local_rank":1,"exit_code":3}. Appends; several agents may share one file.
//
// Thread-safety: write() is thread-safe.
#pragma once

#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "kernels/base/status.h"

namespace rally::agent {

class EventLog {
 public:
  // An empty path gives a log that writes nothing.
  static Result<std::unique_ptr<EventLog>> open(const std::string& path, std::string node_id);
  void write(const std::string& event, nlohmann::json fields = nlohmann::json::object());

 private:
  EventLog() = default;
  std::mutex mu_;
  std::ofstream out_;
  std::string node_id_;
};

// "2026-11-22T03:40:01.123Z"
std::string isoTime(std::chrono::system_clock::time_point t);

}  // namespace rally::agent
