// The collective flight recorder (collectives/recorder.h): what it keeps of each operation, its
// ring's bound, its totals, and its two outputs (the Chrome trace and the Prometheus text).
#include "collectives/recorder.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <stdexcept>
#include <thread>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"

namespace rally::collectives {
namespace {

using State = CollectiveRecord::State;

constexpr Milliseconds kWait{30'000};

// Runs body(rank, comm) on one thread per recorder, each rank's Gloo communicator recorded in its
// recorder as "world".
void runRecordedRanks(const std::vector<std::shared_ptr<CollectiveRecorder>>& recorders,
                      const std::function<void(int, Communicator&)>& body) {
  MemoryBootstrapStore store;
  std::vector<std::thread> threads;
  const int n = static_cast<int>(recorders.size());
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      auto gloo = createGlooCommunicator(
          store, {.rank = r, .size = n, .generation = 1, .op_timeout = kWait});
      ASSERT_TRUE(gloo.ok()) << gloo.status().toString();
      auto comm = recordCollectives(std::move(*gloo), recorders[r], "world");
      body(r, *comm);
    });
  }
  for (auto& t : threads) t.join();
}

std::vector<std::shared_ptr<CollectiveRecorder>> makeRecorders(int n, size_t capacity) {
  std::vector<std::shared_ptr<CollectiveRecorder>> out;
  for (int i = 0; i < n; ++i) out.push_back(std::make_shared<CollectiveRecorder>(capacity));
  return out;
}

TEST(CollectiveRecorder, KeepsEveryOperationWithTheSameSeqOnEveryRank) {
  const auto recorders = makeRecorders(2, 100);
  runRecordedRanks(recorders, [&](int rank, Communicator& c) {
    Communicator* comm = &c;
    std::vector<float> grads(1000);
    std::iota(grads.begin(), grads.end(), static_cast<float>(rank));
    ASSERT_TRUE(comm->allreduce(grads.data(), grads.size(), DataType::kF32, ReduceOp::kSum)
                    ->wait(kWait)
                    .ok());
    std::vector<std::int64_t> word = {rank == 0 ? 7 : 0};
    ASSERT_TRUE(comm->broadcast(word.data(), 1, DataType::kI64, 0)->wait(kWait).ok());
    std::vector<double> mine = {1.0 * rank, 2.0}, all(4);
    ASSERT_TRUE(comm->allgather(mine.data(), all.data(), 2, DataType::kF64)->wait(kWait).ok());
    std::vector<std::uint8_t> msg(5, 1);
    auto p2p = rank == 0 ? comm->send(msg.data(), msg.size(), DataType::kU8, 1)
                         : comm->recv(msg.data(), msg.size(), DataType::kU8, 0);
    ASSERT_TRUE(p2p->wait(kWait).ok());
    auto sub = comm->split(0, rank);
    ASSERT_TRUE(sub.ok()) << sub.status().toString();
    ASSERT_TRUE((*sub)->barrier()->wait(kWait).ok());
    sub->reset();
    // A second split with the same color on one rank is told apart from the first (a DP x TP
    // grid splits twice).
    auto second = comm->split(rank, 0);
    ASSERT_TRUE(second.ok()) << second.status().toString();
    ASSERT_TRUE((*second)->barrier()->wait(kWait).ok());
  });

  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE(rank);
    const auto records = recorders[rank]->records();
    ASSERT_EQ(records.size(), 8u);
    const std::vector<std::string> ops = {
        "allreduce", "broadcast", "allgather", rank == 0 ? "send" : "recv",
        "split",     "barrier",   "split",     "barrier"};
    for (size_t i = 0; i < records.size(); ++i) {
      const auto& r = records[i];
      EXPECT_EQ(r.op, ops[i]);
      EXPECT_EQ(r.id, i + 1);
      EXPECT_EQ(r.state, State::kOk) << r.describe(std::chrono::system_clock::now());
      EXPECT_EQ(r.backend, "gloo");
      EXPECT_EQ(r.generation, 1u);
      EXPECT_EQ(r.rank, i == 7 ? 0 : rank);  // the second split: one rank per color
      EXPECT_EQ(r.size, i == 7 ? 1 : 2);
      EXPECT_LE(r.issued, r.started);
      EXPECT_LE(r.started, r.completed);
    }
    // The sub-communicators' operations are numbered on each, from 1; send and recv per peer,
    // apart from the collectives (only two ranks issue them).
    EXPECT_EQ(records[5].comm, "world/split0/color0");
    EXPECT_EQ(records[5].seq, 1u);
    EXPECT_EQ(records[7].comm, fmt::format("world/split1/color{}", rank));
    EXPECT_EQ(records[7].seq, 1u);
    EXPECT_EQ(records[3].seq, 1u);
    EXPECT_EQ(records[4].comm, "world");
    EXPECT_EQ(records[4].seq, 4u);
    EXPECT_EQ(records[6].seq, 5u);
    EXPECT_EQ(records[0].bytes, 4000u);
    EXPECT_EQ(records[0].count, 1000u);
    EXPECT_EQ(records[0].reduce, ReduceOp::kSum);
    EXPECT_EQ(records[1].peer, 0);     // the root
    EXPECT_EQ(records[2].bytes, 32u);  // the gathered side: 2 ranks x 2 x 8 bytes
    EXPECT_EQ(records[3].peer, 1 - rank);
    EXPECT_EQ(recorders[rank]->dropped(), 0u);
  }
}

