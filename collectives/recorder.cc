#include "collectives/recorder.h"

#include <fmt/format.h>

#include <atomic>
#include <cstring>
#include <nlohmann/json.hpp>
#include <utility>

#include "kernels/base/telemetry_files.h"
#include "kernels/base/units.h"

namespace rally::collectives {
namespace {

using Clock = std::chrono::system_clock;
using Time = CollectiveRecord::Time;

std::int64_t micros(Time t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
}

// "850 us", "3.1 ms", "2.0 s".
std::string formatSpan(Time from, Time to) { return formatElapsed(micros(to) - micros(from)); }

// "12 B", "3.9 KiB", "4.0 MiB".
std::string formatSize(size_t bytes) {
  if (bytes < 1024) return fmt::format("{} B", bytes);
  const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes) / 1024;
  size_t u = 0;
  for (; v >= 1024 && u + 1 < std::size(units); ++u) v /= 1024;
  return fmt::format("{:.1f} {}", v, units[u]);
}

const char* stateName(CollectiveRecord::State s) {
  switch (s) {
    case CollectiveRecord::State::kPending:
      return "pending";
    case CollectiveRecord::State::kOk:
      return "ok";
    case CollectiveRecord::State::kFailed:
      return "failed";
    case CollectiveRecord::State::kUnknown:
      return "unknown";
  }
  return "?";
}

class RecordedWork final : public Work {
 public:
  RecordedWork(std::shared_ptr<Work> inner, std::shared_ptr<CollectiveRecorder> recorder,
               std::uint64_t id)
      : inner_(std::move(inner)), recorder_(std::move(recorder)), id_(id) {
    // A plain pointer (small enough for std::function to keep without allocating): the backend
    // tells its observers only while it lives, and RecordedCommunicator keeps the recorder alive
    // until its backend is destroyed.
    observed_ = inner_->observe(Observer{
        .started = [r = recorder_.get(), id] { r->started(id, Clock::now()); },
        .completed = [r = recorder_.get(),
                      id](const Status& s) { r->completed(id, s, Clock::now()); },
    });
  }
  ~RecordedWork() override {
    // Not polled here: a poll may act (NCCL's times out and aborts the communicator).
    if (!observed_ && !finished_.load()) recorder_->abandoned(id_, Clock::now());
  }

  Status wait(Milliseconds timeout) override {
    Status s = inner_->wait(timeout);
    if (!observed_) {
      if (s.code() != StatusCode::kTimeout) {
        finish(s);
      } else if (inner_->done()) {
        // Ended with Timeout (the backend's op_timeout), or ended just after the wait gave up.
        finish(inner_->wait(Milliseconds(0)));
      }
    }
    return s;
  }
  bool done() const override {
    const bool d = inner_->done();
    if (d && !observed_) finish(inner_->wait(Milliseconds(0)));
    return d;
  }
  // The recorder is this operation's observer.
  bool observe(Observer) override { return false; }

 private:
  void finish(const Status& s) const {
    if (!finished_.exchange(true)) recorder_->completed(id_, s, Clock::now());
  }

