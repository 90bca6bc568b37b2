#include "launcher/agent/coordinator_memory.h"

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "kernels/base/telemetry_files.h"

namespace rally::agent {

Result<CoordinatorMemory> CoordinatorMemory::open(const std::string& dir,
                                                  const std::string& job_id) {
  if (job_id.empty()) return invalidArgument("the coordinator's memory needs a job id");
  std::filesystem::path where = dir;
  std::error_code ec;
  if (where.empty()) {
    where = std::filesystem::temp_directory_path(ec) / fmt::format("rally-{}", ::getuid());
    if (ec) return ioError(fmt::format("no temporary directory: {}", ec.message()));
  }
  std::filesystem::create_directories(where, ec);
  if (ec) {
    return ioError(fmt::format("--state-dir: cannot create {}: {}", where.string(), ec.message()));
  }
  std::filesystem::permissions(where, std::filesystem::perms::owner_all,
                               std::filesystem::perm_options::replace, ec);
  return CoordinatorMemory((where / (fileNameSafe(job_id) + ".coordinators")).string());
}

Status CoordinatorMemory::remember(const std::vector<std::string>& endpoints) const {
  std::string text;
  std::set<std::string> seen;
  for (const std::string& e : endpoints) {
    if (e.empty() || !seen.insert(e).second) continue;
    text += e + "\n";
  }
  return writeFileReplacing(path_, text);
}

std::vector<std::string> CoordinatorMemory::recall() const {
  std::vector<std::string> out;
  std::ifstream in(path_);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

void CoordinatorMemory::forget() const {
  std::error_code ec;
  std::filesystem::remove(path_, ec);
}

}  // namespace rally::agent
