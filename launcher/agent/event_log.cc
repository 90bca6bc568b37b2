#include "launcher/agent/event_log.h"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <filesystem>
#include <system_error>

namespace rally::agent {

std::string isoTime(std::chrono::system_clock::time_point t) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count() % 1000;
  return fmt::format("{:%Y-%m-%dT%H:%M:%S}.{:03}Z",
                     fmt::gmtime(std::chrono::system_clock::to_time_t(t)), ms);
}

Result<std::unique_ptr<EventLog>> EventLog::open(const std::string& path, std::string node_id) {
  std::unique_ptr<EventLog> log(new EventLog());
  log->node_id_ = std::move(node_id);
  if (!path.empty()) {
    // Its directory is made, as --log-dir's is: a fresh volume need not hold it yet.
    const std::filesystem::path parent = std::filesystem::path(path).parent_path();
    std::error_code ec;
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    if (ec) {
      return errnoStatus(
          fmt::format("--events: cannot create the directory {} for {}", parent.string(), path),
          ec.value());
    }
    log->out_.open(path, std::ios::app);
    if (!log->out_) return errnoStatus(fmt::format("--events: cannot open {}", path), errno);
  }
  return log;
}

void EventLog::write(const std::string& event, nlohmann::json fields) {
  std::lock_guard lock(mu_);
  if (!out_.is_open()) return;
  nlohmann::json line = {
      {"time", isoTime(std::chrono::system_clock::now())}, {"node", node_id_}, {"event", event}};
  for (auto& [k, v] : fields.items()) line[k] = v;
  out_ << line.dump() << '\n';
  out_.flush();
}

}  // namespace rally::agent
