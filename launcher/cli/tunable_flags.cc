#include "launcher/cli/tunable_flags.h"

#include <fmt/format.h>

#include <algorithm>

namespace rally::cli {

void addTunableFlags(CLI::App* cmd, std::map<std::string, std::string>* values) {
  for (const TunableSpec& spec : tunableSpecs()) {
    std::string flag = "--" + std::string(spec.name);
    std::replace(flag.begin(), flag.end(), '_', '-');
    cmd->add_option_function<std::string>(
           flag,
           [values, name = std::string(spec.name)](const std::string& v) { (*values)[name] = v; },
           fmt::format("{} [{}, env {}]", spec.doc, spec.default_value, spec.env))
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  }
}

Status applyTunableFlags(const std::map<std::string, std::string>& values, Tunables* tunables) {
  for (const auto& [name, value] : values) {
    std::string flag = "--" + name;
    std::replace(flag.begin(), flag.end(), '_', '-');
    RALLY_RETURN_IF_ERROR(tunables->set(name, value, flag));
  }
  return okStatus();
}

}  // namespace rally::cli
