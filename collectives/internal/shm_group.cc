#include "collectives/internal/shm_group.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <random>

#include "collectives/internal/reduce.h"

namespace rally::collectives::internal {
namespace {

constexpr std::uint64_t kMagic = 0x72616c6c79736d31ull;     // "rallysm1"
constexpr int kSpins = 256;                                 // pause-spins before yielding
constexpr auto kYieldFor = std::chrono::microseconds(300);  // then yields, then sleeps
constexpr auto kSleepSlice = std::chrono::milliseconds(4);  // peers are checked once per slice

void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

std::uint64_t pidNamespace() {
  struct stat st {};
  if (::stat("/proc/self/ns/pid", &st) != 0) return 0;
  return static_cast<std::uint64_t>(st.st_ino);
}

int pidfdOpen(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

void futexWait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
               std::chrono::nanoseconds timeout) {
  struct timespec ts {};
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
  // Shared futex (not FUTEX_PRIVATE_FLAG): the word lives in memory shared between processes.
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr,
            0);
}

void futexWakeAll(std::atomic<std::uint32_t>* word) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr,
            nullptr, 0);
}

size_t roundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Element range [begin, end) of part `i` when `n` elements are split into `parts` nearly equal
// parts.
size_t partBegin(size_t n, int parts, int i) { return n * static_cast<size_t>(i) / parts; }

}  // namespace

struct alignas(128) ShmGroup::RankState {
  std::atomic<std::uint64_t> counters[3];  // arrive, reduced, done: the last step + 1
  std::atomic<std::int32_t> pid;
  std::atomic<std::uint32_t> opened;
  unsigned char exchange[2][kMaxExchangeBytes];  // by step parity
};

struct alignas(128) ShmGroup::Header {
  std::uint64_t magic;
  std::uint64_t pid_namespace;
  std::uint32_t size;
  std::uint64_t slot_bytes;
  alignas(64) std::atomic<std::uint32_t> wake;  // bumped by publishers when someone sleeps
  std::atomic<std::uint32_t> sleepers;
  std::atomic<std::int32_t> aborted_by;  // rank + 1 of the first rank that aborted; 0: none
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "the shared-memory protocol needs address-free atomics");

namespace {
// The header page, then one RankState per rank, rounded up to a page; the buffers follow.
size_t headerBytes(int size) {
  return roundUp(4096 + static_cast<size_t>(size) * sizeof(ShmGroup::RankState), 4096);
}
}  // namespace

Result<std::unique_ptr<ShmGroup>> ShmGroup::create(int size, size_t slot_bytes,
                                                   Milliseconds op_timeout) {
  static_assert(sizeof(Header) <= 4096);
  static_assert(sizeof(RankState) <= 256);
  slot_bytes = roundUp(std::max<size_t>(slot_bytes, 4096), 64);
  const size_t header = headerBytes(size);
  const size_t bytes = header + 2 * static_cast<size_t>(size) * slot_bytes;
  std::random_device rd;
  const std::string name = fmt::format("/rally-{}-{:08x}{:08x}", ::getpid(), rd(), rd());
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return errnoStatus(fmt::format("shm_open({})", name), errno);
  // Reserve the pages now: on a full /dev/shm a later page fault would be a SIGBUS.
  if (const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); err != 0) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    return errnoStatus(fmt::format("reserving {} in /dev/shm for {}", formatBytes(bytes), name),
                       err);
  }
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (base == MAP_FAILED) {
    ::shm_unlink(name.c_str());
    return errnoStatus(fmt::format("mmap of {} ({})", name, formatBytes(bytes)), map_err);
  }
  auto* h = new (base) Header{};
  h->pid_namespace = pidNamespace();
  h->size = static_cast<std::uint32_t>(size);
  h->slot_bytes = slot_bytes;
  for (int r = 0; r < size; ++r) {
    new (static_cast<char*>(base) + 4096 + static_cast<size_t>(r) * sizeof(RankState)) RankState{};
  }
  std::atomic_thread_fence(std::memory_order_release);
  h->magic = kMagic;
  auto group = std::unique_ptr<ShmGroup>(
      new ShmGroup(name, 0, size, base, bytes, op_timeout, /*owner=*/true));
  return group;
}