TEST(CollectiveRecorder, StartIsWhenTheBackendBeganNotWhenItWasIssued) {
  const auto recorders = makeRecorders(2, 10);
  runRecordedRanks(recorders, [&](int, Communicator& c) {
    // Big enough that the second waits in the queue while the first runs.
    std::vector<float> a(1 << 20, 1.0f), b(1 << 20, 1.0f);
    auto first = c.allreduce(a.data(), a.size(), DataType::kF32, ReduceOp::kSum);
    auto second = c.allreduce(b.data(), b.size(), DataType::kF32, ReduceOp::kSum);
    ASSERT_TRUE(second->wait(kWait).ok());
    ASSERT_TRUE(first->wait(kWait).ok());
  });
  const auto r = recorders[0]->records();
  ASSERT_EQ(r.size(), 2u);
  // One at a time, in order: the second began once the first had completed.
  EXPECT_GE(r[1].started, r[0].completed);
  EXPECT_LE(r[1].issued, r[0].completed);
}

TEST(CollectiveRecorder, AFailureIsKeptWithItsStatusAndAPendingOperationSaysSo) {
  const auto recorders = makeRecorders(2, 10);
  const auto& recorder = recorders[0];
  std::promise<void> checked;
  std::shared_future<void> rank0_done = checked.get_future().share();
  runRecordedRanks(recorders, [&](int rank, Communicator& c) {
    if (rank == 1) {  // never sends, but stays until rank 0 has looked (bounded, should it fail)
      rank0_done.wait_for(std::chrono::seconds(60));
      return;
    }
    Communicator* comm = &c;
    std::vector<float> x(3);
    auto recv = comm->recv(x.data(), x.size(), DataType::kF32, 1);
    EXPECT_FALSE(recv->done());
    const std::string pending = recorder->describeRecent(5);
    EXPECT_NE(pending.find("#1 recv 12 B (3 x f32, peer 1) on world [gloo, generation 1, rank 0 "
                           "of 2]: pending for"),
              std::string::npos)
        << pending;
    comm->abort("test: peer 1 is gone");
    const Status s = recv->wait(kWait);
    EXPECT_EQ(s.code(), StatusCode::kAborted);
    const auto r = recorder->records();
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].state, State::kFailed);
    EXPECT_EQ(r[0].error, s.toString());
    const std::string failed = recorder->describeRecent(5);
    EXPECT_NE(failed.find("failed after"), std::string::npos) << failed;
    EXPECT_NE(failed.find("test: peer 1 is gone"), std::string::npos) << failed;
    checked.set_value();
  });
  const auto totals = recorder->totals();
  ASSERT_EQ(totals.size(), 1u);
  EXPECT_EQ(totals[0].op, "recv");
  EXPECT_EQ(totals[0].issued, 1u);
  EXPECT_EQ(totals[0].failed, 1u);
  EXPECT_EQ(totals[0].completed, 0u);
}

// A backend that cannot report its operations' progress (as NCCL's stream-ordered work).
class SilentWork final : public Work {
 public:
  Status wait(Milliseconds) override {
    if (!finished) return timeoutError("still running");
    return status;
  }
  bool done() const override { return finished; }
  bool finished = false;
  Status status;
};

