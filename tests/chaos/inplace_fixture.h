// What the in-place recovery tests share: `rally run` agents with the minimal example as their
// workers, an uninterrupted reference run, the example's summary, and the job's events log.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "tests/integration/process.h"

namespace rally::testing {

// The minimal example's summary ("weights ..." and "steps ... uses_max N"), from whichever
// agent ran rank 0.
struct Result {
  std::vector<double> weights;
  std::string weights_text;
  std::string summary;
};

inline Result parse(const std::string& output) {
  Result r;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("weights ", 0) == 0) {
      r.weights_text = line;
      std::istringstream w(line.substr(8));
      for (std::string v; w >> v;) r.weights.push_back(std::strtod(v.c_str(), nullptr));
    } else if (line.rfind("steps ", 0) == 0) {
      r.summary = line;
    }
  }
  return r;
}

class InPlaceFixture : public ::testing::Test {
 protected:
  std::unique_ptr<ChildProcess> agent(const std::string& name, std::vector<std::string> args,
                                      const std::vector<std::string>& program_args,
                                      const std::string& address = "127.0.0.1") {
    std::vector<std::string> argv = {RALLY_BINARY, "run", "--node-id", name, "--local-addr",
                                     address, "--heartbeat-interval", "500ms", "--grace-period",
                                     "2s", "--recovery", recovery_, "--events", events_,
                                     // One per node name, as on a host of its own.
                                     "--state-dir", state_dir_ + "/" + name};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back(RALLY_MINIMAL);
    argv.insert(argv.end(), program_args.begin(), program_args.end());
    return std::make_unique<ChildProcess>(argv, tempPath(name + ".out"));
  }
  // The uninterrupted run: one node of 4 workers (the same world of 4 ranks).
  Result reference(const std::vector<std::string>& program_args) {
    std::vector<std::string> argv = {RALLY_BINARY,       "run", "--standalone",
                                     "--nproc-per-node", "4",   RALLY_MINIMAL};
    argv.insert(argv.end(), program_args.begin(), program_args.end());
    ChildProcess ref(argv, tempPath("inplace-ref.out"));
    EXPECT_EQ(exitCode(ref), 0) << ref.errors();
    // The job's port is drawn now, just before its agents start, rather than before this run.
    endpoint_ = "127.0.0.1:" + std::to_string(freePort());
    return parse(ref.output());
  }
  std::string events() const { return ChildProcess::readFile(events_); }
  // The events log's lines of one kind ("recovery", "workers_started", ...).
  std::vector<std::string> eventLines(const std::string& event) const {
    std::vector<std::string> found;
    std::istringstream lines(events());
    for (std::string line; std::getline(lines, line);) {
      if (line.find("\"event\":\"" + event + "\"") != std::string::npos) found.push_back(line);
    }
    return found;
  }

  std::string recovery_ = "in-place";
  std::string endpoint_ = "127.0.0.1:" + std::to_string(freePort());
  std::string events_ = tempPath("inplace-events.jsonl");
  std::string state_dir_ = tempPath("inplace-state");
  void SetUp() override {
    std::remove(events_.c_str());
    std::filesystem::remove_all(state_dir_);
  }
};

}  // namespace rally::testing