Result<std::unique_ptr<ShmGroup>> ShmGroup::open(const std::string& name, int rank, int size,
                                                 Milliseconds op_timeout) {
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    return errnoStatus(fmt::format("shm_open({}) (rank 0 is on another host or sees another "
                                   "/dev/shm)",
                                   name),
                       errno);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(headerBytes(size))) {
    ::close(fd);
    return failedPrecondition(
        fmt::format("shared-memory segment {} is smaller than its header", name));
  }
  const size_t bytes = static_cast<size_t>(st.st_size);
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (base == MAP_FAILED) return errnoStatus(fmt::format("mmap of {}", name), map_err);
  const auto* h = static_cast<const Header*>(base);
  std::string problem;
  if (h->magic != kMagic) {
    problem = "it is not a rally segment";
  } else if (h->size != static_cast<std::uint32_t>(size)) {
    problem = fmt::format("it was made for {} ranks, not {}", h->size, size);
  } else if (h->pid_namespace != pidNamespace()) {
    problem =
        "rank 0 is in another PID namespace (another container), so its process cannot be "
        "watched";
  } else if (bytes != headerBytes(size) + 2 * static_cast<size_t>(size) * h->slot_bytes) {
    problem = "its size does not match its header";
  }
  if (!problem.empty()) {
    ::munmap(base, bytes);
    return failedPrecondition(fmt::format("shared-memory segment {}: {}", name, problem));
  }
  return std::unique_ptr<ShmGroup>(
      new ShmGroup(name, rank, size, base, bytes, op_timeout, /*owner=*/false));
}

ShmGroup::ShmGroup(std::string name, int rank, int size, void* base, size_t bytes,
                   Milliseconds op_timeout, bool owner)
    : name_(std::move(name)),
      rank_(rank),
      size_(size),
      base_(base),
      bytes_(bytes),
      header_(static_cast<Header*>(base)),
      op_timeout_(op_timeout),
      owner_(owner) {
  slot_bytes_ = header_->slot_bytes;
  data_ = static_cast<char*>(base) + headerBytes(size);
  state(rank_).pid.store(static_cast<std::int32_t>(::getpid()));
  state(rank_).opened.store(1);
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  spins_ = cpus > 0 && size_ > cpus ? 0 : kSpins;
}

ShmGroup::~ShmGroup() {
  if (owner_ && !unlinked_) ::shm_unlink(name_.c_str());
  for (int fd : peer_pidfds_) {
    if (fd >= 0) ::close(fd);
  }
  ::munmap(base_, bytes_);
}

ShmGroup::RankState& ShmGroup::state(int r) const {
  return *reinterpret_cast<RankState*>(static_cast<char*>(base_) + 4096 +
                                       static_cast<size_t>(r) * sizeof(RankState));
}

char* ShmGroup::slot(std::uint64_t step, int r) const {
  return data_ + ((step & 1) * static_cast<size_t>(size_) + static_cast<size_t>(r)) * slot_bytes_;
}

void ShmGroup::ready() {
  if (owner_ && !unlinked_) {
    ::shm_unlink(name_.c_str());
    unlinked_ = true;
  }
  const int self = ::getpid();
  peer_pids_.assign(size_, 0);
  peer_pidfds_.assign(size_, -1);
  for (int r = 0; r < size_; ++r) {
    peer_pids_[r] = state(r).pid.load();
    if (r != rank_ && peer_pids_[r] != self && peer_pids_[r] > 0) {
      peer_pidfds_[r] = pidfdOpen(peer_pids_[r]);
    }
  }
}

void ShmGroup::abort() {
  if (aborted_.exchange(true)) return;
  std::int32_t none = 0;
  header_->aborted_by.compare_exchange_strong(none, rank_ + 1);
  header_->wake.fetch_add(1);
  futexWakeAll(&header_->wake);
}

void ShmGroup::publish(Counter c, std::uint64_t value) {
  state(rank_).counters[c].store(value);
  if (header_->sleepers.load() > 0) {
    header_->wake.fetch_add(1);
    futexWakeAll(&header_->wake);
  }
}

bool ShmGroup::reached(Counter c, std::uint64_t value, int r) const {
  if (r >= 0) return state(r).counters[c].load() >= value;
  for (int i = 0; i < size_; ++i) {
    if (state(i).counters[c].load() < value) return false;
  }
  return true;
}

Status ShmGroup::checkPeers() {
  if (aborted_) return aborted("this rank aborted the communicator");
  if (const int by = header_->aborted_by.load(); by > 0) {
    return peerLost(fmt::format("rank {} aborted the communicator", by - 1));
  }
  for (int r = 0; r < size_ && r < static_cast<int>(peer_pidfds_.size()); ++r) {
    bool gone = false;
    if (peer_pidfds_[r] >= 0) {
      struct pollfd p {
        peer_pidfds_[r], POLLIN, 0
      };
      gone = ::poll(&p, 1, 0) > 0;
    } else if (r != rank_ && peer_pids_[r] > 0 && peer_pids_[r] != ::getpid()) {
      gone = ::kill(peer_pids_[r], 0) != 0 && errno == ESRCH;
    }
    if (gone) return peerLost(fmt::format("rank {} (pid {}) exited", r, peer_pids_[r]));
  }
  return okStatus();
}

