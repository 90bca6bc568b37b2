#include "collectives/gloo/tcp_collectives.h"

#include <fmt/format.h>
#include <gloo/common/error.h>

#include <algorithm>
#include <cstring>

#include "collectives/internal/reduce.h"

namespace rally::collectives::internal {
namespace {

// Apart from the slots of send/recv (0x5241 << 48) and of Gloo's own algorithms (small numbers).
constexpr std::uint64_t kSlotBase = 0x5253ull << 48;
constexpr std::uint64_t kSentinelSlot = 0x5254ull << 48;  // never sent on

// Unregisters a buffer when an operation ends, however it ends.
template <typename F>
struct Finally {
  F f;
  ~Finally() { f(); }
};
template <typename F>
Finally(F) -> Finally<F>;

}  // namespace

TcpCollectives::TcpCollectives(std::shared_ptr<gloo::Context> context, Milliseconds timeout)
    : context_(std::move(context)),
      timeout_(timeout),
      rank_(context_->rank),
      size_(context_->size) {
  if (size_ == 1) return;
  sentinel_ = context_->createUnboundBuffer(&sentinel_byte_, 1);
  for (int j = 0; j < size_; ++j) {
    if (j != rank_) sentinel_->recv(j, kSentinelSlot, 0, 1);
  }
  watcher_ = std::thread([this] { watch(); });
}

TcpCollectives::Buffer TcpCollectives::buffer(void* data, size_t bytes) {
  Buffer b = context_->createUnboundBuffer(data, bytes);
  std::lock_guard lock(mu_);
  if (!lost_.empty()) throw gloo::IoException(lost_);
  if (aborted_) throw gloo::IoException("aborted");
  active_.push_back(b.get());
  return b;
}

void TcpCollectives::release(const Buffer& b) {
  std::lock_guard lock(mu_);
  active_.erase(std::remove(active_.begin(), active_.end(), b.get()), active_.end());
}

void TcpCollectives::abort() {
  std::lock_guard lock(mu_);
  aborted_ = true;
  for (auto* b : active_) {
    b->abortWaitRecv();
    b->abortWaitSend();
  }
}

// Gloo's waits return false when abortWait*() interrupted them, and throw on a broken pair or at
// the timeout.
void TcpCollectives::waitRecv(const Buffer& b) {
  if (!b->waitRecv(timeout_)) interrupted();
}
void TcpCollectives::waitSend(const Buffer& b) {
  if (!b->waitSend(timeout_)) interrupted();
}

void TcpCollectives::interrupted() {
  std::lock_guard lock(mu_);
  throw gloo::IoException(lost_.empty() ? "aborted" : lost_);
}

// Gloo (2022) does not tell a buffer whose transfer was under way when its connection broke; it
// does tell every posted, unmatched recv. So each rank posts one recv from every peer that no peer
// ever sends, and a thread waits on it: when any connection breaks, it interrupts the operation.
void TcpCollectives::watch() {
  try {
    if (!sentinel_->waitRecv(std::chrono::hours(24 * 365))) return;  // shutting down
  } catch (const std::exception& e) {
    std::lock_guard lock(mu_);
    lost_ = e.what();
    for (auto* b : active_) {
      b->abortWaitRecv();
      b->abortWaitSend();
    }
  }
}

TcpCollectives::~TcpCollectives() {
  if (watcher_.joinable()) {
    sentinel_->abortWaitRecv();
    watcher_.join();
  }
}

std::uint64_t TcpCollectives::slots(int count) {
  const std::uint64_t first = kSlotBase + next_slot_;
  next_slot_ += static_cast<std::uint64_t>(count);
  return first;
}

void TcpCollectives::ringReduceScatterInPlace(char* data, size_t count, DataType type, ReduceOp op,
                                              const std::vector<size_t>& begin) {
  const size_t es = dataTypeSize(type);
  const int n = size_, r = rank_;
  const std::uint64_t slot = slots(n);
  if (n == 1) return;
  size_t largest = 0;
  for (int j = 0; j < n; ++j) largest = std::max(largest, begin[j + 1] - begin[j]);
  std::vector<char> received(largest * es);
  auto whole = buffer(data, count * es);
  auto incoming = buffer(received.data(), received.size());
  Finally done{[&] {
    release(whole);
    release(incoming);
  }};
  auto seg = [&](int j) { return (j % n + n) % n; };
  // Step s: send segment r - s - 1 (this rank's partial sum) to the right; add the left
  // neighbour's partial of segment r - s - 2 to this rank's. After n - 1 steps segment r is done.
  for (int s = 0; s < n - 1; ++s) {
    const int out = seg(r - s - 1), in = seg(r - s - 2);
    const size_t out_n = begin[out + 1] - begin[out], in_n = begin[in + 1] - begin[in];
    if (out_n > 0) whole->send((r + 1) % n, slot + s, begin[out] * es, out_n * es);
    if (in_n > 0) incoming->recv((r + n - 1) % n, slot + s, 0, in_n * es);
    if (in_n > 0) waitRecv(incoming);
    if (out_n > 0) waitSend(whole);
    char* mine = data + begin[in] * es;
    reduce(type, op, mine, mine, received.data(), in_n);
  }
}

void TcpCollectives::ringAllgatherInPlace(char* data, const std::vector<size_t>& begin) {
  const int n = size_, r = rank_;
  const std::uint64_t slot = slots(n);
  if (n == 1) return;
  auto whole = buffer(data, begin[n]);
  Finally done{[&] { release(whole); }};
  auto seg = [&](int j) { return (j % n + n) % n; };
  // Step s: pass on segment r - s (this rank's own at step 0), receive segment r - s - 1.
  for (int s = 0; s < n - 1; ++s) {
    const int out = seg(r - s), in = seg(r - s - 1);
    const size_t out_n = begin[out + 1] - begin[out], in_n = begin[in + 1] - begin[in];
    if (out_n > 0) whole->send((r + 1) % n, slot + s, begin[out], out_n);
    if (in_n > 0) whole->recv((r + n - 1) % n, slot + s, begin[in], in_n);
    if (in_n > 0) waitRecv(whole);
    if (out_n > 0) waitSend(whole);
  }
}

void TcpCollectives::allreduce(void* data, size_t count, DataType type, ReduceOp op) {
  if (count == 0) return;  // every rank has nothing (the call check saw to that)
  const size_t es = dataTypeSize(type);
  std::vector<size_t> begin(size_ + 1), bytes(size_ + 1);
  for (int j = 0; j <= size_; ++j) {
    begin[j] = count * static_cast<size_t>(j) / static_cast<size_t>(size_);
    bytes[j] = begin[j] * es;
  }
  auto* p = static_cast<char*>(data);
  ringReduceScatterInPlace(p, count, type, op, begin);
  if (op == ReduceOp::kAvg) {
    finishAverage(type, p + bytes[rank_], begin[rank_ + 1] - begin[rank_], size_);
  }
  ringAllgatherInPlace(p, bytes);
}

void TcpCollectives::reduceScatter(const void* in, void* out, size_t count, DataType type,
                                   ReduceOp op) {
  if (count == 0) return;
  const size_t es = dataTypeSize(type);
  std::vector<char> all(static_cast<const char*>(in),
                        static_cast<const char*>(in) + count * es * size_);
  std::vector<size_t> begin(size_ + 1);
  for (int j = 0; j <= size_; ++j) begin[j] = count * static_cast<size_t>(j);
  ringReduceScatterInPlace(all.data(), count * size_, type, op, begin);
  std::memcpy(out, all.data() + begin[rank_] * es, count * es);
  if (op == ReduceOp::kAvg) finishAverage(type, out, count, size_);
}

void TcpCollectives::allgather(const void* in, void* out, size_t bytes) {
  if (bytes == 0) return;
  auto* p = static_cast<char*>(out);
  std::memcpy(p + bytes * rank_, in, bytes);
  std::vector<size_t> begin(size_ + 1);
  for (int j = 0; j <= size_; ++j) begin[j] = bytes * static_cast<size_t>(j);
  ringAllgatherInPlace(p, begin);
}

void TcpCollectives::broadcast(void* data, size_t bytes, int root) {
  if (bytes == 0) return;
  const std::uint64_t slot = slots(1);
  if (size_ == 1) return;
  auto buf = buffer(data, bytes);
  Finally done{[&] { release(buf); }};
  if (rank_ == root) {
    for (int j = 0; j < size_; ++j) {
      if (j != root) buf->send(j, slot);
    }
    for (int j = 0; j < size_; ++j) {
      if (j != root) waitSend(buf);
    }
  } else {
    buf->recv(root, slot);
    waitRecv(buf);
  }
}

void TcpCollectives::alltoall(const void* in, void* out, size_t bytes_per_rank) {
  if (bytes_per_rank == 0) return;
  const std::uint64_t slot = slots(1);
  std::memcpy(static_cast<char*>(out) + bytes_per_rank * rank_,
              static_cast<const char*>(in) + bytes_per_rank * rank_, bytes_per_rank);
  if (size_ == 1) return;
  auto src = buffer(const_cast<void*>(in), bytes_per_rank * size_);
  auto dst = buffer(out, bytes_per_rank * size_);
  Finally done{[&] {
    release(src);
    release(dst);
  }};
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    src->send(j, slot, bytes_per_rank * j, bytes_per_rank);
    dst->recv(j, slot, bytes_per_rank * j, bytes_per_rank);
  }
  for (int j = 0; j < size_ - 1; ++j) {
    waitRecv(dst);
    waitSend(src);
  }
}

void TcpCollectives::barrier() {
  std::vector<char> in(size_), out(size_);
  alltoall(in.data(), out.data(), 1);
}

}  // namespace rally::collectives::internal
