// `rally trace DIR`: reads the collective traces that a job's workers wrote (`rally run --trace-dir
// DIR`, one collectives-*.json per worker process), says for each communicator and generation how
// far every rank got, and names the ranks the others wait for; with -o, merges the traces into one
// Chrome trace (open it in Perfetto or chrome://tracing: one process per worker, one track per
// communicator).
//
//   rally trace /tmp/trace                 # the summary
//   rally trace /tmp/trace -o job.json     # and the merged timeline
//
// Operations are matched by their number on their communicator (`seq`), the same on every rank.
// Exit status: 0 the traces were read (whatever they show), 1 none could be read, 2 bad usage.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace rally::cli {

void addTraceCommand(CLI::App& app, std::function<int()>* run);

// The summary for the trace files' contents (parsed JSON texts, with their file names), for tests.
// Returns the text that `rally trace` prints; `merged`, when not null, receives the merged trace.
struct TraceFile {
  std::string name;
  std::string text;
};
std::string summarizeTraces(const std::vector<TraceFile>& files, std::string* merged,
                            std::vector<std::string>* problems);

}  // namespace rally::cli
