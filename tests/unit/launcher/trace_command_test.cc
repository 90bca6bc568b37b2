// `rally trace`'s reading of the workers' trace files (launcher/cli/trace_command.h): each rank's
// story per communicator and generation, the verdict, the merged trace, and files it cannot read.
#include "launcher/cli/trace_command.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

namespace rally::cli {
namespace {

using nlohmann::json;

// One worker's file: `ops` as (seq, op, state, dur_us) on communicator `comm` of `size` ranks.
struct Op {
  std::uint64_t seq;
  const char* name;
  const char* state;
  std::int64_t dur_us = 10;
  const char* error = "";
  const char* comm = nullptr;  // the file's communicator unless set
  int rank = -1, size = -1;    // the file's rank and size unless set
  std::int64_t issued_us = 0;  // 1000 x seq unless set
};
TraceFile file(const std::string& name, int rank, int size, std::uint64_t generation,
               const std::vector<Op>& ops, const std::string& comm = "world",
               const std::string& run = "job", std::uint64_t dropped = 0,
               std::int64_t written_us = 0) {
  json events = json::array();
  events.push_back({{"ph", "M"},
                    {"name", "process_name"},
                    {"pid", rank},
                    {"args", {{"name", "rank " + std::to_string(rank)}}}});
  for (const Op& op : ops) {
    json args = {
        {"seq", op.seq},
        {"comm", op.comm ? op.comm : comm},
        {"generation", generation},
        {"rank", op.rank >= 0 ? op.rank : rank},
        {"size", op.size >= 0 ? op.size : size},
        {"state", op.state},
        {"issued_us", op.issued_us ? op.issued_us : 1000 * static_cast<std::int64_t>(op.seq)}};
    if (*op.error) args["error"] = op.error;
    events.push_back({{"ph", "X"},
                      {"cat", "collective"},
                      {"name", op.name},
                      {"pid", rank},
                      {"tid", 1},
                      {"ts", 1000 * op.seq},
                      {"dur", op.dur_us},
                      {"args", args}});
  }
  const json other = {{"dropped", dropped}, {"run", run}, {"written_us", written_us}};
  return {name, json{{"traceEvents", events}, {"otherData", other}}.dump()};
}

TEST(RallyTrace, NamesTheRankBehindAndTellsRanksWithTheSameStoryTogether) {
  std::vector<std::string> problems;
  std::string merged;
  const std::string text = summarizeTraces(
      {file("a.json", 0, 3, 2, {{1, "allreduce", "ok"}, {2, "allreduce", "pending", 4'500'000}}),
       file("b.json", 1, 3, 2, {{1, "allreduce", "ok"}, {2, "allreduce", "pending", 2'000'000}}),
       file("c.json", 2, 3, 2, {{1, "allreduce", "ok"}})},
      &merged, &problems);
  EXPECT_TRUE(problems.empty());
  EXPECT_NE(text.find("world, generation 2, 3 ranks: operations up to #2 (allreduce)\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("  ranks 0, 1: waiting in #2 allreduce (for up to 4.5 s)\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("  rank 2: behind: its newest is #1 allreduce (ok)\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("  => the others wait for rank 2, which never issued #2 allreduce\n"),
            std::string::npos)
      << text;
  // Merged: every event, one process per file.
  const json m = json::parse(merged);
  std::set<int> pids;
  size_t complete = 0;
  for (const auto& e : m["traceEvents"]) {
    pids.insert(e["pid"].get<int>());
    complete += e["ph"] == "X";
  }
  EXPECT_EQ(pids, (std::set<int>{1, 2, 3}));
  EXPECT_EQ(complete, 5u);
}

TEST(RallyTrace, EveryRankInTheSameOperationIsNotBlamedOnAnyOfThem) {
  std::vector<std::string> problems;
  const std::string text = summarizeTraces({file("a.json", 0, 2, 1, {{7, "broadcast", "pending"}}),
                                            file("b.json", 1, 2, 1, {{7, "broadcast", "pending"}})},
                                           nullptr, &problems);
  EXPECT_NE(text.find("  ranks 0, 1: waiting in #7 broadcast"), std::string::npos) << text;
  EXPECT_NE(text.find("=> every rank is in #7: none is behind"), std::string::npos) << text;
  EXPECT_EQ(text.find("the others wait for"), std::string::npos) << text;
}

TEST(RallyTrace, CommunicatorsAndGenerationsAreToldApartAndFailuresByTheirCode) {
  std::vector<std::string> problems;
  const std::string text = summarizeTraces(
      {file("a.json", 0, 2, 1, {{3, "allreduce", "failed", 10, "PeerLost: rank 1 exited"}}),
       file("a2.json", 0, 2, 2, {{1, "barrier", "ok"}}),
       file("b2.json", 1, 2, 2, {{1, "barrier", "ok"}}),
       file("t.json", 0, 1, 2, {{4, "allgather", "unknown"}}, "world/split0/color0")},
      nullptr, &problems);
  EXPECT_NE(text.find("world, generation 1, 2 ranks"), std::string::npos) << text;
  EXPECT_NE(text.find("  rank 0: failed in #3 allreduce: PeerLost\n    rank 0: PeerLost: rank 1 "
                      "exited\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("  rank 1: no records"), std::string::npos) << text;
  EXPECT_NE(text.find("world, generation 2, 2 ranks: operations up to #1 (barrier)\n  ranks 0, 1: "
                      "completed #1 barrier\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("world/split0/color0, generation 2, 1 ranks"), std::string::npos) << text;
  EXPECT_NE(text.find("issued #4 allgather, whose end it never saw"), std::string::npos) << text;
}

TEST(RallyTrace, SendAndRecvAreLeftOutOfTheVerdictAndJobsAreReadApart) {
  std::vector<std::string> problems;
  const std::string text = summarizeTraces(
      {file("a.json", 0, 2, 1, {{1, "barrier", "ok"}, {1, "send", "ok"}, {2, "send", "pending"}}),
       file("b.json", 1, 2, 1, {{1, "barrier", "ok"}, {1, "recv", "ok"}}),
       file("old.json", 0, 2, 1, {{9, "barrier", "pending"}}, "world", "yesterday")},
      nullptr, &problems);
  EXPECT_NE(text.find("note: these files are of 2 jobs (run ids job, yesterday)"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("run job: world, generation 1, 2 ranks: operations up to #1 (barrier)\n"
                      "  ranks 0, 1: completed #1 barrier\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("run yesterday: world, generation 1, 2 ranks"), std::string::npos) << text;
}

TEST(RallyTrace, ARankWhoseRecordsMayNoLongerBeKeptIsNotBlamed) {
  std::vector<std::string> problems;
  const std::string text = summarizeTraces(
      {file("a.json", 0, 2, 1, {{5, "allreduce", "ok"}}),
       file("b.json", 1, 2, 2, {{1, "allreduce", "ok"}}, "world", "job", /*dropped=*/40)},
      nullptr, &problems);
  EXPECT_NE(text.find("rank 1: no records (in no trace file: the process died before writing "
                      "one, wrote to another directory, or no longer keeps them"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.find("=> the others wait for"), std::string::npos) << text;
}

TEST(RallyTrace, ARankWhoseFileIsOlderThanTheNewestOperationIsNotBlamed) {
  std::vector<std::string> problems;
  // Rank 1's file was written (at 2500 us) before #3 was issued (at 3000 us) elsewhere.
  const std::string text = summarizeTraces(
      {file("a.json", 0, 2, 1, {{3, "allreduce", "pending"}}, "world", "job", 0, 9000),
       file("b.json", 1, 2, 1, {{2, "allreduce", "ok"}}, "world", "job", 0, 2500)},
      nullptr, &problems);
  EXPECT_NE(text.find("rank 1: its newest is #2 allreduce (ok), but its file was written before "
                      "#3 was issued elsewhere"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.find("=> the others wait for"), std::string::npos) << text;
  // Written after #3 was issued, and still without it: behind, and blamed.
  const std::string later = summarizeTraces(
      {file("a.json", 0, 2, 1, {{3, "allreduce", "pending"}}, "world", "job", 0, 9000),
       file("b.json", 1, 2, 1, {{2, "allreduce", "ok"}}, "world", "job", 0, 8000)},
      nullptr, &problems);
  EXPECT_NE(later.find("=> the others wait for rank 1, which never issued #3 allreduce"),
            std::string::npos)
      << later;
}

TEST(RallyTrace, NoBlameWhereTheOthersCompletedTheOperation) {
  std::vector<std::string> problems;
  const std::string text = summarizeTraces({file("a.json", 0, 2, 1, {{4, "barrier", "ok"}}),
                                            file("b.json", 1, 2, 1, {{3, "barrier", "ok"}})},
                                           nullptr, &problems);
  EXPECT_NE(text.find("rank 1: behind: its newest is #3 barrier (ok)"), std::string::npos) << text;
  EXPECT_EQ(text.find("=> the others wait for"), std::string::npos) << text;
}

TEST(RallyTrace, InASubCommunicatorRanksAreShownWithTheirWorldRankAndWhereTheyWentInstead) {
  std::vector<std::string> problems;
  // A DP group (world/split1/color1: world ranks 1 and 3) whose rank 1 never issued #40 because
  // its TP allreduce (world/split0/color1) failed first.
  const char* dp = "world/split1/color1";
  const char* tp = "world/split0/color1";
  const std::string text = summarizeTraces(
      {file("w1.json", 1, 4, 1,
            {{7, "allreduce", "ok"},
             {40, "allreduce", "failed", 10, "PeerLost: rank 1 aborted", dp, 0, 2, 50'000}}),
       file("w3.json", 3, 4, 1,
            {{7, "allreduce", "ok"},
             {39, "allreduce", "ok", 10, "", dp, 1, 2, 40'000},
             {691, "allreduce", "failed", 10, "PeerLost: rank 0 exited", tp, 1, 2, 45'000}})},
      nullptr, &problems);
  EXPECT_TRUE(problems.empty());
  EXPECT_NE(text.find("world/split1/color1, generation 1, 2 ranks: operations up to #40"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("  rank 1 (world rank 3): behind: its newest is #39 allreduce (ok); its "
                      "newest operation is on world/split0/color1: #691 allreduce (failed: "
                      "PeerLost)\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("=> the others wait for rank 1 (world rank 3), which never issued #40"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("  rank 0 (world rank 1): failed in #40 allreduce: PeerLost"),
            std::string::npos)
      << text;
}

TEST(RallyTrace, OneRankInTwoFilesIsReported) {
  std::vector<std::string> problems;
  summarizeTraces({file("a.json", 0, 1, 1, {{1, "barrier", "ok"}}),
                   file("b.json", 0, 1, 1, {{5, "barrier", "ok"}})},
                  nullptr, &problems);
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_EQ(problems[0],
            "a.json and b.json both hold rank 0 of world in generation 1 of run job: files of two "
            "jobs with the same --rdzv-id? The newest operation of either is used");
}

TEST(RallyTrace, AFileItCannotReadIsNamedAndTheOthersAreStillRead) {
  std::vector<std::string> problems;
  std::string merged;
  const std::string text = summarizeTraces(
      {{"broken.json", "{\"traceEvents\": [ {"},
       {"other.json", "{\"events\": []}"},
       {"odd.json", R"({"traceEvents": [{"ph": "X", "cat": "collective", "name": "x"}]})"},
       {"other-data.json", R"({"traceEvents": [], "otherData": {"run": 7}})"},
       {"huge.json", R"({"traceEvents": [{"ph": "X", "cat": "collective", "name": "barrier",
          "dur": 1, "args": {"seq": 1, "comm": "world", "generation": 1, "rank": 0,
          "size": 2000000000, "state": "ok"}}]})"},
       file("good.json", 0, 1, 1, {{1, "barrier", "ok"}})},
      &merged, &problems);
  ASSERT_EQ(problems.size(), 5u);
  EXPECT_EQ(problems[0].rfind("broken.json: not a JSON trace: ", 0), 0u) << problems[0];
  EXPECT_EQ(problems[1], "other.json: not a Chrome trace (no traceEvents array)");
  EXPECT_EQ(problems[2].rfind("odd.json: an event is not as rally writes them: ", 0), 0u)
      << problems[2];
  EXPECT_EQ(problems[3].rfind("other-data.json: an event is not as rally writes them: ", 0), 0u)
      << problems[3];
  EXPECT_EQ(problems[4],
            "huge.json: an event is not as rally writes them: rank 0 of size 2000000000");
  EXPECT_NE(text.find("rank 0: completed #1 barrier"), std::string::npos) << text;
  // Nothing of the odd file reached the merged trace: the good file's two events, as process 1.
  const json m = json::parse(merged);
  ASSERT_EQ(m["traceEvents"].size(), 2u) << merged;
  for (const auto& e : m["traceEvents"]) EXPECT_EQ(e["pid"], 1);
}

}  // namespace
}  // namespace rally::cli
