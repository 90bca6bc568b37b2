#include "launcher/agent/coordinator_memory.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "kernels/base/telemetry_files.h"

namespace rally::agent {
namespace {

// FNV-1a, 64 bits: stable across builds and machines, unlike std::hash.
std::string hashOf(const std::string& s) {
  std::uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return fmt::format("{:016x}", h);
}

// `dir` as a directory of this user's that no one else may write: made (mode 0700) if missing.
Status privateDirectory(const std::filesystem::path& dir, bool create) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT && !create) return Status(StatusCode::kNotFound, dir.string());
    if (errno != ENOENT) {
      return ioError(
          fmt::format("--state-dir: cannot use {}: {}", dir.string(), std::strerror(errno)));
    }
    std::error_code ec;
    if (dir.has_parent_path()) std::filesystem::create_directories(dir.parent_path(), ec);
    if (ec || (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)) {
      return ioError(fmt::format("--state-dir: cannot create {}: {}", dir.string(),
                                 ec ? ec.message() : std::strerror(errno)));
    }
    if (::lstat(dir.c_str(), &st) != 0) {
      return ioError(
          fmt::format("--state-dir: cannot use {}: {}", dir.string(), std::strerror(errno)));
    }
  }
  if (!S_ISDIR(st.st_mode)) {
    return ioError(
        fmt::format("--state-dir: {} is not a directory (a link or a file): name a "
                    "directory of your own",
                    dir.string()));
  }
  if (st.st_uid != ::getuid()) {
    return ioError(
        fmt::format("--state-dir: {} belongs to user {}, not to this one ({}): name a "
                    "directory of your own",
                    dir.string(), st.st_uid, ::getuid()));
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return ioError(
        fmt::format("--state-dir: others may write in {} (mode {:o}): name a directory "
                    "only you can write",
                    dir.string(), st.st_mode & 07777));
  }
  return okStatus();
}

}  // namespace

Result<CoordinatorMemory> CoordinatorMemory::open(const std::string& dir, const std::string& job_id,
                                                  const std::string& job_key, bool create) {
  if (job_id.empty()) return invalidArgument("the coordinator's memory needs a job id");
  std::filesystem::path where = dir;
  if (where.empty()) {
    std::error_code ec;
    std::filesystem::path base = "/var/tmp";
    if (!std::filesystem::is_directory(base, ec) || ::access(base.c_str(), W_OK) != 0) {
      base = std::filesystem::temp_directory_path(ec);
      if (ec) return ioError(fmt::format("no temporary directory: {}", ec.message()));
    }
    where = base / fmt::format("rally-{}", ::getuid());
  }
  if (Status s = privateDirectory(where, create); !s.ok()) {
    if (s.code() != StatusCode::kNotFound) return s;  // a reader finds no memory: none kept
  }
  const std::string hash = hashOf(job_id + "\n" + job_key);
  return CoordinatorMemory(
      where.string(),
      (where / (fileNameSafe(job_id) + "-" + hash.substr(0, 8) + ".coordinators")).string(),
      "job " + hash);
}

Status CoordinatorMemory::remember(const std::vector<std::string>& endpoints) const {
  RALLY_RETURN_IF_ERROR(privateDirectory(dir_, /*create=*/true));
  std::string text = key_ + "\n";
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
  std::string line;
  if (!std::getline(in, line) || line != key_) return out;  // none, or another job's
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

void CoordinatorMemory::forget() const {
  std::string first;
  {
    std::ifstream in(path_);
    if (!std::getline(in, first) || first != key_) return;  // none, or another job's: kept
  }
  std::error_code ec;
  std::filesystem::remove(path_, ec);
}

}  // namespace rally::agent