class SilentCommunicator final : public Communicator {
 public:
  bool throws = false;  // allreduce and split throw instead
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::uint64_t generation() const override { return 4; }
  std::string_view backend() const override { return "silent"; }
  Capabilities capabilities() const override { return {}; }
  std::shared_ptr<Work> allreduce(void*, size_t, DataType, ReduceOp) override {
    if (throws) throw std::runtime_error("backend bug");
    return next();
  }
  std::shared_ptr<Work> reduceScatter(const void*, void*, size_t, DataType, ReduceOp) override {
    return next();
  }
  std::shared_ptr<Work> allgather(const void*, void*, size_t, DataType) override { return next(); }
  std::shared_ptr<Work> broadcast(void*, size_t, DataType, int) override { return next(); }
  std::shared_ptr<Work> alltoall(const void*, void*, size_t, DataType) override { return next(); }
  std::shared_ptr<Work> send(const void*, size_t, DataType, int) override { return next(); }
  std::shared_ptr<Work> recv(void*, size_t, DataType, int) override { return next(); }
  std::shared_ptr<Work> barrier() override { return next(); }
  Status waitForEvent(void* event) override {
    waited_for.push_back(event);
    return okStatus();
  }
  std::vector<void*> waited_for;
  void abort(const std::string&) override {}
  bool aborted() const override { return false; }
  Result<std::unique_ptr<Communicator>> split(int, int) override {
    if (throws) throw std::runtime_error("backend bug");
    return unimplemented("split");
  }
  Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>&) override {
    return unimplemented("shrink");
  }
  std::vector<std::shared_ptr<SilentWork>> works;

 private:
  std::shared_ptr<Work> next() {
    works.push_back(std::make_shared<SilentWork>());
    return works.back();
  }
};

TEST(CollectiveRecorder, ABackendThatCannotTellIsTimedByWhatTheCallerSees) {
  auto recorder = std::make_shared<CollectiveRecorder>(10);
  auto silent = std::make_unique<SilentCommunicator>();
  SilentCommunicator* backend = silent.get();
  auto comm = recordCollectives(std::move(silent), recorder, "world");
  float x = 1;
  auto waited = comm->allreduce(&x, 1, DataType::kF32, ReduceOp::kSum);
  auto polled = comm->allreduce(&x, 1, DataType::kF32, ReduceOp::kSum);
  auto dropped = comm->allreduce(&x, 1, DataType::kF32, ReduceOp::kSum);
  auto timed_out = comm->allreduce(&x, 1, DataType::kF32, ReduceOp::kSum);

  // A wait that times out leaves it running; one that returns its end completes it.
  EXPECT_EQ(waited->wait(Milliseconds(1)).code(), StatusCode::kTimeout);
  EXPECT_EQ(recorder->records()[0].state, State::kPending);
  backend->works[0]->finished = true;
  EXPECT_TRUE(waited->wait(Milliseconds(1)).ok());
  EXPECT_EQ(recorder->records()[0].state, State::kOk);

  EXPECT_FALSE(polled->done());
  backend->works[1]->finished = true;
  EXPECT_TRUE(polled->done());
  EXPECT_EQ(recorder->records()[1].state, State::kOk);

  // Dropped unfinished: its end is unknown, and it is no longer in flight.
  dropped.reset();
  EXPECT_EQ(recorder->records()[2].state, State::kUnknown);

  // An operation that ended with Timeout (the backend's op_timeout) failed.
  backend->works[3]->finished = true;
  backend->works[3]->status = timeoutError("op_timeout");
  EXPECT_EQ(timed_out->wait(Milliseconds(1)).code(), StatusCode::kTimeout);
  EXPECT_EQ(recorder->records()[3].state, State::kFailed);

  const auto totals = recorder->totals();
  ASSERT_EQ(totals.size(), 1u);
  EXPECT_EQ(totals[0].issued, 4u);
  EXPECT_EQ(totals[0].completed, 2u);
  EXPECT_EQ(totals[0].failed, 1u);
  EXPECT_EQ(totals[0].abandoned, 1u);
  EXPECT_NE(recorder->prometheus({}).find(
                "rally_collective_in_flight{backend=\"silent\",comm=\"world\",op=\"allreduce\"} 0"),
            std::string::npos);
}