Status ShmGroup::waitFor(Counter c, std::uint64_t value, int r) {
  // Spinning only pays when every rank has a core; with more ranks than cores the rank being
  // waited for is usually not running, so yield to it at once.
  for (int i = 0; i < spins_; ++i) {
    if (reached(c, value, r)) return okStatus();
    cpuRelax();
  }
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + op_timeout_;
  for (;;) {
    if (reached(c, value, r)) return okStatus();
    if (aborted_ || header_->aborted_by.load() != 0) return checkPeers();
    const auto now = std::chrono::steady_clock::now();
    if (now - start < kYieldFor) {
      ::sched_yield();
      continue;
    }
    RALLY_RETURN_IF_ERROR(checkPeers());
    if (now >= deadline) {
      std::string late;
      for (int i = 0; i < size_; ++i) {
        if ((r < 0 || i == r) && state(i).counters[c].load() < value) {
          late += fmt::format("{}{}", late.empty() ? "" : ", ", i);
        }
      }
      return timeoutError(
          fmt::format("rank(s) {} did not answer within {}", late, formatDuration(op_timeout_)));
    }
    header_->sleepers.fetch_add(1);
    const std::uint32_t seen = header_->wake.load();
    if (!reached(c, value, r) && !aborted_) {
      futexWait(&header_->wake, seen,
                std::min<std::chrono::nanoseconds>(kSleepSlice, deadline - now));
    }
    header_->sleepers.fetch_sub(1);
  }
}

Result<std::uint64_t> ShmGroup::beginStep() {
  if (aborted_ || header_->aborted_by.load() != 0) {
    RALLY_RETURN_IF_ERROR(checkPeers());
  }
  const std::uint64_t k = step_++;
  if (k >= 2) {
    RALLY_RETURN_IF_ERROR(waitFor(kDone, k - 1, -1));
  }
  return k;
}

// Reduces block [b0, b1) of the step's elements over every rank, in rank order (so the result does
// not depend on which rank reduces it): `source(r)` is where rank r's elements of the step lie.
// The result goes to `out` and, when `also` is set, to `also` too; in pieces that stay in the
// first-level cache between the two writes.
template <typename Source>
void ShmGroup::reduceBlock(DataType type, ReduceOp op, size_t b0, size_t b1, Source source,
                           char* out, char* also) const {
  const size_t es = dataTypeSize(type);
  const size_t piece = std::max<size_t>(kReducePieceBytes / es, 1);
  for (size_t p0 = b0; p0 < b1; p0 += piece) {
    const size_t n = std::min(piece, b1 - p0);
    char* dst = out + (p0 - b0) * es;
    const auto at = [&](int r) { return source(r) + p0 * es; };
    if (size_ == 1) {
      std::memmove(dst, at(0), n * es);
    } else {
      reduce(type, op, dst, at(0), at(1), n);
      for (int r = 2; r < size_; ++r) reduce(type, op, dst, dst, at(r), n);
    }
    if (op == ReduceOp::kAvg) finishAverage(type, dst, n, size_);
    if (also != nullptr) std::memcpy(also + (p0 - b0) * es, dst, n * es);
  }
}

Status ShmGroup::allreduce(void* data, size_t count, DataType type, ReduceOp op) {
  if (size_ == 1) return okStatus();  // the sum, min, max, product or average of one is itself
  const size_t es = dataTypeSize(type);
  const size_t per_step = slot_bytes_ / es;
  auto* bytes = static_cast<char*>(data);
  // Step layout: rank r's slot holds, at block j != r, its input for block j (which rank j
  // reduces) and, at block r, the reduced block r (which every other rank copies out). A rank thus
  // copies in and out only the blocks it does not reduce, and reduces straight from its own buffer.
  for (size_t off = 0; off < count; off += per_step) {
    const size_t n = std::min(per_step, count - off);
    char* user = bytes + off * es;
    const auto block = [&](int r) { return partBegin(n, size_, r); };
    RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
    char* own = slot(k, rank_);
    for (int j = 0; j < size_; ++j) {
      if (j != rank_) {
        std::memcpy(own + block(j) * es, user + block(j) * es, (block(j + 1) - block(j)) * es);
      }
    }
    publish(kArrive, k + 1);
    RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, -1));
    const size_t b0 = block(rank_), b1 = block(rank_ + 1);
    reduceBlock(
        type, op, b0, b1, [&](int r) { return r == rank_ ? user : slot(k, r); }, own + b0 * es,
        user + b0 * es);
    publish(kReduced, k + 1);
    RALLY_RETURN_IF_ERROR(waitFor(kReduced, k + 1, -1));
    for (int r = 0; r < size_; ++r) {
      if (r != rank_) {
        std::memcpy(user + block(r) * es, slot(k, r) + block(r) * es,
                    (block(r + 1) - block(r)) * es);
      }
    }
    publish(kDone, k + 1);
  }
  return okStatus();
}

