// A flight recorder for collectives: every operation issued on a recorded communicator (and on the
// sub-communicators split or shrunk from it) is kept in a bounded ring with its sizes, when it was
// issued, started and completed, and how it ended; totals per communicator and operation are kept
// for the life of the process. What it is for:
//   - a timeline: chromeTrace() is the Chrome trace event format (Perfetto, chrome://tracing), one
//     process per rank and one track per communicator;
//   - finding the rank a job waits for: an operation's `seq` is its number on its communicator,
//     the same on every rank (every rank issues the same operations in the same order), so the
//     ranks' records of one seq can be compared (`rally trace`);
//   - metrics: prometheus() is the Prometheus text exposition format (operations, bytes, busy
//     seconds and failures per communicator and operation).
//
//   auto recorder = std::make_shared<CollectiveRecorder>(2000);
//   auto comm = recordCollectives(std::move(gloo), recorder, "world");
//   comm->allreduce(...)->wait(...);
//   std::string trace = recorder->chromeTrace({.rank = 0});  // a file for Perfetto
//
// Times: issued when the caller issued it; started when the backend's worker began it (Gloo, MPI;
// the issue time where the backend cannot tell, as NCCL's stream order); completed when the backend
// completed it (Gloo, MPI) or when the caller first saw it complete in wait() or done() (NCCL).
//
// Thread-safety: everything may be called from any thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives {

struct CollectiveRecord {
  // kUnknown: the caller dropped the operation before its end was seen (NCCL, never waited on).
  enum class State { kPending, kOk, kFailed, kUnknown };
  using Time = std::chrono::system_clock::time_point;

  std::uint64_t id = 0;  // the recorder's, 1-based, in issue order over all its communicators
  // The operation's number on its communicator, 1-based: the same on every rank. send and recv are
  // numbered per peer instead (the n-th send to a peer matches the n-th recv there).
  std::uint64_t seq = 0;
  std::string comm;  // the communicator's name ("world", "world/split0/color1")
  std::string backend;
  std::uint64_t generation = 0;
  int rank = 0;
  int size = 0;
  std::string op;  // "allreduce", "reduce_scatter", ..., "split", "shrink"
  std::optional<DataType> type;
  std::optional<ReduceOp> reduce;
  size_t count = 0;  // elements, as passed
  size_t bytes =
      0;          // this rank's larger buffer: count x element size, x size() for the gathered side
  int peer = -1;  // broadcast: the root; send and recv: the peer
  Time issued{};
  Time started{};    // == issued where the backend cannot tell
  Time completed{};  // epoch while pending; kUnknown: when it was dropped
  State state = State::kPending;
  std::string error;  // the failure's status, whole

  // "#12 allreduce 4 MiB (1048576 x f32, sum) on world [gloo, generation 3, rank 1 of 4]: failed
  // after 3.1 s: PeerLost: ..." ("pending for 2.0 s" while it runs, at `now`).
  std::string describe(Time now) const;
};

// One communicator and operation's totals over the process's life.
struct CollectiveTotals {
  std::string comm;
  std::string backend;
  std::string op;
  std::uint64_t issued = 0;
  std::uint64_t completed = 0;  // successfully
  std::uint64_t failed = 0;
  std::uint64_t abandoned = 0;  // dropped by the caller before their end was seen
  std::uint64_t bytes = 0;      // of the completed ones
  double busy_seconds = 0;      // started to completed, of the completed ones
};

class CollectiveRecorder {
 public:
  // Keeps the newest `capacity` records (0: none, totals only).
  explicit CollectiveRecorder(size_t capacity);
  CollectiveRecorder(const CollectiveRecorder&) = delete;
  CollectiveRecorder& operator=(const CollectiveRecorder&) = delete;

  size_t capacity() const { return capacity_; }
  // Oldest first.
  std::vector<CollectiveRecord> records() const;
  // Records no longer kept because newer ones took their place.
  std::uint64_t dropped() const;
  // Sorted by communicator, backend, then operation.
  std::vector<CollectiveTotals> totals() const;

  struct TraceOptions {
    int rank = 0;              // the trace's process id
    std::string process_name;  // empty: "rank N"
    std::string run;           // the job's id, so that readers can tell jobs apart
  };
  // The kept records as a Chrome trace (JSON object format): an "X" event per operation from its
  // start to its completion (pending ones end now), on a track per communicator, with the details
  // in its args; queueing (issued to started) is args.queued_us.
  std::string chromeTrace(const TraceOptions& options) const;
  // Totals in the Prometheus text format (rally_collective_*), each sample with `labels` added.
  std::string prometheus(const std::map<std::string, std::string>& labels) const;
  // The newest `n` records, one per line, newest last (for a failure's log).
  std::string describeRecent(size_t n) const;

  // For recordCollectives' communicators.
  std::uint64_t begin(CollectiveRecord record);
  void started(std::uint64_t id, CollectiveRecord::Time t);
  void completed(std::uint64_t id, const Status& status, CollectiveRecord::Time t);
  // The caller dropped an operation whose end it never learnt.
  void abandoned(std::uint64_t id, CollectiveRecord::Time t);

 private:
  // What completing an operation needs: its totals, bytes and start.
  struct Pending {
    CollectiveTotals* totals;
    size_t bytes;
    CollectiveRecord::Time started;
  };
  // An operation still running: in its ring slot, or in overflow_ once its slot was reused.
  struct Running {
    CollectiveRecord* record;  // null when no longer kept
    Pending* pending;          // null when in the ring
  };
  std::optional<Running> findRunningLocked(std::uint64_t id);
  CollectiveTotals& totalsLocked(const std::string& comm, const std::string& backend,
                                 const std::string& op);

  const size_t capacity_;
  mutable std::mutex mu_;
  struct Slot {
    CollectiveRecord record;
    CollectiveTotals* totals = nullptr;
  };
  std::vector<Slot> ring_;  // slot (id - 1) % capacity_
  std::uint64_t next_id_ = 1;
  std::map<std::uint64_t, Pending> overflow_;  // running operations whose slot was reused
  // (comm, backend, op) -> totals; a map's nodes stay put, so Slot and Pending point into it.
  std::map<std::tuple<std::string, std::string, std::string>, CollectiveTotals> totals_;
};

// A communicator that records every operation of `inner` in `recorder` under `name`; sub-
// communicators it splits or shrinks are recorded too, named as the backends name them:
// "NAME/splitS/colorC" (its S-th split, from 0: the same on every rank) and "NAME/shrinkK".
// Everything else is forwarded.
std::unique_ptr<Communicator> recordCollectives(std::unique_ptr<Communicator> inner,
                                                std::shared_ptr<CollectiveRecorder> recorder,
                                                std::string name);

}  // namespace rally::collectives