TEST(CollectiveRecorder, ABackendThatThrowsLeavesAFailedRecordNotAPendingOne) {
  auto recorder = std::make_shared<CollectiveRecorder>(10);
  auto silent = std::make_unique<SilentCommunicator>();
  silent->throws = true;
  auto comm = recordCollectives(std::move(silent), recorder, "world");
  float x = 0;
  EXPECT_THROW(comm->allreduce(&x, 1, DataType::kF32, ReduceOp::kSum), std::runtime_error);
  EXPECT_THROW((void)comm->split(0, 0), std::runtime_error);
  const auto r = recorder->records();
  ASSERT_EQ(r.size(), 2u);
  for (const auto& rec : r) {
    EXPECT_EQ(rec.state, State::kFailed);
    EXPECT_NE(rec.error.find("the backend threw: backend bug"), std::string::npos) << rec.error;
  }
  for (const auto& t : recorder->totals()) EXPECT_EQ(t.failed, 1u) << t.op;
}

TEST(CollectiveRecorder, WaitForEventReachesTheBackend) {
  auto recorder = std::make_shared<CollectiveRecorder>(10);
  auto silent = std::make_unique<SilentCommunicator>();
  SilentCommunicator* backend = silent.get();
  auto comm = recordCollectives(std::move(silent), recorder, "world");
  int event = 0;  // any address: the silent backend only keeps it
  EXPECT_TRUE(comm->waitForEvent(&event).ok());
  EXPECT_EQ(backend->waited_for, std::vector<void*>{&event});
  EXPECT_TRUE(recorder->records().empty()) << "not a collective";
}

TEST(CollectiveRecorder, TheRingKeepsTheNewestAndTheTotalsKeepEverything) {
  auto recorder = std::make_shared<CollectiveRecorder>(3);
  auto none = std::make_shared<CollectiveRecorder>(0);
  auto silent = std::make_unique<SilentCommunicator>();
  SilentCommunicator* backend = silent.get();
  auto comm = recordCollectives(std::move(silent), recorder, "world");
  auto silent2 = std::make_unique<SilentCommunicator>();
  SilentCommunicator* backend2 = silent2.get();
  auto uncounted = recordCollectives(std::move(silent2), none, "world");
  std::vector<float> x(10);
  for (size_t n = 1; n <= 5; ++n) {
    auto w = comm->allreduce(x.data(), n, DataType::kF32, ReduceOp::kMax);
    backend->works.back()->finished = true;
    ASSERT_TRUE(w->wait(kWait).ok());
    auto u = uncounted->allreduce(x.data(), n, DataType::kF32, ReduceOp::kMax);
    backend2->works.back()->finished = true;
    ASSERT_TRUE(u->wait(kWait).ok());
  }
  const auto r = recorder->records();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].seq, 3u);
  EXPECT_EQ(r[1].seq, 4u);
  EXPECT_EQ(r[2].seq, 5u);
  EXPECT_EQ(r[2].bytes, 20u);
  EXPECT_EQ(recorder->dropped(), 2u);
  for (const auto* rec : {recorder.get(), none.get()}) {
    const auto totals = rec->totals();
    ASSERT_EQ(totals.size(), 1u);
    EXPECT_EQ(totals[0].completed, 5u);
    EXPECT_EQ(totals[0].bytes, 4u * (1 + 2 + 3 + 4 + 5));
  }
  EXPECT_TRUE(none->records().empty());
  EXPECT_EQ(none->dropped(), 5u);
}

TEST(CollectiveRecorder, AnOperationStillRunningWhenItsRecordIsOverwrittenStillCounts) {
  for (size_t capacity : {0, 1, 2}) {
    SCOPED_TRACE(capacity);
    auto recorder = std::make_shared<CollectiveRecorder>(capacity);
    auto silent = std::make_unique<SilentCommunicator>();
    SilentCommunicator* backend = silent.get();
    auto comm = recordCollectives(std::move(silent), recorder, "world");
    std::vector<float> x(4);
    auto slow = comm->allgather(x.data(), x.data(), 1, DataType::kF32);  // 1 x 1 x 4 bytes
    auto dropped = comm->barrier();
    auto quick = comm->allreduce(x.data(), 3, DataType::kF32, ReduceOp::kSum);
    backend->works[2]->finished = true;
    ASSERT_TRUE(quick->wait(kWait).ok());
    dropped.reset();
    backend->works[0]->finished = true;
    ASSERT_TRUE(slow->wait(kWait).ok());
    std::map<std::string, CollectiveTotals> by_op;
    for (const auto& t : recorder->totals()) by_op[t.op] = t;
    EXPECT_EQ(by_op["allgather"].completed, 1u);
    EXPECT_EQ(by_op["allgather"].bytes, 4u);
    EXPECT_EQ(by_op["barrier"].abandoned, 1u);
    EXPECT_EQ(by_op["allreduce"].completed, 1u);
    EXPECT_EQ(by_op["allreduce"].bytes, 12u);
    EXPECT_EQ(recorder->records().size(), capacity);
    // Nothing left in flight: the slow one's completion found its totals after its slot went.
    EXPECT_NE(recorder->prometheus({}).find("_in_flight{backend=\"silent\",comm=\"world\",op="
                                            "\"allgather\"} 0\n"),
              std::string::npos);
  }
}