Status ShmGroup::reduceScatter(const void* in, void* out, size_t count, DataType type,
                               ReduceOp op) {
  const size_t es = dataTypeSize(type);
  const size_t per_step = slot_bytes_ / es / static_cast<size_t>(size_);  // per block
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  for (size_t off = 0; off < count; off += per_step) {
    const size_t n = std::min(per_step, count - off);
    RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
    // Piece b of this step (elements off..off+n of block b) at b * n in the slot; this rank's own
    // piece is reduced straight from its input, so it is not copied.
    for (int b = 0; b < size_; ++b) {
      if (b != rank_) {
        std::memcpy(slot(k, rank_) + b * n * es, src + (b * count + off) * es, n * es);
      }
    }
    publish(kArrive, k + 1);
    RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, -1));
    const size_t piece = static_cast<size_t>(rank_) * n;
    const char* mine = src + (static_cast<size_t>(rank_) * count + off) * es;
    reduceBlock(
        type, op, 0, n, [&](int r) { return r == rank_ ? mine : slot(k, r) + piece * es; },
        dst + off * es, nullptr);
    publish(kDone, k + 1);
  }
  return okStatus();
}

Status ShmGroup::allgather(const void* in, void* out, size_t bytes) {
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  for (size_t off = 0; off < bytes; off += slot_bytes_) {
    const size_t n = std::min(slot_bytes_, bytes - off);
    RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
    std::memcpy(slot(k, rank_), src + off, n);
    publish(kArrive, k + 1);
    RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, -1));
    for (int r = 0; r < size_; ++r) {
      std::memcpy(dst + r * bytes + off, r == rank_ ? src + off : slot(k, r), n);
    }
    publish(kDone, k + 1);
  }
  return okStatus();
}

Status ShmGroup::broadcast(void* data, size_t bytes, int root) {
  // The root fills all slots of a buffer at once: one buffer is size x slot_bytes contiguous.
  const size_t per_step = slot_bytes_ * static_cast<size_t>(size_);
  auto* p = static_cast<char*>(data);
  for (size_t off = 0; off < bytes; off += per_step) {
    const size_t n = std::min(per_step, bytes - off);
    RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
    if (rank_ == root) std::memcpy(slot(k, 0), p + off, n);
    publish(kArrive, k + 1);
    if (rank_ != root) {
      RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, root));
      std::memcpy(p + off, slot(k, 0), n);
    }
    publish(kDone, k + 1);
  }
  return okStatus();
}

Status ShmGroup::alltoall(const void* in, void* out, size_t bytes_per_rank) {
  const size_t per_step = slot_bytes_ / static_cast<size_t>(size_);
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  for (size_t off = 0; off < bytes_per_rank; off += per_step) {
    const size_t n = std::min(per_step, bytes_per_rank - off);
    RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
    for (int j = 0; j < size_; ++j) {
      std::memcpy(slot(k, rank_) + j * n, src + j * bytes_per_rank + off, n);
    }
    publish(kArrive, k + 1);
    RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, -1));
    for (int j = 0; j < size_; ++j) {
      std::memcpy(dst + j * bytes_per_rank + off, slot(k, j) + rank_ * n, n);
    }
    publish(kDone, k + 1);
  }
  return okStatus();
}

Status ShmGroup::barrier() {
  RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
  publish(kArrive, k + 1);
  RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, -1));
  publish(kDone, k + 1);
  return okStatus();
}

Status ShmGroup::exchange(const void* mine, size_t bytes, void* all) {
  if (bytes > kMaxExchangeBytes) {
    return internalError(
        fmt::format("shared-memory exchange of {} bytes (at most {})", bytes, kMaxExchangeBytes));
  }
  RALLY_ASSIGN_OR_RETURN(const std::uint64_t k, beginStep());
  std::memcpy(state(rank_).exchange[k & 1], mine, bytes);
  publish(kArrive, k + 1);
  RALLY_RETURN_IF_ERROR(waitFor(kArrive, k + 1, -1));
  for (int r = 0; r < size_; ++r) {
    std::memcpy(static_cast<char*>(all) + r * bytes, state(r).exchange[k & 1], bytes);
  }
  publish(kDone, k + 1);
  return okStatus();
}

}  // namespace rally::collectives::internal
