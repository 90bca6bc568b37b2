// The one registry of rally's tunables: name, environment variable, default and a one-line doc
// (in the manner of NCCL_PARAM). Values are read once from the environment into a Tunables object
// that the caller owns and passes on; command-line flags override them with set(). The whole table
// is printable (`rally coordinator --print-config`).
//
//   RALLY_ASSIGN_OR_RETURN(rally::Tunables t, rally::Tunables::fromEnvironment());
//   RALLY_RETURN_IF_ERROR(t.set("last_call", "500ms", "--last-call"));
//   RALLY_ASSIGN_OR_RETURN(auto last_call, t.duration("last_call"));
//
// Add knobs reluctantly: each one is a question every user must be able to answer.
//
// Thread-safety: const methods may be called concurrently; set() must not race with readers.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <map>
#include <span>
#include <string>
#include <string_view>

#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally {

enum class TunableKind { kString, kInteger, kDuration, kBytes };

struct TunableSpec {
  std::string_view name;  // "heartbeat_interval"
  std::string_view env;   // "RALLY_HEARTBEAT_INTERVAL"
  TunableKind kind;
  std::string_view default_value;  // "1s"
  std::string_view doc;
};

// Every tunable rally has, in the order --print-config shows them.
std::span<const TunableSpec> tunableSpecs();

class Tunables {
 public:
  // Defaults only; ignores the environment (for tests and embedding).
  static Tunables defaults();
  // Defaults overridden by each tunable's environment variable, validated.
  static Result<Tunables> fromEnvironment();

  // Overrides one tunable; `source` names where the value came from for messages and printing.
  Status set(std::string_view name, std::string value, std::string source);

  Result<std::string> string(std::string_view name) const;
  Result<std::int64_t> integer(std::string_view name) const;
  Result<Milliseconds> duration(std::string_view name) const;
  Result<std::int64_t> bytes(std::string_view name) const;

  // A table: name, value, where it came from, environment variable, doc.
  void print(std::ostream& out) const;

 private:
  struct Value {
    std::string text;
    std::string source;  // "default", "env RALLY_X", "--flag"
  };
  Result<const TunableSpec*> find(std::string_view name, TunableKind kind) const;
  std::map<std::string, Value, std::less<>> values_;
};

}  // namespace rally
