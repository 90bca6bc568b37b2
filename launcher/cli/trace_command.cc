#include "launcher/cli/trace_command.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "kernels/base/units.h"

namespace rally::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct Op {
  std::uint64_t seq = 0;
  std::string op, state, error;
  std::int64_t dur_us = 0;
  std::int64_t issued_us = 0;
  std::int64_t file_written_us = 0;  // when the file that holds it was written (0: unknown)
  std::string file;
};

// Ranks and sizes beyond this are not what rally writes (a corrupt file).
constexpr int kMaxRanks = 1 << 20;

// One communicator in one generation, as every rank's records show it.
struct Group {
  int size = 0;
  std::map<int, Op> newest;                         // rank -> its newest operation (highest seq)
  std::map<std::uint64_t, std::string> ops;         // seq -> operation name
  std::map<std::uint64_t, std::int64_t> issued_us;  // seq -> the latest issue time seen
};

// "rank 3", "ranks 0, 1, 5"
// "rank 3", "ranks 0, 1, 5"; `label` may add to each ("1 (world rank 3)").
std::string rankList(const std::vector<int>& ranks,
                     const std::function<std::string(int)>& label = nullptr) {
  std::string out = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) {
    out += (i ? ", " : "") + (label ? label(ranks[i]) : std::to_string(ranks[i]));
  }
  return out;
}

// What one file (one process) did last in one generation, over all its communicators.
struct Latest {
  std::string comm;
  Op op;
};

std::string firstLine(const std::string& s, size_t max = 240) {
  std::string out = s.substr(0, s.find('\n'));
  return out.size() > max ? out.substr(0, max) + "..." : out;
}

}  // namespace

