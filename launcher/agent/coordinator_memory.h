// What a host remembers of where its job's coordinator is: the endpoint it serves at and its
// successors', from the newest round any agent of the job on this host saw. An agent that starts
// again on this host (its host was lost and came back, its process was restarted) asks those
// first, so that it joins the job where the coordinator moved rather than starting another at the
// address of --rdzv-endpoint (docs/design/coordinator.md, "Finding a moved coordinator").
#pragma once

#include <string>
#include <vector>

#include "kernels/base/status.h"

namespace rally::agent {

class CoordinatorMemory {
 public:
  // The memory of job `job_id` in `dir` (made if missing, mode 0700); `dir` empty: the system's
  // temporary directory's rally-<uid>. InvalidArgument for an empty job id, IoError if the
  // directory cannot be made.
  static Result<CoordinatorMemory> open(const std::string& dir, const std::string& job_id);

  // Replaces what is remembered with `endpoints` (empty ones and repeats left out, order kept).
  // Best effort: a failure is returned for the caller to log, and nothing else changes.
  Status remember(const std::vector<std::string>& endpoints) const;
  // What was remembered, in order; empty if nothing (or the file cannot be read).
  std::vector<std::string> recall() const;
  // Forgets it: the job ended, so the next job of the same id does not ask old addresses.
  void forget() const;

  const std::string& path() const { return path_; }

 private:
  explicit CoordinatorMemory(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

}  // namespace rally::agent
