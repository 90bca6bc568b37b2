// Collectives through one shared-memory segment, for the ranks of a communicator that share a host
// (the Gloo backend uses it when every rank is on one host; TCP otherwise).
//
// The segment holds a header (per-rank progress counters, a wake word for sleeping waiters) and
// two buffers of `size` slots each. Every operation is a sequence of steps; step k uses buffer
// k % 2, so a rank can fill one buffer while slower ranks still read the other. A step:
//   1. wait until every rank finished step k - 2 (the last one that used this buffer);
//   2. copy this rank's input into its slot; publish `arrive = k + 1`;
//   3. (reductions) wait for every rank's arrival, reduce this rank's block over every rank;
//      publish `reduced = k + 1`;
//   4. wait for what this rank reads, copy the results out; publish `done = k + 1`.
// The ranks reduce disjoint blocks in parallel. A rank never copies in the block it reduces itself
// (it reads that from its own buffer) and puts its reduced block in its own slot, where that
// block's input would have been; so an allreduce moves (P-1)/P of the data in and out per rank
// and reduces from where the data already is: the bus traffic of a reduce-scatter plus an
// allgather, with no network stack and no extra copy.
//
// Waiting spins briefly (not at all when the ranks outnumber the cores: the rank waited for is
// then usually not running), then yields, then sleeps on a futex that publishers wake; while
// asleep it checks, every few milliseconds, whether a peer's process exited (pidfd) or a peer
// aborted, and the operation timeout. So a dead peer surfaces as PeerLost within milliseconds.
//
// Not thread-safe: one thread runs the operations (the communicator's executor); abort() may come
// from any thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "kernels/base/status.h"
#include "kernels/base/units.h"

namespace rally::collectives::internal {

class ShmGroup {
 public:
  // The most bytes exchange() carries per rank.
  static constexpr size_t kMaxExchangeBytes = 64;

  // Rank 0: creates a fresh segment of 2 x `size` slots of `slot_bytes` (space is reserved up
  // front, so a full /dev/shm is an error here, not a SIGBUS later). Pass name() to the others.
  static Result<std::unique_ptr<ShmGroup>> create(int size, size_t slot_bytes,
                                                  Milliseconds op_timeout);
  // The other ranks: opens the segment rank 0 created. Fails if it is not reachable from here
  // (another host, another /dev/shm) or if this process is in another PID namespace than rank 0
  // (peers are watched by PID).
  static Result<std::unique_ptr<ShmGroup>> open(const std::string& name, int rank, int size,
                                                Milliseconds op_timeout);
  ~ShmGroup();
  ShmGroup(const ShmGroup&) = delete;
  ShmGroup& operator=(const ShmGroup&) = delete;

  const std::string& name() const { return name_; }
  size_t slotBytes() const { return slot_bytes_; }
  // Once every rank has opened the segment: removes its name, so that nothing is left in /dev/shm
  // whatever happens to the processes later. Then watches the peers' processes.
  void ready();

  // Each returns OK; Aborted (abort() on this rank); PeerLost (a peer aborted, or its process
  // exited); or Timeout (a peer did not answer within op_timeout).
  Status allreduce(void* data, size_t count, DataType type, ReduceOp op);
  // `in`: size * count elements; this rank's block of the reduction goes to `out`.
  Status reduceScatter(const void* in, void* out, size_t count, DataType type, ReduceOp op);
  Status allgather(const void* in, void* out, size_t bytes);
  Status broadcast(void* data, size_t bytes, int root);
  Status alltoall(const void* in, void* out, size_t bytes_per_rank);
  Status barrier();
  // Every rank's `mine` (at most kMaxExchangeBytes, the same length on every rank) into `all`, in
  // rank order.
  Status exchange(const void* mine, size_t bytes, void* all);

  // From any thread, idempotent: this rank's waiting and later operations fail with Aborted, and
  // its peers' with PeerLost.
  void abort();

  struct Header;     // (defined in the .cc)
  struct RankState;  // (defined in the .cc)

 private:
  enum Counter { kArrive, kReduced, kDone };

  ShmGroup(std::string name, int rank, int size, void* base, size_t bytes, Milliseconds op_timeout,
           bool owner);
  RankState& state(int r) const;
  char* slot(std::uint64_t step, int r) const;
  // Starts the next step: waits until its buffer is free (every rank finished step k - 2).
  Result<std::uint64_t> beginStep();
  void publish(Counter c, std::uint64_t value);
  // Waits until rank `r`'s (or, with r = -1, every rank's) counter `c` reaches `value`.
  Status waitFor(Counter c, std::uint64_t value, int r);
  bool reached(Counter c, std::uint64_t value, int r) const;
  Status checkPeers();
  template <typename Source>
  void reduceBlock(DataType type, ReduceOp op, size_t b0, size_t b1, Source source, char* out,
                   char* also) const;

  // The reduction works in pieces of this size, so a piece is still in the first-level cache
  // when it is copied to its second destination.
  static constexpr size_t kReducePieceBytes = 16 * 1024;

  std::string name_;
  int rank_;
  int size_;
  void* base_;
  size_t bytes_;
  Header* header_;
  size_t slot_bytes_ = 0;
  char* data_ = nullptr;
  Milliseconds op_timeout_;
  bool owner_;
  bool unlinked_ = false;
  std::uint64_t step_ = 0;
  int spins_ = 0;  // pause-spins before yielding (0 with more ranks than cores)
  std::atomic<bool> aborted_{false};
  std::vector<int> peer_pidfds_;  // -1: this process, or pidfd_open unavailable
  std::vector<int> peer_pids_;
};

}  // namespace rally::collectives::internal