TEST(CollectiveRecorder, TheChromeTraceHasATrackPerCommunicatorAndAnEventPerOperation) {
  auto recorder = std::make_shared<CollectiveRecorder>(10);
  auto silent = std::make_unique<SilentCommunicator>();
  SilentCommunicator* backend = silent.get();
  auto comm = recordCollectives(std::move(silent), recorder, "world");
  std::vector<float> x(8);
  auto done = comm->reduceScatter(x.data(), x.data(), 8, DataType::kBF16, ReduceOp::kAvg);
  backend->works.back()->finished = true;
  ASSERT_TRUE(done->wait(kWait).ok());
  auto running = comm->broadcast(x.data(), 8, DataType::kF16, 0);

  const auto trace = nlohmann::json::parse(recorder->chromeTrace({.rank = 3}));
  ASSERT_TRUE(trace.contains("traceEvents"));
  std::vector<nlohmann::json> complete, meta;
  for (const auto& e : trace["traceEvents"]) (e["ph"] == "X" ? complete : meta).push_back(e);
  ASSERT_EQ(complete.size(), 2u);
  EXPECT_EQ(complete[0]["name"], "reduce_scatter");
  EXPECT_EQ(complete[0]["pid"], 3);
  EXPECT_EQ(complete[0]["args"]["seq"], 1);
  EXPECT_EQ(complete[0]["args"]["type"], "bf16");
  EXPECT_EQ(complete[0]["args"]["reduce"], "avg");
  EXPECT_EQ(complete[0]["args"]["bytes"], 16);  // the input: size() x 8 x 2 bytes
  EXPECT_EQ(complete[0]["args"]["state"], "ok");
  EXPECT_EQ(complete[1]["args"]["state"], "pending");
  EXPECT_EQ(complete[1]["args"]["root"], 0);
  EXPECT_GE(complete[1]["dur"].get<std::int64_t>(), 0);
  EXPECT_EQ(complete[0]["tid"], complete[1]["tid"]);
  bool named_process = false, named_track = false;
  for (const auto& m : meta) {
    if (m["name"] == "process_name") named_process = m["args"]["name"] == "rank 3";
    if (m["name"] == "thread_name") named_track = m["args"]["name"] == "world";
  }
  EXPECT_TRUE(named_process);
  EXPECT_TRUE(named_track);
  EXPECT_EQ(trace["otherData"]["rank"], 3);
}

TEST(CollectiveRecorder, PrometheusTextHasEveryFamilyWithTheGivenLabelsEscaped) {
  auto recorder = std::make_shared<CollectiveRecorder>(10);
  auto silent = std::make_unique<SilentCommunicator>();
  SilentCommunicator* backend = silent.get();
  auto comm = recordCollectives(std::move(silent), recorder, "world");
  std::vector<float> x(256);
  auto w = comm->allreduce(x.data(), x.size(), DataType::kF32, ReduceOp::kSum);
  backend->works.back()->finished = true;
  ASSERT_TRUE(w->wait(kWait).ok());
  const std::string text = recorder->prometheus({{"rank", "2"}, {"job", "a\"b\\c"}});
  const std::string labels =
      "{backend=\"silent\",comm=\"world\",job=\"a\\\"b\\\\c\",op=\"allreduce\",rank=\"2\"}";
  for (const std::string& line :
       std::vector<std::string>{"# TYPE rally_collective_operations_total counter",
                                "rally_collective_operations_total" + labels + " 1",
                                "rally_collective_failures_total" + labels + " 0",
                                "rally_collective_bytes_total" + labels + " 1024",
                                "# TYPE rally_collective_in_flight gauge",
                                "rally_collective_in_flight" + labels + " 0"}) {
    EXPECT_NE(text.find(line + "\n"), std::string::npos) << line << "\nin:\n" << text;
  }
  EXPECT_NE(text.find("rally_collective_busy_seconds_total" + labels + " "), std::string::npos);
}

}  // namespace
}  // namespace rally::collectives