  const std::shared_ptr<Work> inner_;
  const std::shared_ptr<CollectiveRecorder> recorder_;
  const std::uint64_t id_;
  bool observed_ = false;
  mutable std::atomic<bool> finished_{false};
};

class RecordedCommunicator final : public Communicator {
 public:
  RecordedCommunicator(std::unique_ptr<Communicator> inner,
                       std::shared_ptr<CollectiveRecorder> recorder, std::string name)
      : recorder_(std::move(recorder)), inner_(std::move(inner)), name_(std::move(name)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::uint64_t generation() const override { return inner_->generation(); }
  std::string_view backend() const override { return inner_->backend(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }

  std::shared_ptr<Work> allreduce(void* data, size_t count, DataType type, ReduceOp op) override {
    return record("allreduce", type, op, count, 1, -1,
                  [&] { return inner_->allreduce(data, count, type, op); });
  }
  std::shared_ptr<Work> reduceScatter(const void* in, void* out, size_t count, DataType type,
                                      ReduceOp op) override {
    return record("reduce_scatter", type, op, count, size(), -1,
                  [&] { return inner_->reduceScatter(in, out, count, type, op); });
  }
  std::shared_ptr<Work> allgather(const void* in, void* out, size_t count, DataType type) override {
    return record("allgather", type, std::nullopt, count, size(), -1,
                  [&] { return inner_->allgather(in, out, count, type); });
  }
  std::shared_ptr<Work> broadcast(void* data, size_t count, DataType type, int root) override {
    return record("broadcast", type, std::nullopt, count, 1, root,
                  [&] { return inner_->broadcast(data, count, type, root); });
  }
  std::shared_ptr<Work> alltoall(const void* in, void* out, size_t count, DataType type) override {
    return record("alltoall", type, std::nullopt, count, size(), -1,
                  [&] { return inner_->alltoall(in, out, count, type); });
  }
  std::shared_ptr<Work> send(const void* data, size_t count, DataType type, int peer) override {
    return record("send", type, std::nullopt, count, 1, peer,
                  [&] { return inner_->send(data, count, type, peer); });
  }
  std::shared_ptr<Work> recv(void* data, size_t count, DataType type, int peer) override {
    return record("recv", type, std::nullopt, count, 1, peer,
                  [&] { return inner_->recv(data, count, type, peer); });
  }
  std::shared_ptr<Work> barrier() override {
    return record("barrier", std::nullopt, std::nullopt, 0, 1, -1,
                  [&] { return inner_->barrier(); });
  }

  Status waitForEvent(void* event) override { return inner_->waitForEvent(event); }
  void abort(const std::string& reason) override { inner_->abort(reason); }
  bool aborted() const override { return inner_->aborted(); }

  // Sub-communicators are named as the Gloo and MPI backends name them, so that the records and
  // the backends' error messages agree: "world/split0/color1" (the parent's first split; split is
  // collective, so the same on every rank), "world/shrink0".
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    return derive(
        "split", [&] { return inner_->split(color, key); },
        fmt::format("/split{}/color{}", splits_++, color));
  }
  Result<std::unique_ptr<Communicator>> shrink(const std::vector<int>& excluded) override {
    return derive(
        "shrink", [&] { return inner_->shrink(excluded); }, fmt::format("/shrink{}", shrinks_++));
  }

 private:
  // Records the operation, then issues it.
  template <typename Issue>
  std::shared_ptr<Work> record(const char* op, std::optional<DataType> type,
                               std::optional<ReduceOp> reduce, size_t count, int blocks, int peer,
                               Issue issue) {
    const auto id = begin(op, type, reduce, count, blocks, peer);
    return std::make_shared<RecordedWork>(guarded(id, issue), recorder_, id);
  }

  // f()'s result; if the backend throws, operation `id` is recorded as failed, and it rethrows.
  template <typename F>
  auto guarded(std::uint64_t id, F f) -> decltype(f()) {
    try {
      return f();
    } catch (const std::exception& e) {
      recorder_->completed(id, internalError(fmt::format("the backend threw: {}", e.what())),
                           Clock::now());
      throw;
    }
  }

  // Collectives are numbered in one sequence per communicator (every rank issues them all, in
  // the same order); send and recv, which only two ranks issue, in one per peer (the n-th send to
  // a peer matches the n-th recv from this rank there).
  std::uint64_t nextSeq(const char* op, int peer) {
    if (std::strcmp(op, "send") != 0 && std::strcmp(op, "recv") != 0) return ++seq_;
    std::lock_guard lock(p2p_mu_);
    return ++p2p_seq_[{op[0] == 's', peer}];
  }

  std::uint64_t begin(const char* op, std::optional<DataType> type, std::optional<ReduceOp> reduce,
                      size_t count, int blocks, int peer) {
    CollectiveRecord r;
    r.seq = nextSeq(op, peer);
    r.comm = name_;
    r.backend = std::string(inner_->backend());
    r.generation = inner_->generation();
    r.rank = inner_->rank();
    r.size = inner_->size();
    r.op = op;
    r.type = type;
    r.reduce = reduce;
    r.count = count;
    r.bytes = type ? count * dataTypeSize(*type) * static_cast<size_t>(blocks) : 0;
    r.peer = peer;
    r.issued = r.started = Clock::now();
    return recorder_->begin(std::move(r));
  }

  template <typename Make>
  Result<std::unique_ptr<Communicator>> derive(const char* op, Make make,
                                               const std::string& suffix) {
    const auto id = begin(op, std::nullopt, std::nullopt, 0, 1, -1);
    auto sub = guarded(id, make);
    recorder_->completed(id, sub.status(), Clock::now());
    if (!sub.ok()) return sub.status();
    return recordCollectives(std::move(*sub), recorder_, name_ + suffix);
  }

  // Declared first, destroyed last: the backend's worker may still complete operations (and tell
  // their observers) while `inner_` is destroyed.
  const std::shared_ptr<CollectiveRecorder> recorder_;
  const std::unique_ptr<Communicator> inner_;
  const std::string name_;
  std::atomic<std::uint64_t> seq_{0};
  std::atomic<int> splits_{0}, shrinks_{0};
  std::mutex p2p_mu_;
  std::map<std::pair<bool, int>, std::uint64_t> p2p_seq_;  // (send?, peer) -> last seq
};

}  // namespace

std::string CollectiveRecord::describe(Time now) const {
  std::string what = op;
  if (type) {
    what += fmt::format(" {} ({} x {}", formatSize(bytes), count, dataTypeName(*type));
    if (reduce) what += fmt::format(", {}", reduceOpName(*reduce));
    if (peer >= 0) what += fmt::format(", {} {}", op == "broadcast" ? "root" : "peer", peer);
    what += ")";
  }
  std::string outcome;
  switch (state) {
    case State::kPending:
      outcome = fmt::format("pending for {}", formatSpan(issued, now));
      break;
    case State::kOk:
      outcome = fmt::format("ok in {}", formatSpan(started, completed));
      break;
    case State::kFailed:
      outcome = fmt::format("failed after {}: {}", formatSpan(started, completed), error);
      break;
    case State::kUnknown:
      outcome = fmt::format("end unknown (dropped by the caller {} after it was issued)",
                            formatSpan(issued, completed));
      break;
  }
  return fmt::format("#{} {} on {} [{}, generation {}, rank {} of {}]: {}", seq, what, comm,
                     backend, generation, rank, size, outcome);
}

CollectiveRecorder::CollectiveRecorder(size_t capacity) : capacity_(capacity) {
  ring_.reserve(std::min<size_t>(capacity, 4096));
}

std::uint64_t CollectiveRecorder::begin(CollectiveRecord record) {
  std::lock_guard lock(mu_);
  const std::uint64_t id = next_id_++;
  record.id = id;
  CollectiveTotals* totals = &totalsLocked(record.comm, record.backend, record.op);
  ++totals->issued;
  if (capacity_ == 0) {
    overflow_[id] = Pending{totals, record.bytes, record.started};
    return id;
  }
  if (ring_.size() < capacity_) {
    ring_.push_back(Slot{std::move(record), totals});
    return id;
  }
  Slot& slot = ring_[(id - 1) % capacity_];
  if (slot.record.state == CollectiveRecord::State::kPending) {  // still running: keep its totals
    overflow_[slot.record.id] = Pending{slot.totals, slot.record.bytes, slot.record.started};
  }
  slot.record = std::move(record);
  slot.totals = totals;
  return id;
}

std::optional<CollectiveRecorder::Running> CollectiveRecorder::findRunningLocked(std::uint64_t id) {
  if (capacity_ > 0 && id > 0 && id < next_id_) {
    Slot& slot = ring_[(id - 1) % capacity_];
    if (slot.record.id == id) {
      if (slot.record.state != CollectiveRecord::State::kPending) return std::nullopt;
      return Running{&slot.record, nullptr};
    }
  }
  auto it = overflow_.find(id);
  if (it == overflow_.end()) return std::nullopt;
  return Running{nullptr, &it->second};
}

CollectiveTotals& CollectiveRecorder::totalsLocked(const std::string& comm,
                                                   const std::string& backend,
                                                   const std::string& op) {
  auto [it, inserted] = totals_.try_emplace({comm, backend, op});
  if (inserted) {
    it->second.comm = comm;
    it->second.backend = backend;
    it->second.op = op;
  }
  return it->second;
}

void CollectiveRecorder::started(std::uint64_t id, Time t) {
  std::lock_guard lock(mu_);
  auto running = findRunningLocked(id);
  if (!running) return;
  if (running->record) running->record->started = t;
  if (running->pending) running->pending->started = t;
}

void CollectiveRecorder::completed(std::uint64_t id, const Status& status, Time t) {
  std::lock_guard lock(mu_);
  auto running = findRunningLocked(id);
  if (!running) return;  // told twice, or abandoned
  CollectiveTotals* totals;
  size_t bytes;
  Time started;
  if (CollectiveRecord* r = running->record) {
    totals = ring_[(id - 1) % capacity_].totals;
    bytes = r->bytes;
    started = r->started;
    r->completed = t;
    r->state = status.ok() ? CollectiveRecord::State::kOk : CollectiveRecord::State::kFailed;
    if (!status.ok()) r->error = status.toString();
  } else {
    totals = running->pending->totals;
    bytes = running->pending->bytes;
    started = running->pending->started;
    overflow_.erase(id);
  }
  if (status.ok()) {
    ++totals->completed;
    totals->bytes += bytes;
    // Clamped: the wall clock may step back.
    totals->busy_seconds += std::max(0.0, std::chrono::duration<double>(t - started).count());
  } else {
    ++totals->failed;
  }
}

void CollectiveRecorder::abandoned(std::uint64_t id, Time t) {
  std::lock_guard lock(mu_);
  auto running = findRunningLocked(id);
  if (!running) return;
  if (CollectiveRecord* r = running->record) {
    ++ring_[(id - 1) % capacity_].totals->abandoned;
    r->completed = t;
    r->state = CollectiveRecord::State::kUnknown;
  } else {
    ++running->pending->totals->abandoned;
    overflow_.erase(id);
  }
}

std::vector<CollectiveRecord> CollectiveRecorder::records() const {
  std::lock_guard lock(mu_);
  std::vector<CollectiveRecord> out;
  out.reserve(ring_.size());
  if (ring_.empty()) return out;
  const size_t first = ring_.size() < capacity_ ? 0 : (next_id_ - 1) % capacity_;
  for (size_t i = 0; i < ring_.size(); ++i) out.push_back(ring_[(first + i) % ring_.size()].record);
  return out;
}

std::uint64_t CollectiveRecorder::dropped() const {
  std::lock_guard lock(mu_);
  const std::uint64_t issued = next_id_ - 1;
  return issued > capacity_ ? issued - capacity_ : 0;
}

std::vector<CollectiveTotals> CollectiveRecorder::totals() const {
  std::lock_guard lock(mu_);
  std::vector<CollectiveTotals> out;
  for (const auto& [key, t] : totals_) out.push_back(t);
  return out;
}

std::string CollectiveRecorder::chromeTrace(const TraceOptions& options) const {
  const auto records = this->records();
  const Time now = Clock::now();
  using nlohmann::json;
  json events = json::array();
  const int pid = options.rank;
  events.push_back({{"ph", "M"},
                    {"name", "process_name"},
                    {"pid", pid},
                    {"args",
                     {{"name", options.process_name.empty() ? fmt::format("rank {}", pid)
                                                            : options.process_name}}}});
  events.push_back(
      {{"ph", "M"}, {"name", "process_sort_index"}, {"pid", pid}, {"args", {{"sort_index", pid}}}});
  std::map<std::string, int> tracks;
  for (const auto& r : records) {
    auto [it, inserted] = tracks.try_emplace(r.comm, static_cast<int>(tracks.size()) + 1);
    if (inserted) {
      events.push_back({{"ph", "M"},
                        {"name", "thread_name"},
                        {"pid", pid},
                        {"tid", it->second},
                        {"args", {{"name", r.comm}}}});
    }
    const Time end = r.state == CollectiveRecord::State::kPending ? now : r.completed;
    json args = {{"seq", r.seq},
                 {"comm", r.comm},
                 {"backend", r.backend},
                 {"generation", r.generation},
                 {"rank", r.rank},
                 {"size", r.size},
                 {"count", r.count},
                 {"bytes", r.bytes},
                 {"state", stateName(r.state)},
                 {"issued_us", micros(r.issued)},
                 {"queued_us", micros(r.started) - micros(r.issued)}};
    if (r.type) args["type"] = std::string(dataTypeName(*r.type));
    if (r.reduce) args["reduce"] = std::string(reduceOpName(*r.reduce));
    if (r.peer >= 0) args[r.op == "broadcast" ? "root" : "peer"] = r.peer;
    if (!r.error.empty()) args["error"] = r.error;
    events.push_back({{"ph", "X"},
                      {"cat", "collective"},
                      {"name", r.op},
                      {"pid", pid},
                      {"tid", it->second},
                      {"ts", micros(r.started)},
                      {"dur", std::max<std::int64_t>(0, micros(end) - micros(r.started))},
                      {"args", std::move(args)}});
  }
  json trace = {{"traceEvents", std::move(events)},
                {"displayTimeUnit", "ms"},
                {"otherData",
                 {{"rank", pid},
                  {"run", options.run},
                  {"capacity", capacity_},
                  {"dropped", dropped()},
                  {"written_us", micros(now)}}}};
  // Error texts may hold bytes that are not UTF-8: replaced, not thrown on.
  return trace.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

std::string CollectiveRecorder::prometheus(const std::map<std::string, std::string>& labels) const {
  const auto all = totals();
  std::string out;
  const auto family = [&](const char* name, const char* type, const char* help, auto value) {
    out += prometheusHeader(name, type, help);
    for (const auto& t : all) {
      auto sample = labels;
      sample["comm"] = t.comm;
      sample["backend"] = t.backend;
      sample["op"] = t.op;
      out += fmt::format("{}{} {}\n", name, prometheusLabels(sample), value(t));
    }
  };
  family("rally_collective_operations_total", "counter",
         "Collective operations that completed successfully.",
         [](const CollectiveTotals& t) { return fmt::format("{}", t.completed); });
  family("rally_collective_failures_total", "counter",
         "Collective operations that failed (aborted, peer lost, timed out, refused).",
         [](const CollectiveTotals& t) { return fmt::format("{}", t.failed); });
  family("rally_collective_bytes_total", "counter",
         "Bytes of this rank's buffers in the operations that completed successfully.",
         [](const CollectiveTotals& t) { return fmt::format("{}", t.bytes); });
  family("rally_collective_busy_seconds_total", "counter",
         "Seconds from start to completion of the operations that completed successfully.",
         [](const CollectiveTotals& t) { return fmt::format("{:.6f}", t.busy_seconds); });
  family("rally_collective_in_flight", "gauge",
         "Collective operations issued whose end is not known yet.", [](const CollectiveTotals& t) {
           return fmt::format("{}", t.issued - t.completed - t.failed - t.abandoned);
         });
  return out;
}

std::string CollectiveRecorder::describeRecent(size_t n) const {
  const auto records = this->records();
  const Time now = Clock::now();
  std::string out;
  const size_t from = records.size() > n ? records.size() - n : 0;
  for (size_t i = from; i < records.size(); ++i) {
    if (!out.empty()) out += '\n';
    out += records[i].describe(now);
  }
  return out;
}

std::unique_ptr<Communicator> recordCollectives(std::unique_ptr<Communicator> inner,
                                                std::shared_ptr<CollectiveRecorder> recorder,
                                                std::string name) {
  return std::make_unique<RecordedCommunicator>(std::move(inner), std::move(recorder),
                                                std::move(name));
}

}  // namespace rally::collectives