std::string summarizeTraces(const std::vector<TraceFile>& files, std::string* merged,
                            std::vector<std::string>* problems) {
  std::ostringstream out;
  // (run, generation, comm): files of several jobs in one directory are not mixed up.
  std::map<std::tuple<std::string, std::uint64_t, std::string>, Group> groups;
  std::set<std::string> runs;
  bool any_dropped = false;
  // (file, run, generation) -> the process's world rank, and its newest operation anywhere.
  std::map<std::tuple<std::string, std::string, std::uint64_t>, int> world_rank;
  std::map<std::tuple<std::string, std::string, std::uint64_t>, Latest> latest;
  json merged_events = json::array();
  int process = 0;
  for (const TraceFile& f : files) {
    json trace;
    try {
      trace = json::parse(f.text);
    } catch (const std::exception& e) {
      problems->push_back(fmt::format("{}: not a JSON trace: {}", f.name, e.what()));
      continue;
    }
    if (!trace.is_object() || !trace.contains("traceEvents") || !trace["traceEvents"].is_array()) {
      problems->push_back(fmt::format("{}: not a Chrome trace (no traceEvents array)", f.name));
      continue;
    }
    // A file is taken whole or not at all: everything is read first, then applied.
    std::string who = f.name;
    struct Read {
      std::uint64_t generation;
      std::string comm;
      int size, rank;
      Op op;
    };
    std::vector<Read> read;
    json events = json::array();
    std::string run;
    std::uint64_t dropped = 0;
    std::int64_t written_us = 0;
    try {
      const json other = trace.value("otherData", json::object());
      if (!other.is_object()) throw std::runtime_error("otherData is not an object");
      run = other.value("run", std::string());
      dropped = other.value("dropped", std::uint64_t{0});
      written_us = other.value("written_us", std::int64_t{0});
      for (json e : trace["traceEvents"]) {
        if (!e.is_object()) throw std::runtime_error("an event that is not an object");
        if (e.value("ph", "") == "M" && e.value("name", "") == "process_name") {
          who = e.at("args").value("name", who);
        }
        if (e.value("ph", "") == "X" && e.value("cat", "") == "collective" &&
            e.value("name", "") != "send" && e.value("name", "") != "recv") {
          // send and recv are two ranks' business, numbered per peer: in the timeline only.
          const json& a = e.at("args");
          Read r{a.at("generation").get<std::uint64_t>(), a.at("comm").get<std::string>(),
                 a.at("size").get<int>(), a.at("rank").get<int>(),
                 Op{a.at("seq").get<std::uint64_t>(), e.at("name").get<std::string>(),
                    a.at("state").get<std::string>(), a.value("error", std::string()),
                    e.at("dur").get<std::int64_t>(), a.value("issued_us", std::int64_t{0}),
                    written_us, f.name}};
          if (r.size < 1 || r.size > kMaxRanks || r.rank < 0 || r.rank >= r.size) {
            throw std::runtime_error(fmt::format("rank {} of size {}", r.rank, r.size));
          }
          read.push_back(std::move(r));
        }
        events.push_back(std::move(e));
      }
    } catch (const std::exception& e) {
      problems->push_back(
          fmt::format("{}: an event is not as rally writes them: {}", f.name, e.what()));
      continue;
    }
    ++process;
    for (json& e : events) {
      e["pid"] = process;  // one process per file, whatever ranks the files' writers held
      merged_events.push_back(std::move(e));
    }
    runs.insert(run);
    std::set<std::pair<std::tuple<std::string, std::uint64_t, std::string>, int>> mine;
    for (Read& r : read) {
      const auto where = std::make_tuple(f.name, run, r.generation);
      if (r.comm == "world") world_rank[where] = r.rank;
      if (auto [l, fresh] = latest.try_emplace(where, Latest{r.comm, r.op});
          !fresh && r.op.issued_us >= l->second.op.issued_us) {
        l->second = Latest{r.comm, r.op};
      }
      const auto key = std::make_tuple(run, r.generation, r.comm);
      Group& g = groups[key];
      g.size = std::max(g.size, r.size);
      g.ops[r.op.seq] = r.op.op;
      auto& issued = g.issued_us[r.op.seq];
      issued = std::max(issued, r.op.issued_us);
      auto [it, fresh] = g.newest.try_emplace(r.rank, r.op);
      if (!fresh && it->second.file != f.name && mine.insert({key, r.rank}).second) {
        problems->push_back(fmt::format(
            "{} and {} both hold rank {} of {} in generation {}{}: files of two jobs with the "
            "same --rdzv-id? The newest operation of either is used",
            it->second.file, f.name, r.rank, r.comm, r.generation,
            run.empty() ? "" : fmt::format(" of run {}", run)));
      }
      if (r.op.seq >= it->second.seq) it->second = std::move(r.op);
    }
    const size_t count = read.size();
    any_dropped = any_dropped || dropped > 0;
    std::string written;
    if (written_us > 0) {
      const std::time_t t = static_cast<std::time_t>(written_us / 1'000'000);
      std::tm tm{};
      gmtime_r(&t, &tm);
      written = fmt::format(", written {:02}:{:02}:{:02}.{:03} UTC", tm.tm_hour, tm.tm_min,
                            tm.tm_sec, (written_us / 1000) % 1000);
    }
    out << fmt::format("{}: {}, {} operations{}{}\n", f.name, who, count,
                       dropped ? fmt::format(" (and {} older ones not kept)", dropped) : "",
                       written);
  }
  if (merged != nullptr) {
    *merged =
        json{{"traceEvents", std::move(merged_events)}, {"displayTimeUnit", "ms"}}.dump() + "\n";
  }

  if (runs.size() > 1) {
    out << fmt::format("\nnote: these files are of {} jobs (run ids {}); each is read apart\n",
                       runs.size(), fmt::join(runs, ", "));
  }
  for (const auto& [key, g] : groups) {
    const auto& [run, generation, comm] = key;
    const std::uint64_t newest = g.ops.empty() ? 0 : g.ops.rbegin()->first;
    out << fmt::format("\n{}{}, generation {}, {} ranks: operations up to #{} ({})\n",
                       runs.size() > 1 ? fmt::format("run {}: ", run) : "", comm, generation,
                       g.size, newest, g.ops.empty() ? "-" : g.ops.rbegin()->second);
    // In a sub-communicator, each rank's world rank where its file tells it.
    const auto label = [&, &run = run, &generation = generation,
                        &comm = comm](int r) -> std::string {
      auto it = g.newest.find(r);
      if (comm == "world" || it == g.newest.end()) return std::to_string(r);
      auto w = world_rank.find({it->second.file, run, generation});
      return w == world_rank.end() ? std::to_string(r)
                                   : fmt::format("{} (world rank {})", r, w->second);
    };
    // Where a rank that is behind here went instead: its newest operation on another
    // communicator of the same generation.
    const auto elsewhere = [&, &run = run, &generation = generation,
                            &comm = comm](const Op& op) -> std::string {
      auto l = latest.find({op.file, run, generation});
      if (l == latest.end() || l->second.comm == comm) return "";
      const Op& o = l->second.op;
      std::string state = o.state;
      if (o.state == "failed") state += ": " + o.error.substr(0, o.error.find(':'));
      return fmt::format("; its newest operation is on {}: #{} {} ({})", l->second.comm, o.seq,
                         o.op, state);
    };
    // Ranks with the same story are told together.
    std::map<std::string, std::vector<int>> stories;
    std::vector<int> behind, waiting, failed;
    const std::int64_t newest_issued = g.issued_us.empty() ? 0 : g.issued_us.rbegin()->second;
    for (int r = 0; r < g.size; ++r) {
      auto it = g.newest.find(r);
      if (it == g.newest.end()) {
        if (any_dropped) {  // perhaps only no longer kept: not blamed
          stories
              ["no records (in no trace file: the process died before writing one, wrote to "
               "another directory, or no longer keeps them: some files dropped their oldest "
               "records, see --trace-buffer)"]
                  .push_back(r);
        } else {
          stories
              ["no records (in no trace file: the process died before writing one, or wrote "
               "to another directory)"]
                  .push_back(r);
          behind.push_back(r);
        }
        continue;
      }
      const Op& op = it->second;
      const std::string what = fmt::format("#{} {}", op.seq, op.op);
      if (op.seq < newest && op.file_written_us > 0 && op.file_written_us < newest_issued) {
        // Its file is older than the newest operation: it says nothing of whether it got there.
        stories[fmt::format("its newest is {} ({}), but its file was written before #{} was "
                            "issued elsewhere: read again once it is rewritten",
                            what, op.state, newest)]
            .push_back(r);
      } else if (op.seq < newest) {
        stories[fmt::format("behind: its newest is {} ({}){}", what, op.state, elsewhere(op))]
            .push_back(r);
        behind.push_back(r);
      } else if (op.state == "pending") {
        stories[fmt::format("waiting in {}", what)].push_back(r);
        waiting.push_back(r);
      } else if (op.state == "failed") {
        // Told together by the status code; the first rank's message is printed as an example.
        stories[fmt::format("failed in {}: {}", what, op.error.substr(0, op.error.find(':')))]
            .push_back(r);
        failed.push_back(r);
      } else if (op.state == "unknown") {
        stories[fmt::format("issued {}, whose end it never saw", what)].push_back(r);
      } else {
        stories[fmt::format("completed {}", what)].push_back(r);
      }
    }
    for (const auto& [story, ranks] : stories) {
      std::string extra;
      if (story.rfind("waiting in", 0) == 0) {
        std::int64_t longest = 0;
        for (int r : ranks) longest = std::max(longest, g.newest.at(r).dur_us);
        extra = fmt::format(" (for up to {})", formatElapsed(longest));
      } else if (story.rfind("failed in", 0) == 0) {
        extra = fmt::format("\n    rank {}: {}", ranks[0], firstLine(g.newest.at(ranks[0]).error));
      }
      out << fmt::format("  {}: {}{}\n", rankList(ranks, label), story, extra);
    }
    // Blame needs someone left waiting (or failed for want of the missing ranks): a collective
    // cannot complete without them, so "behind" beside ranks that completed it means files of
    // different moments or jobs, not a rank to wait for.
    if (!behind.empty() && newest > 0 && (!waiting.empty() || !failed.empty())) {
      out << fmt::format("  => the others wait for {}, which never issued #{} {}\n",
                         rankList(behind, label), newest, g.ops.rbegin()->second);
    } else if (!waiting.empty() && waiting.size() == static_cast<size_t>(g.size)) {
      out << fmt::format(
          "  => every rank is in #{}: none is behind (a slow or lost link, or "
          "the trace was written while it ran)\n",
          newest);
    }
  }
  if (groups.empty() && process > 0) out << "\nno collectives were recorded\n";
  return out.str();
}

