#include "runtime/faults/fault_plan.h"

#include <fmt/format.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace rally {
namespace {

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

Result<std::int64_t> parseInt(const std::string& value, const std::string& key, std::int64_t min) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno != 0 || v < min) {
    return invalidArgument(
        fmt::format("{}={} is not a whole number of at least {}", key, value, min));
  }
  return static_cast<std::int64_t>(v);
}

Result<Fault> parseLine(const std::string& line, int number) {
  std::istringstream words(line);
  std::string action;
  words >> action;
  Fault f;
  f.line = number;
  if (action == "kill") {
    f.action = Fault::Action::kKill;
  } else if (action == "hang") {
    f.action = Fault::Action::kHang;
  } else if (action == "delay") {
    f.action = Fault::Action::kDelay;
  } else if (action == "fail") {
    f.action = Fault::Action::kFail;
  } else if (action == "stall") {
    f.action = Fault::Action::kStall;
  } else {
    return invalidArgument(
        fmt::format("unknown action '{}' (one of kill, hang, delay, fail, stall)", action));
  }
  bool has_target = false, has_for = false;
  for (std::string word; words >> word;) {
    const auto eq = word.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == word.size()) {
      return invalidArgument(fmt::format("'{}' is not key=value (e.g. rank=1, step=20)", word));
    }
    const std::string key = word.substr(0, eq), value = word.substr(eq + 1);
    if (key == "rank" || key == "node") {
      if (has_target) return invalidArgument("a fault has one target: rank=R or node=N, not both");
      has_target = true;
      f.target = key == "rank" ? Fault::Target::kRank : Fault::Target::kNode;
      RALLY_ASSIGN_OR_RETURN(const std::int64_t i, parseInt(value, key, 0));
      f.index = static_cast<int>(i);
    } else if (key == "step") {
      RALLY_ASSIGN_OR_RETURN(const std::int64_t s, parseInt(value, key, 0));
      f.step = s;
    } else if (key == "recovery") {
      RALLY_ASSIGN_OR_RETURN(const std::int64_t n, parseInt(value, key, 1));
      f.recovery = n;
    } else if (key == "commit") {
      RALLY_ASSIGN_OR_RETURN(const std::int64_t k, parseInt(value, key, 1));
      f.commit = k;
    } else if (key == "time") {
      auto t = parseDuration(value);
      if (!t.ok()) return invalidArgument(fmt::format("time={}: {}", value, t.status().message()));
      f.time = *t;
    } else if (key == "for") {
      auto t = parseDuration(value);
      if (!t.ok()) return invalidArgument(fmt::format("for={}: {}", value, t.status().message()));
      f.delay = *t;
      has_for = true;
    } else if (key == "code") {
      RALLY_ASSIGN_OR_RETURN(const std::int64_t c, parseInt(value, key, 1));
      if (c > 255)
        return invalidArgument(fmt::format("code={} is not an exit code (1-255)", value));
      f.exit_code = static_cast<int>(c);
    } else {
      return invalidArgument(fmt::format(
          "unknown key '{}' (rank, node, step, recovery, commit, time, for, code)", key));
    }
  }
  if (!has_target) return invalidArgument("no target: add rank=R (a worker) or node=N (a node)");
  if (int{f.step.has_value()} + int{f.time.has_value()} + int{f.recovery.has_value()} +
          int{f.commit.has_value()} !=
      1) {
    return invalidArgument(
        "give exactly one trigger: step=S (a step boundary), recovery=N (during the N-th "
        "recovery), commit=K (at the commit point taking commit K) or time=T (e.g. 5s)");
  }
  if (f.target == Fault::Target::kNode && f.action != Fault::Action::kKill) {
    return invalidArgument(
        fmt::format("a node can only be killed (kill node=N), not '{}'", action));
  }
  if (f.target == Fault::Target::kNode && !f.time && !f.commit) {
    return invalidArgument(
        "a node fault needs time=T or commit=K: nodes have no steps (use rank=R for step= and "
        "recovery=)");
  }
  if (f.action == Fault::Action::kStall && f.time) {
    return invalidArgument(
        "stall happens inside the worker (it stops making progress but keeps running): use "
        "step=S, recovery=N or commit=K, not time=T");
  }
  if (f.action == Fault::Action::kDelay && (!has_for || f.delay.count() <= 0)) {
    return invalidArgument("delay needs for=D, a positive duration (e.g. for=500ms)");
  }
  if (f.action != Fault::Action::kDelay && has_for) {
    return invalidArgument("for=D is only for delay");
  }
  if (f.action != Fault::Action::kFail && f.exit_code != 1) {
    return invalidArgument("code=N is only for fail");
  }
  return f;
}

}  // namespace

std::string_view faultActionName(Fault::Action a) {
  switch (a) {
    case Fault::Action::kKill:
      return "kill";
    case Fault::Action::kHang:
      return "hang";
    case Fault::Action::kDelay:
      return "delay";
    case Fault::Action::kFail:
      return "fail";
    case Fault::Action::kStall:
      return "stall";
  }
  return "?";
}

std::string Fault::describe() const {
  std::string s = fmt::format("{} {}={}", faultActionName(action),
                              target == Target::kRank ? "rank" : "node", index);
  if (step) s += fmt::format(" step={}", *step);
  if (recovery) s += fmt::format(" recovery={}", *recovery);
  if (commit) s += fmt::format(" commit={}", *commit);
  if (time) s += fmt::format(" time={}", formatDuration(*time));
  if (action == Action::kDelay) s += fmt::format(" for={}", formatDuration(delay));
  if (action == Action::kFail) s += fmt::format(" code={}", exit_code);
  return s;
}

Result<FaultPlan> FaultPlan::parse(const std::string& text, const std::string& source) {
  FaultPlan plan;
  int number = 0;
  std::string line;
  for (std::istringstream lines(text); std::getline(lines, line);) {
    ++number;
    // ';' separates faults on one line (RALLY_FAULTS); '#' starts a comment.
    line = line.substr(0, line.find('#'));
    std::istringstream parts(line);
    for (std::string part; std::getline(parts, part, ';');) {
      part = trim(part);
      if (part.empty()) continue;
      auto f = parseLine(part, number);
      if (!f.ok()) {
        return invalidArgument(fmt::format("fault plan {} line {}: '{}': {}", source, number, part,
                                           f.status().message()));
      }
      plan.faults_.push_back(*f);
    }
  }
  return plan;
}

Result<FaultPlan> FaultPlan::fromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return errnoStatus(fmt::format("opening fault plan {}", path), errno);
  std::stringstream text;
  text << in.rdbuf();
  return parse(text.str(), path);
}

Result<FaultPlan> FaultPlan::fromEnvironment() {
  const char* v = std::getenv("RALLY_FAULTS");
  if (v == nullptr) return FaultPlan{};
  return parse(v, "RALLY_FAULTS");
}

std::string FaultPlan::toText() const {
  std::string out;
  for (const Fault& f : faults_) out += f.describe() + "\n";
  return out;
}

}  // namespace rally
