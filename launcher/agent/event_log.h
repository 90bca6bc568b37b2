// The agent's JSON-lines event log (`rally run --events FILE`): one object per line with the time,
// the node and the event, e.g. {"time":"2026-11-22T03:40:01.123Z","node":"n0","event":
// "worker_exited","local_rank":1,"exit_code":3}. Appends; several agents may share one file.
//
// With a metrics file (`rally run --metrics-dir`), each event also updates the node's metrics in
// the Prometheus text format, rewritten whole at every event: rally_agent_events_total{event}, and
// the generation, world size, node rank and job restart count of the newest round this node's
// workers were started or re-formed in.
//
// Thread-safety: write() is thread-safe.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "kernels/base/status.h"

namespace rally::agent {

class EventLog {
 public:
  // An empty path gives a log that writes no lines; an empty metrics_path, no metrics. `labels`
  // are added to every metric sample.
  static Result<std::unique_ptr<EventLog>> open(const std::string& path, std::string node_id,
                                                std::string metrics_path = "",
                                                std::map<std::string, std::string> labels = {});
  void write(const std::string& event, nlohmann::json fields = nlohmann::json::object());
  // The metrics file's text now.
  std::string metricsText() const;

 private:
  EventLog() = default;
  std::string metricsTextLocked() const;
  mutable std::mutex mu_;
  std::ofstream out_;
  std::string node_id_;
  std::string metrics_path_;
  std::map<std::string, std::string> labels_;
  std::map<std::string, std::uint64_t> counts_;  // event -> how many
  std::map<std::string, std::int64_t> gauges_;   // generation, world_size, node_rank, restart
  bool metrics_warned_ = false;
  std::string metrics_text_;  // the newest, with metrics_version_
  std::uint64_t metrics_version_ = 0, written_version_ = 0;
  std::mutex write_mu_;  // held by the one thread writing the metrics file
  void writeMetrics();
};

// "2026-11-22T03:40:01.123Z"
std::string isoTime(std::chrono::system_clock::time_point t);

}  // namespace rally::agent