void addTraceCommand(CLI::App& app, std::function<int()>* run) {
  struct Args {
    std::string dir;
    std::string output;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "trace",
      "Read the collective traces of a job's workers (rally run --trace-dir DIR): how far each "
      "rank got on each communicator, the ranks the others wait for, and (-o) one merged Chrome "
      "trace for Perfetto or chrome://tracing");
  cmd->add_option("DIR", args->dir, "the job's --trace-dir (its collectives-*.json files)")
      ->required();
  cmd->add_option("-o,--output", args->output, "write the merged trace to FILE");
  cmd->callback([run, args] {
    *run = [args] {
      std::vector<TraceFile> files;
      std::error_code ec;
      if (!fs::is_directory(args->dir, ec)) {
        std::cerr << fmt::format(
            "rally trace: {} is not a directory (expected the directory "
            "given to rally run --trace-dir)\n",
            args->dir);
        return 2;
      }
      std::vector<fs::path> paths;
      for (const auto& entry : fs::directory_iterator(args->dir, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.rfind("collectives-", 0) == 0 && entry.path().extension() == ".json") {
          paths.push_back(entry.path());
        }
      }
      std::sort(paths.begin(), paths.end());
      std::vector<std::string> problems;
      for (const auto& p : paths) {
        std::ifstream in(p, std::ios::binary);
        std::stringstream text;
        text << in.rdbuf();
        if (!in) {
          problems.push_back(fmt::format("{}: cannot be read", p.string()));
          continue;
        }
        files.push_back({p.filename().string(), text.str()});
      }
      if (files.empty()) {
        std::cerr << fmt::format(
            "rally trace: no collectives-*.json files in {}: start the job with `rally run "
            "--trace-dir {}` (each worker using librally writes one every --telemetry-interval, "
            "when the job moves past its generation, and at a clean exit)\n",
            args->dir, args->dir);
        return 1;
      }
      std::string merged;
      std::cout << summarizeTraces(files, args->output.empty() ? nullptr : &merged, &problems);
      for (const auto& p : problems) std::cerr << "rally trace: " << p << "\n";
      if (!args->output.empty()) {
        std::ofstream out(args->output, std::ios::binary | std::ios::trunc);
        out << merged;
        out.close();
        if (!out) {
          std::cerr << fmt::format("rally trace: cannot write {}\n", args->output);
          return 1;
        }
        std::cout << fmt::format(
            "\nmerged trace: {} (open it in https://ui.perfetto.dev or "
            "chrome://tracing)\n",
            args->output);
      }
      return problems.size() == paths.size() ? 1 : 0;
    };
  });
}

}  // namespace rally::cli
