// Collectives over the TCP pairs of a Gloo context (ranks on different hosts), built on unbound
// buffers this class owns, so that abort() can interrupt any wait at once: Gloo's own algorithms
// wait on buffers nobody else can reach, and a local close() does not wake them.
//
// Algorithms: allreduce = ring reduce-scatter + ring allgather (each rank sends 2 (n-1)/n of the
// data); reduce-scatter and allgather are the two halves; broadcast sends from the root to each
// rank; all-to-all and barrier post every pairwise transfer at once.
//
// Every method throws gloo::IoException: when a pair breaks (a peer is gone), on timeout (the
// message contains "Timed out"), or after abort(). Not thread-safe except abort().
#pragma once

#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives::internal {

class TcpCollectives {
 public:
  TcpCollectives(std::shared_ptr<gloo::Context> context, Milliseconds timeout);
  ~TcpCollectives();
  TcpCollectives(const TcpCollectives&) = delete;
  TcpCollectives& operator=(const TcpCollectives&) = delete;

  void allreduce(void* data, size_t count, DataType type, ReduceOp op);
  // `in`: size * count elements; this rank's reduced block goes to `out`.
  void reduceScatter(const void* in, void* out, size_t count, DataType type, ReduceOp op);
  void allgather(const void* in, void* out, size_t bytes);
  void broadcast(void* data, size_t bytes, int root);
  void alltoall(const void* in, void* out, size_t bytes_per_rank);
  void barrier();

  // From any thread: the wait in progress, and every later one, throws at once.
  void abort();

 private:
  using Buffer = std::unique_ptr<gloo::transport::UnboundBuffer>;
  Buffer buffer(void* data, size_t bytes);  // registered for abort() until released
  void release(const Buffer& b);
  void waitRecv(const Buffer& b);
  void waitSend(const Buffer& b);
  [[noreturn]] void interrupted();  // a wait returned early: abort() or a lost peer
  void watch();                     // the watcher thread (see the .cc)
  std::uint64_t slots(int count);   // reserves `count` fresh slots; returns the first
  // In place over `data`: segment j is elements [begin(j), begin(j + 1)); afterwards this rank's
  // segment holds the reduction.
  void ringReduceScatterInPlace(char* data, size_t count, DataType type, ReduceOp op,
                                const std::vector<size_t>& begin);
  // In place: every rank's segment (given by byte offsets `begin`) to every rank.
  void ringAllgatherInPlace(char* data, const std::vector<size_t>& begin);

  std::shared_ptr<gloo::Context> context_;
  Milliseconds timeout_;
  int rank_, size_;
  std::uint64_t next_slot_ = 0;
  std::mutex mu_;  // guards active_ against abort()
  std::vector<gloo::transport::UnboundBuffer*> active_;
  bool aborted_ = false;
  std::string lost_;  // set by the watcher when a connection broke
  char sentinel_byte_ = 0;
  Buffer sentinel_;
  std::thread watcher_;
};

}  // namespace rally::collectives::internal
