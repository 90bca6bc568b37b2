// What a host remembers of where its job's coordinator is: the endpoint it serves at and its
// successors', from the newest round any agent of the job on this host saw. An agent that starts
// again on this host (its host was lost and came back, its process was restarted) asks those
// first, so that it joins the job where the coordinator moved rather than starting another at the
// address of --rdzv-endpoint (docs/design/coordinator.md, "The host's memory").
#pragma once

#include <string>
#include <vector>

#include "kernels/base/status.h"

namespace rally::agent {

class CoordinatorMemory {
 public:
  // The memory of job `job_id` in `dir`; `dir` empty: /var/tmp/rally-<uid> (kept across reboots),
  // or the temporary directory's rally-<uid> where there is no /var/tmp. `job_key` tells this job
  // from another of the same id (its --rdzv-endpoint and token): what another job remembered is
  // not recalled. It is kept hashed, not as given. A directory that is missing is made with mode
  // 0700. One that exists must be a directory (not a link) of this user that no one else may
  // write: what others can write could steer an agent to their coordinator. Otherwise, or for an
  // empty job id, an error says what was wrong; nothing is changed.
  // `create` false (a reader such as `rally status`): a missing directory is not made, and the
  // memory is then empty.
  static Result<CoordinatorMemory> open(const std::string& dir, const std::string& job_id,
                                        const std::string& job_key, bool create = true);

  // The `job_key` of a job whose first --rdzv-endpoint address (normalized: HOST:PORT) is
  // `first_endpoint` and whose token is `token`: what agents and `rally status` both pass.
  static std::string jobKey(const std::string& first_endpoint, const std::string& token) {
    return first_endpoint + "\n" + token;
  }

  // Replaces what is remembered with `endpoints` (empty ones and repeats left out, order kept).
  // The directory is checked again first (it may have been removed, by a cleanup of /var/tmp,
  // and made again by someone else). Best effort: a failure is returned for the caller to log,
  // and nothing else changes.
  Status remember(const std::vector<std::string>& endpoints) const;
  // What this job remembered, in order; empty if nothing, another job's, or unreadable.
  std::vector<std::string> recall() const;
  // Forgets it: the job ended, so the next job of the same id does not ask old addresses. Another
  // job's memory (the same id, another key) is kept.
  void forget() const;

  const std::string& path() const { return path_; }

 private:
  CoordinatorMemory(std::string dir, std::string path, std::string key)
      : dir_(std::move(dir)), path_(std::move(path)), key_(std::move(key)) {}
  std::string dir_;
  std::string path_;  // DIR/ID-HASH.coordinators: two jobs of one id keep a file each
  std::string key_;   // the first line of the file: "job " and the key's hash
};

}  // namespace rally::agent
