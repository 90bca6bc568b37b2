#include "launcher/agent/event_log.h"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <filesystem>
#include <system_error>

#include "kernels/base/logging.h"
#include "kernels/base/telemetry_files.h"

namespace rally::agent {
namespace {

// The gauges taken from the events that describe this node's round: the event's field, the metric.
struct RoundGauge {
  const char* field;
  const char* metric;
  const char* help;
};
constexpr RoundGauge kRoundGauges[] = {
    {"generation", "rally_agent_generation",
     "The newest generation this node's workers were started or re-formed in."},
    {"world_size", "rally_agent_world_size", "The job's world size in that generation."},
    {"node_rank", "rally_agent_node_rank", "This node's rank in that generation."},
    {"restart", "rally_agent_job_restarts",
     "The job's restart count when this node last started its workers."}};

}  // namespace

std::string isoTime(std::chrono::system_clock::time_point t) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count() % 1000;
  return fmt::format("{:%Y-%m-%dT%H:%M:%S}.{:03}Z",
                     fmt::gmtime(std::chrono::system_clock::to_time_t(t)), ms);
}

Result<std::unique_ptr<EventLog>> EventLog::open(const std::string& path, std::string node_id,
                                                 std::string metrics_path,
                                                 std::map<std::string, std::string> labels) {
  std::unique_ptr<EventLog> log(new EventLog());
  log->node_id_ = std::move(node_id);
  log->metrics_path_ = std::move(metrics_path);
  log->labels_ = std::move(labels);
  if (!log->metrics_path_.empty()) {
    RALLY_RETURN_IF_ERROR(writeFileReplacing(log->metrics_path_, log->metricsText()))
        << "--metrics-dir";
  }
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
  std::unique_lock lock(mu_);
  if (!metrics_path_.empty()) {
    ++counts_[event];
    // Only the events that describe this node's own round set the gauges (a failure report may
    // carry another node's rank).
    const bool round = event == "workers_started" || event == "round_reformed_in_place";
    for (const RoundGauge& g : kRoundGauges) {
      if (!round) break;
      if (auto it = fields.find(g.field); it != fields.end() && it->is_number_integer()) {
        gauges_[g.field] = it->get<std::int64_t>();
      }
    }
    metrics_text_ = metricsTextLocked();
    ++metrics_version_;
  }
  nlohmann::json line = {
      {"time", isoTime(std::chrono::system_clock::now())}, {"node", node_id_}, {"event", event}};
  for (auto& [k, v] : fields.items()) line[k] = v;
  if (out_.is_open()) {
    out_ << line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    out_.flush();
  }
  lock.unlock();
  writeMetrics();
}

void EventLog::writeMetrics() {
  // One writer at a time, outside mu_: a slow metrics directory holds up no thread but the one
  // writing, which writes the newest text until none is newer than what it wrote. A thread that
  // finds the writer busy leaves its text to it; the writer looks again after letting go.
  for (;;) {
    {
      std::unique_lock writer(write_mu_, std::try_to_lock);
      if (!writer.owns_lock()) return;
      for (;;) {
        std::string text;
        std::uint64_t version;
        {
          std::lock_guard lock(mu_);
          if (metrics_path_.empty() || metrics_version_ == written_version_) break;
          text = metrics_text_;
          version = metrics_version_;
        }
        const Status s = writeFileReplacing(metrics_path_, text);
        std::lock_guard lock(mu_);
        written_version_ = version;
        if (!s.ok() && !metrics_warned_) {
          metrics_warned_ = true;  // once: the events go on
          log::get("agent")->warn("the node's metrics file was not written: {}", s.toString());
        }
      }
    }
    std::lock_guard lock(mu_);
    if (metrics_path_.empty() || metrics_version_ == written_version_) return;
  }
}

std::string EventLog::metricsText() const {
  std::lock_guard lock(mu_);
  return metricsTextLocked();
}

std::string EventLog::metricsTextLocked() const {
  const std::string l = prometheusLabels(labels_);
  std::string out = prometheusHeader("rally_agent_events_total", "counter",
                                     "Events this node's agent recorded (the --events names).");
  for (const auto& [event, n] : counts_) {
    auto labels = labels_;
    labels["event"] = event;
    out += fmt::format("rally_agent_events_total{} {}\n", prometheusLabels(labels), n);
  }
  for (const RoundGauge& g : kRoundGauges) {
    if (auto it = gauges_.find(g.field); it != gauges_.end()) {
      out += prometheusHeader(g.metric, "gauge", g.help) +
             fmt::format("{}{} {}\n", g.metric, l, it->second);
    }
  }
  out +=
      prometheusHeader("rally_agent_timestamp_seconds", "gauge",
                       "When this file was written (Unix time).") +
      fmt::format("rally_agent_timestamp_seconds{} {:.3f}\n", l,
                  std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
                      .count());
  return out;
}

}  // namespace rally::agent
