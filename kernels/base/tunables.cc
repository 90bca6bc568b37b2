#include "kernels/base/tunables.h"

#include <fmt/format.h>

#include <cstdlib>
#include <ostream>

namespace rally {
namespace {

constexpr TunableSpec kSpecs[] = {
    {"log_level", "RALLY_LOG_LEVEL", TunableKind::kString, "info",
     "log level, optionally per subsystem: 'info,coordinator=debug,agent=warn'"},
    {"heartbeat_interval", "RALLY_HEARTBEAT_INTERVAL", TunableKind::kDuration, "1s",
     "heartbeat interval: agents beat twice per interval; a silent node is failed within 2 "
     "intervals"},
    {"last_call", "RALLY_LAST_CALL", TunableKind::kDuration, "2s",
     "once MIN nodes have joined a first round, how long to wait for more before it closes"},
    {"join_timeout", "RALLY_JOIN_TIMEOUT", TunableKind::kDuration, "600s",
     "how long a round may wait for MIN nodes before its joiners are told it failed"},
    {"rpc_timeout", "RALLY_RPC_TIMEOUT", TunableKind::kDuration, "30s",
     "deadline of one call to the coordinator (store operations, joins)"},
    {"connect_timeout", "RALLY_CONNECT_TIMEOUT", TunableKind::kDuration, "60s",
     "how long clients keep retrying, with backoff, to reach an unavailable coordinator"},
    {"failover_timeout", "RALLY_FAILOVER_TIMEOUT", TunableKind::kDuration, "10s",
     "when the host of a job's coordinator (an agent's embedded one) is lost, the first live one "
     "of the round's next nodes takes it over: the k-th is waited for until k times this after "
     "the loss; 0: no takeover, and no waiting for a restarted standalone coordinator either "
     "(the job stops)"},
    {"state_dir", "RALLY_STATE_DIR", TunableKind::kString, "",
     "where each host remembers, per job, the addresses where its coordinator serves and would "
     "be taken over, so that an agent started again there finds the job where it moved (made "
     "0700 if missing; must be writable by this user alone); empty: /var/tmp/rally-<uid>"},
    {"max_message_bytes", "RALLY_MAX_MESSAGE_BYTES", TunableKind::kBytes, "4MiB",
     "largest request or response the coordinator accepts"},
    {"max_keys", "RALLY_MAX_KEYS", TunableKind::kInteger, "1000000",
     "most keys the coordinator's store holds at once, all generations together"},
    {"max_key_bytes", "RALLY_MAX_KEY_BYTES", TunableKind::kBytes, "1KiB",
     "longest key the store accepts"},
    {"max_value_bytes", "RALLY_MAX_VALUE_BYTES", TunableKind::kBytes, "1MiB",
     "largest value the store accepts"},
    {"grace_period", "RALLY_GRACE_PERIOD", TunableKind::kDuration, "30s",
     "after forwarding a signal to workers, how long to wait before SIGKILL (torchrun: fixed 30s)"},
    {"exit_barrier_timeout", "RALLY_EXIT_BARRIER_TIMEOUT", TunableKind::kDuration, "300s",
     "how long a node whose workers finished waits for the others (torchrun: fixed 300s)"},
    {"hang_timeout", "RALLY_HANG_TIMEOUT", TunableKind::kDuration, "10s",
     "a worker stopped this long (SIGSTOP, state T) is hung: its agent kills it and handles it "
     "as a failure; 0 turns the check off"},
    {"progress_timeout", "RALLY_PROGRESS_TIMEOUT", TunableKind::kDuration, "0s",
     "a worker whose step (ElasticRun::atStep) has not moved for this long while it is not waiting "
     "in a collective is hung (a deadlock, an endless loop): its agent kills it and handles it as "
     "a failure; 0 turns the watchdog off. Set it to a few times the slowest step"},
    {"checkpoint_dir", "RALLY_CHECKPOINT_DIR", TunableKind::kString, "",
     "ElasticRun saves every checkpoint_every-th commit here in the background, and a job that "
     "starts with no commit in memory resumes from the newest checkpoint here; empty: off"},
    {"checkpoint_every", "RALLY_CHECKPOINT_EVERY", TunableKind::kInteger, "10",
     "with checkpoint_dir: save every N-th commit (commit numbers, the same on every rank)"},
    {"checkpoint_keep", "RALLY_CHECKPOINT_KEEP", TunableKind::kInteger, "3",
     "with checkpoint_dir: how many complete checkpoints to keep, newest first; 0: all"},
    {"trace_dir", "RALLY_TRACE_DIR", TunableKind::kString, "",
     "each worker writes its recent collectives here as a Chrome trace (collectives-*.json; "
     "`rally trace DIR` merges them and names the ranks a job waits for); empty: off"},
    {"trace_buffer", "RALLY_TRACE_BUFFER", TunableKind::kInteger, "2000",
     "how many of its newest collectives each worker keeps for the trace and a failure's log"},
    {"metrics_dir", "RALLY_METRICS_DIR", TunableKind::kString, "",
     "workers (librally) and agents write their metrics here in the Prometheus text format "
     "(rally-*.prom, for node_exporter's textfile collector); empty: off"},
    {"telemetry_interval", "RALLY_TELEMETRY_INTERVAL", TunableKind::kDuration, "10s",
     "how often workers rewrite their trace_dir and metrics_dir files (also at once when the job "
     "moves past their generation, and at a clean exit)"},
};

}  // namespace

std::span<const TunableSpec> tunableSpecs() { return kSpecs; }

Tunables Tunables::defaults() {
  Tunables t;
  for (const auto& spec : kSpecs) {
    t.values_[std::string(spec.name)] = {std::string(spec.default_value), "default"};
  }
  return t;
}

Result<Tunables> Tunables::fromEnvironment() {
  Tunables t = defaults();
  for (const auto& spec : kSpecs) {
    const std::string env(spec.env);
    if (const char* v = std::getenv(env.c_str()); v != nullptr && *v != '\0') {
      RALLY_RETURN_IF_ERROR(t.set(spec.name, v, "env " + env));
    }
  }
  return t;
}

Status Tunables::set(std::string_view name, std::string value, std::string source) {
  const TunableSpec* spec = nullptr;
  for (const auto& s : kSpecs) {
    if (s.name == name) spec = &s;
  }
  if (spec == nullptr) return invalidArgument(fmt::format("unknown tunable '{}'", name));
  Status valid;
  switch (spec->kind) {
    case TunableKind::kString:
      break;
    case TunableKind::kInteger:
      valid = parseInteger(value).status();
      break;
    case TunableKind::kDuration:
      valid = parseDuration(value).status();
      break;
    case TunableKind::kBytes:
      valid = parseBytes(value).status();
      break;
  }
  RALLY_RETURN_IF_ERROR(valid) << "in " << source << " (" << spec->doc << ")";
  values_[std::string(name)] = {std::move(value), std::move(source)};
  return okStatus();
}

Result<const TunableSpec*> Tunables::find(std::string_view name, TunableKind kind) const {
  for (const auto& s : kSpecs) {
    if (s.name == name) {
      if (s.kind != kind) {
        return internalError(fmt::format("tunable '{}' read with the wrong kind", name));
      }
      return &s;
    }
  }
  return internalError(fmt::format("unknown tunable '{}'", name));
}

Result<std::string> Tunables::string(std::string_view name) const {
  RALLY_RETURN_IF_ERROR(find(name, TunableKind::kString));
  return values_.find(name)->second.text;
}

Result<std::int64_t> Tunables::integer(std::string_view name) const {
  RALLY_RETURN_IF_ERROR(find(name, TunableKind::kInteger));
  return parseInteger(values_.find(name)->second.text);
}

Result<Milliseconds> Tunables::duration(std::string_view name) const {
  RALLY_RETURN_IF_ERROR(find(name, TunableKind::kDuration));
  return parseDuration(values_.find(name)->second.text);
}

Result<std::int64_t> Tunables::bytes(std::string_view name) const {
  RALLY_RETURN_IF_ERROR(find(name, TunableKind::kBytes));
  return parseBytes(values_.find(name)->second.text);
}

void Tunables::print(std::ostream& out) const {
  out << fmt::format("{:<20} {:<12} {:<24} {:<26} {}\n", "tunable", "value", "from", "environment",
                     "meaning");
  for (const auto& spec : kSpecs) {
    const auto it = values_.find(spec.name);
    out << fmt::format("{:<20} {:<12} {:<24} {:<26} {}\n", spec.name, it->second.text,
                       it->second.source, spec.env, spec.doc);
  }
}

}  // namespace rally
