#include "runtime/checkpoint/checkpointer.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "kernels/base/logging.h"
#include "runtime/checkpoint/checksum.h"
#include "runtime/checkpoint/internal/file_io.h"

namespace rally::checkpoint {

namespace fs = std::filesystem;
using collectives::ReduceOp;
using internal::File;
using nlohmann::json;

namespace {

constexpr std::uint64_t kAlign = 4096;

std::uint64_t alignUp(std::uint64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

std::string isoNow() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                     tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

double msSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

std::string shardFileName(int rank) { return fmt::format("shard-{:05}.bin", rank); }
std::string shardIndexName(int rank) { return fmt::format("shard-{:05}.json", rank); }
std::string shardFailedName(int rank) { return fmt::format("shard-{:05}.failed", rank); }

std::string partialName(std::uint64_t step, std::uint64_t token, std::uint64_t seq) {
  return fmt::format(".partial-step-{:012}-{:016x}-{}", step, token, seq);
}

// ".partial-step-<step>-<token>-<seq>" -> token and seq; false for other names.
bool parsePartialName(const std::string& name, std::uint64_t* token, std::uint64_t* seq) {
  unsigned long long step = 0, tok = 0, sq = 0;
  if (std::sscanf(name.c_str(), ".partial-step-%llu-%16llx-%llu", &step, &tok, &sq) != 3) {
    return false;
  }
  *token = tok;
  *seq = sq;
  return true;
}

Status runWork(const std::shared_ptr<collectives::Work>& w, Milliseconds timeout,
               std::string_view what) {
  RALLY_RETURN_IF_ERROR(w->wait(timeout)) << "checkpoint: " << what;
  return okStatus();
}

// One rank's buffers as exchanged at attach: "name\tdtype\tglobal\toffset\tlocal\n" per buffer.
struct RemoteEntry {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> global_shape;
  Box box;
};

std::string joinDims(const std::vector<std::int64_t>& v) {
  return fmt::format("{}", fmt::join(v, ","));
}

std::vector<std::int64_t> splitDims(const std::string& s) {
  std::vector<std::int64_t> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    out.push_back(std::stoll(s.substr(pos, end - pos)));
    pos = end + 1;
  }
  return out;
}

std::string describeEntries(const ElasticState& state) {
  std::string out;
  for (const ElasticState::Entry& e : state.registered()) {
    if (e.kind != ElasticState::Kind::kBuffer) continue;
    out += fmt::format("{}\t{}\t{}\t{}\t{}\n", e.name, collectives::dataTypeName(e.type),
                       joinDims(e.global_shape), joinDims(e.global_offset), joinDims(e.shape));
  }
  return out;
}

std::vector<RemoteEntry> parseEntries(const std::string& text) {
  std::vector<RemoteEntry> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::vector<std::string> f;
    size_t p = pos;
    for (int i = 0; i < 5; ++i) {
      size_t q = text.find(i < 4 ? '\t' : '\n', p);
      if (q == std::string::npos || q > end) q = end;
      f.push_back(text.substr(p, q - p));
      p = q + 1;
    }
    out.push_back({f[0], f[1], splitDims(f[2]), {splitDims(f[3]), splitDims(f[4])}});
    pos = end + 1;
  }
  return out;
}

}  // namespace

struct Checkpointer::Item {
  size_t entry = 0;                 // index into state_->registered()
  std::uint64_t source_offset = 0;  // in the registered buffer
  std::uint64_t file_offset = 0;    // in this rank's shard file and in staging_
  std::uint64_t bytes = 0;
  Box box;  // within the global tensor
  std::string tensor;
  DataType type = DataType::kU8;
  std::vector<std::int64_t> global_shape;
};

struct Checkpointer::Job {
  std::uint64_t step = 0, commit = 0, token = 0, seq = 0;
  std::string created;
  std::map<std::string, ScalarRecord> scalars;
  double stall_ms = 0;
};

std::string stepDirectoryName(std::uint64_t step) { return fmt::format("step-{:012}", step); }

std::vector<CheckpointEntry> listCheckpoints(const std::string& dir) {
  std::vector<CheckpointEntry> out;
  std::error_code ec;
  for (const auto& de : fs::directory_iterator(dir, ec)) {
    const std::string name = de.path().filename().string();
    unsigned long long step = 0;
    char rest = 0;
    if (std::sscanf(name.c_str(), "step-%llu%c", &step, &rest) != 1) continue;
    if (name != stepDirectoryName(step)) continue;  // only names this format writes
    if (!de.is_directory()) continue;
    CheckpointEntry e;
    e.step = step;
    e.path = de.path().string();
    std::error_code exists_ec;
    e.complete = fs::exists(de.path() / kManifestName, exists_ec);
    out.push_back(e);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.step > b.step; });
  return out;
}

Checkpointer::Checkpointer(std::string dir, CheckpointOptions options)
    : dir_(std::move(dir)), options_(std::move(options)) {
  if (options_.block_bytes == 0) options_.block_bytes = 64 << 10;
  // Direct I/O needs every write's offset and length to be a multiple of the page size.
  options_.write_chunk_bytes = std::max<std::uint64_t>(alignUp(options_.write_chunk_bytes), kAlign);
  writer_ = std::thread([this] { writerLoop(); });
}

Checkpointer::~Checkpointer() {
  if (busy()) (void)wait(options_.finalize_timeout);
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    cancel_ = true;
  }
  cv_.notify_all();
  writer_.join();
  freeStaging();
}

void Checkpointer::freeStaging() {
  if (staging_ != nullptr) {
    if (staging_copier_ != nullptr) {
      staging_copier_->freeHost(staging_);
    } else {
      std::free(staging_);
    }
  }
  staging_ = nullptr;
  staging_bytes_ = 0;
  staging_copier_ = nullptr;
}

bool Checkpointer::busy() const {
  std::lock_guard lock(mu_);
  return job_ != nullptr;
}

SaveReport Checkpointer::lastSave() const {
  std::lock_guard lock(mu_);
  return last_;
}

Status Checkpointer::wait(Milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return job_ == nullptr; })) {
    return timeoutError(fmt::format("checkpoint step {} is still being written after {} ms",
                                    last_.step, timeout.count()));
  }
  return last_.status;
}

Status Checkpointer::attach(collectives::Communicator& comm, ElasticState& state) {
  // A save of the previous attachment is abandoned (its ranks may be gone): the writer stops
  // between two writes, rank 0 stops waiting for the others, and nothing the writer uses changes
  // until it is idle (retention included).
  {
    std::unique_lock lock(mu_);
    cancel_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return job_ == nullptr && !housekeeping_; });
    cancel_ = false;
  }
  comm_ = nullptr;
  state_ = nullptr;
  rank_ = comm.rank();
  size_ = comm.size();
  const Milliseconds timeout = options_.timeout;

  // 1. Every rank's boxes, and rank 0's token, to every rank.
  std::uint64_t token = 0;
  if (rank_ == 0) {
    std::random_device rd;
    token = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
            static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  const std::string mine = describeEntries(state);
  std::int64_t longest = static_cast<std::int64_t>(mine.size());
  RALLY_RETURN_IF_ERROR(runWork(comm.allreduce(&longest, 1, DataType::kI64, ReduceOp::kMax),
                                timeout, "exchanging layouts (length)"));
  const size_t slot = static_cast<size_t>(longest) + 16;
  std::vector<char> in(slot, '\0'), all(slot * static_cast<size_t>(size_), '\0');
  const std::uint64_t length = mine.size();
  std::memcpy(in.data(), &length, 8);
  std::memcpy(in.data() + 8, &token, 8);
  std::memcpy(in.data() + 16, mine.data(), mine.size());
  RALLY_RETURN_IF_ERROR(runWork(comm.allgather(in.data(), all.data(), slot, DataType::kU8), timeout,
                                "exchanging layouts"));
  std::vector<std::vector<RemoteEntry>> layouts(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    const char* p = all.data() + slot * static_cast<size_t>(r);
    std::uint64_t n = 0;
    std::memcpy(&n, p, 8);
    if (r == 0) std::memcpy(&token, p + 8, 8);
    layouts[static_cast<size_t>(r)] = parseEntries(std::string(p + 16, n));
  }

  // 2. The same tensor must have one dtype and global shape everywhere, and its distinct boxes
  //    must tile it exactly. Every rank checks the same data, so all fail or none.
  struct Tensor {
    std::string dtype;
    std::vector<std::int64_t> global_shape;
    int first_rank = 0;
    std::vector<std::pair<Box, std::vector<int>>> boxes;  // distinct boxes and their holders
  };
  std::map<std::string, Tensor> tensors;
  std::vector<std::string> order;
  for (int r = 0; r < size_; ++r) {
    for (const RemoteEntry& e : layouts[static_cast<size_t>(r)]) {
      auto [it, inserted] = tensors.try_emplace(e.name);
      Tensor& t = it->second;
      if (inserted) {
        t.dtype = e.dtype;
        t.global_shape = e.global_shape;
        t.first_rank = r;
        order.push_back(e.name);
      } else if (t.dtype != e.dtype || t.global_shape != e.global_shape) {
        return invalidArgument(fmt::format(
            "checkpoint: '{}' is {} [{}] on rank {} but {} [{}] on rank {}; a tensor must have "
            "one dtype and one global shape on every rank",
            e.name, t.dtype, fmt::join(t.global_shape, ", "), t.first_rank, e.dtype,
            fmt::join(e.global_shape, ", "), r));
      }
      auto b = std::find_if(t.boxes.begin(), t.boxes.end(),
                            [&](const auto& x) { return x.first == e.box; });
      if (b == t.boxes.end()) {
        t.boxes.push_back({e.box, {r}});
      } else {
        b->second.push_back(r);
      }
    }
  }
  for (const auto& [name, t] : tensors) {
    std::int64_t covered = 0, total = 1;
    for (std::int64_t d : t.global_shape) total *= d;
    for (size_t i = 0; i < t.boxes.size(); ++i) {
      covered += t.boxes[i].first.elements();
      for (size_t j = i + 1; j < t.boxes.size(); ++j) {
        if (!intersect(t.boxes[i].first, t.boxes[j].first).empty()) {
          return invalidArgument(fmt::format(
              "checkpoint: '{}': rank {}'s box {} overlaps rank {}'s box {}; the ranks' shards "
              "must be equal (replicas) or disjoint",
              name, t.boxes[i].second.front(), describe(t.boxes[i].first),
              t.boxes[j].second.front(), describe(t.boxes[j].first)));
        }
      }
    }
    if (covered != total) {
      return invalidArgument(fmt::format(
          "checkpoint: '{}' [{}]: the ranks' shards cover {} of its {} elements; every element "
          "must be held by some rank",
          name, fmt::join(t.global_shape, ", "), covered, total));
    }
  }

  // 3. This rank's part: of each box it holds with k-1 other ranks, the i-th of k slices along
  //    the first dimension (a 0-d tensor: the first holder writes it).
  std::vector<Item> items;
  std::uint64_t offset = 0;
  const auto& entries = state.registered();
  for (size_t i = 0; i < entries.size(); ++i) {
    const ElasticState::Entry& e = entries[i];
    if (e.kind != ElasticState::Kind::kBuffer) continue;
    const Tensor& t = tensors.at(e.name);
    const Box box{e.global_offset, e.shape};
    const auto& holders = std::find_if(t.boxes.begin(), t.boxes.end(), [&](const auto& x) {
                            return x.first == box;
                          })->second;
    const auto k = static_cast<std::int64_t>(holders.size());
    const auto idx = static_cast<std::int64_t>(std::find(holders.begin(), holders.end(), rank_) -
                                               holders.begin());
    Item item;
    item.entry = i;
    item.tensor = e.name;
    item.type = e.type;
    item.global_shape = e.global_shape;
    item.box = box;
    if (e.shape.empty()) {
      if (idx != 0) continue;
      item.bytes = e.bytes;
    } else {
      const std::int64_t rows = e.shape[0];
      const std::int64_t lo = rows * idx / k, hi = rows * (idx + 1) / k;
      if (hi == lo && rows > 0) continue;
      if (rows == 0 && idx != 0) continue;  // an empty tensor: recorded once
      const std::uint64_t row_bytes = rows > 0 ? e.bytes / static_cast<std::uint64_t>(rows) : 0;
      item.box.start[0] += lo;
      item.box.shape[0] = hi - lo;
      item.source_offset = static_cast<std::uint64_t>(lo) * row_bytes;
      item.bytes = static_cast<std::uint64_t>(hi - lo) * row_bytes;
    }
    item.file_offset = offset;
    offset = alignUp(offset + item.bytes);
    items.push_back(std::move(item));
  }

  // 4. Host memory for the file image, touched now so that save() only copies. With device
  //    buffers, page-locked memory from the state's copier (copies from the device run at full
  //    speed into it); page-aligned either way (direct I/O).
  DeviceCopier* copier = nullptr;
  for (const ElasticState::Entry& e : state.registered()) {
    if (e.kind == ElasticState::Kind::kBuffer && e.device.kind != DeviceKind::kHost) {
      copier = state.deviceCopier();
    }
  }
  if (offset != staging_bytes_ || copier != staging_copier_) {
    freeStaging();
    if (offset > 0) {
      void* p = nullptr;
      if (copier != nullptr) {
        auto pinned = copier->allocateHost(offset);
        if (pinned.ok() && reinterpret_cast<std::uintptr_t>(*pinned) % kAlign == 0) {
          p = *pinned;
          staging_copier_ = copier;
        } else if (pinned.ok()) {
          copier->freeHost(*pinned);  // not page-aligned: ordinary memory instead
        }
      }
      if (p == nullptr && ::posix_memalign(&p, kAlign, offset) != 0) p = nullptr;
      if (p == nullptr) {
        std::int64_t ok = 0;  // tell the others before failing
        (void)runWork(comm.allreduce(&ok, 1, DataType::kI64, ReduceOp::kMin), timeout, "attach");
        return resourceExhausted(fmt::format(
            "checkpoint: cannot allocate {} of host memory for this rank's part of the state",
            formatBytes(static_cast<std::int64_t>(offset))));
      }
      staging_ = static_cast<unsigned char*>(p);
      staging_bytes_ = offset;
    }
  }
  // Touched now so that save() only copies; the gaps between boxes stay zero.
  if (staging_bytes_ > 0) std::memset(staging_, 0, staging_bytes_);
  // 5. Every rank got this far (one that could not allocate must not leave the others waiting in
  //    the caller's next collective).
  std::int64_t ok = 1;
  RALLY_RETURN_IF_ERROR(
      runWork(comm.allreduce(&ok, 1, DataType::kI64, ReduceOp::kMin), timeout, "finishing attach"));
  if (ok == 0) {
    return resourceExhausted(
        "checkpoint: another rank could not allocate host memory for its part (see its log)");
  }
  items_ = std::move(items);
  tensors_.clear();
  for (const std::string& name : order) {
    const Tensor& t = tensors.at(name);
    TensorRecord rec;
    rec.name = name;
    rec.type = *parseDataType(t.dtype);
    rec.shape = t.global_shape;
    tensors_.push_back(std::move(rec));
  }
  token_ = token;
  seq_ = 0;
  comm_ = &comm;
  state_ = &state;
  attached_layout_ = state.layout();
  log::get("checkpoint")
      ->debug("attached to {} as rank {} of {}: {} boxes, {} to write per save", dir_, rank_, size_,
              items_.size(), formatBytes(static_cast<std::int64_t>(staging_bytes_)));
  return okStatus();
}

Status Checkpointer::checkAttached() const {
  if (comm_ == nullptr || state_ == nullptr) {
    return failedPrecondition("checkpoint: attach(comm, state) first (collective)");
  }
  if (state_->layout() != attached_layout_) {
    return failedPrecondition(
        "checkpoint: the state's registrations changed since attach(); call attach() again on "
        "every rank");
  }
  return okStatus();
}

Status Checkpointer::agree(bool ok, const char* what, bool* all_ok) {
  std::int64_t v = ok ? 1 : 0;
  if (size_ > 1) {
    RALLY_RETURN_IF_ERROR(
        runWork(comm_->allreduce(&v, 1, DataType::kI64, ReduceOp::kMin), options_.timeout, what));
  }
  *all_ok = v == 1;
  return okStatus();
}

Result<bool> Checkpointer::save(std::uint64_t step) {
  RALLY_RETURN_IF_ERROR(checkAttached());
  if (options_.while_busy == WhileBusy::kSkip) {
    bool all_idle = false;
    RALLY_RETURN_IF_ERROR(agree(!busy(), "agreeing whether to skip a save", &all_idle));
    if (!all_idle) {
      std::uint64_t writing;
      {
        std::lock_guard lock(mu_);
        writing = last_.step;
      }
      log::get("checkpoint")
          ->info("checkpoint step {} skipped: step {} is still being written (while_busy=skip)",
                 step, writing);
      return false;
    }
  } else {
    // Every rank waits for its own writer, however long: deciding to skip on a timeout would be a
    // per-rank decision, and the ranks' saves would no longer match. (The writer is bounded by
    // the disk, and rank 0's wait for the others by finalize_timeout.)
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return job_ == nullptr; });
  }

  const auto start = std::chrono::steady_clock::now();
  const auto& entries = state_->registered();
  bool device = false;
  for (const Item& item : items_) {
    if (item.bytes == 0) continue;
    const ElasticState::Entry& e = entries[item.entry];
    const auto* from = static_cast<const unsigned char*>(e.data) + item.source_offset;
    if (e.device.kind == DeviceKind::kHost) {
      std::memcpy(staging_ + item.file_offset, from, item.bytes);
    } else {  // queued on the copier's stream, all at once
      RALLY_RETURN_IF_ERROR(
          state_->deviceCopier()->toHost(staging_ + item.file_offset, from, item.bytes, e.device))
          << "checkpoint: copying '" << e.name << "' from its device";
      device = true;
    }
  }
  if (device) {
    RALLY_RETURN_IF_ERROR(state_->deviceCopier()->synchronize()) << "checkpoint: device copies";
  }
  auto job = std::make_unique<Job>();
  job->stall_ms = msSince(start);
  job->step = step;
  job->commit = std::max<std::uint64_t>(1, state_->commitNumber());
  job->token = token_;
  job->seq = ++seq_;
  job->created = isoNow();
  for (const ElasticState::Entry& e : entries) {
    if (e.kind == ElasticState::Kind::kBuffer) continue;
    ScalarRecord s;
    s.is_double = e.kind == ElasticState::Kind::kDouble;
    std::memcpy(&s.bits, e.data, 8);
    job->scalars[e.name] = s;
  }
  {
    std::lock_guard lock(mu_);
    last_ = SaveReport{};
    last_.step = step;
    last_.started = true;
    last_.stall_ms = job->stall_ms;
    last_.bytes = staging_bytes_;
    job_ = std::move(job);
  }
  cv_.notify_all();
  return true;
}

void Checkpointer::writerLoop() {
  // Below the training threads: on a busy machine, checksums and copies into the page cache wait
  // for them rather than the other way round (Linux: nice applies per thread).
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19);
  for (;;) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return stop_ || (job_ != nullptr && !last_.finished); });
    if (job_ == nullptr) return;  // stopping with nothing to write
    Job& job = *job_;
    lock.unlock();
    const auto start = std::chrono::steady_clock::now();
    Status st;
    try {
      st = writeJob(job);
      if (rank_ == 0) st = finalize(job, st);
    } catch (const std::exception& e) {  // a filesystem call that throws: reported, not fatal
      st = internalError(fmt::format("checkpoint writer: {}", e.what()));
    }
    if (!st.ok()) {
      log::get("checkpoint")
          ->error(
              "checkpoint step {} was not saved: {}; earlier checkpoints are unchanged and "
              "training goes on",
              job.step, st.toString());
    }
    lock.lock();
    last_.finished = true;
    last_.status = st;
    last_.write_ms = msSince(start);
    job_.reset();
    // Housekeeping after the checkpoint is committed and wait() has returned: removing old
    // checkpoints takes a while on some filesystems, and only attach() waits for it (a next save
    // is picked up right after).
    housekeeping_ = rank_ == 0 && st.ok();
    lock.unlock();
    cv_.notify_all();
    if (housekeeping_) {
      try {
        applyRetention();
      } catch (const std::exception& e) {
        log::get("checkpoint")->warn("retention: {}", e.what());
      }
      lock.lock();
      housekeeping_ = false;
      lock.unlock();
      cv_.notify_all();
    }
  }
}

Status Checkpointer::writeJob(Job& job) {
  const std::string partial = dir_ + "/" + partialName(job.step, job.token, job.seq);
  std::error_code ec;
  fs::create_directories(partial, ec);
  if (ec) return internal::fileError("mkdir", partial, ec.value());
  const std::string file_path = partial + "/" + shardFileName(rank_);
  auto fail = [&](Status st) {
    // Tell rank 0 at once instead of letting it wait out finalize_timeout (an empty file needs
    // no data blocks, so it can usually be created on a full disk too).
    if (auto f = internal::openFile(partial + "/" + shardFailedName(rank_), O_WRONLY | O_CREAT);
        f.ok()) {
      const std::string why = st.toString();
      (void)internal::writeAt(*f, why.data(), why.size(), 0);
    }
    return st;
  };

  // Checksums first (from memory), then one sequential stream of large writes.
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<ShardRecord> records;
  for (const Item& item : items_) {
    ShardRecord r;
    r.rank = rank_;
    r.file = shardFileName(rank_);
    r.offset = item.file_offset;
    r.bytes = item.bytes;
    r.box = item.box;
    const unsigned char* p = staging_ + item.file_offset;
    r.checksum = checksum(p, item.bytes);
    for (std::uint64_t b = 0; b < item.bytes; b += options_.block_bytes) {
      r.blocks.push_back(checksum(p + b, std::min(options_.block_bytes, item.bytes - b)));
    }
    records.push_back(std::move(r));
  }
  const auto t1 = std::chrono::steady_clock::now();
  auto t2 = t1;
  // Direct I/O where the filesystem has it: the data goes from the page-aligned host memory to
  // the disk without a copy into the page cache (and without the writeback throttling that
  // concurrent ranks' buffered writes run into). Offsets and lengths are multiples of 4 KiB. Where
  // open() or the first write refuses it (e.g. tmpfs: EINVAL), buffered writes instead.
  auto writeAll = [&](bool direct) -> Status {
    RALLY_ASSIGN_OR_RETURN(
        internal::File f,
        internal::openFile(file_path, O_WRONLY | O_CREAT | O_TRUNC | (direct ? O_DIRECT : 0)));
    for (std::uint64_t off = 0; off < staging_bytes_; off += options_.write_chunk_bytes) {
      {
        std::lock_guard lock(mu_);
        if (cancel_) return aborted("abandoned: the world changed (attach() again)");
      }
      const std::uint64_t n = std::min(options_.write_chunk_bytes, staging_bytes_ - off);
      if (options_.write_hook != nullptr) {
        RALLY_RETURN_IF_ERROR(options_.write_hook->beforeWrite(file_path, off, n));
      }
      RALLY_RETURN_IF_ERROR(internal::writeAt(f, staging_ + off, n, off));
    }
    t2 = std::chrono::steady_clock::now();
    RALLY_RETURN_IF_ERROR(internal::syncData(f));
    return f.close();
  };
  Status written = writeAll(true);
  if (!written.ok() && written.code() == StatusCode::kIo &&
      written.message().find("Invalid argument") != std::string::npos) {
    written = writeAll(false);
  }
  if (!written.ok()) return fail(written);
  log::get("checkpoint")
      ->debug("step {}: rank {} checksums {:.1f} ms, write {:.1f} ms, fdatasync {:.1f} ms ({})",
              job.step, rank_, std::chrono::duration<double, std::milli>(t1 - t0).count(),
              std::chrono::duration<double, std::milli>(t2 - t1).count(), msSince(t2),
              formatBytes(static_cast<std::int64_t>(staging_bytes_)));

  json shards = json::array();
  for (size_t i = 0; i < records.size(); ++i) {
    const ShardRecord& r = records[i];
    json blocks = json::array();
    for (std::uint64_t b : r.blocks) blocks.push_back(checksumHex(b));
    shards.push_back({{"tensor", items_[i].tensor},
                      {"offset", r.offset},
                      {"bytes", r.bytes},
                      {"start", r.box.start},
                      {"shape", r.box.shape},
                      {"checksum", checksumHex(r.checksum)},
                      {"blocks", blocks}});
  }
  const std::string index = json{
      {"rank", rank_},
      {"file", shardFileName(rank_)},
      {"bytes", staging_bytes_},
      {"shards", shards}}.dump(-1, ' ', false, json::error_handler_t::replace);
  const std::string index_path = partial + "/" + shardIndexName(rank_);
  if (options_.write_hook != nullptr) {
    if (Status h = options_.write_hook->beforeWrite(index_path, 0, index.size()); !h.ok()) {
      return fail(h);
    }
  }
  // The index need not be durable (rank 0 reads it into the manifest, which is), only appear
  // whole: a temporary name and a rename.
  {
    const std::string tmp = index_path + ".tmp";
    auto f = internal::openFile(tmp, O_WRONLY | O_CREAT | O_TRUNC);
    if (!f.ok()) return fail(f.status());
    if (Status w = internal::writeAt(*f, index.data(), index.size(), 0); !w.ok()) return fail(w);
    if (Status c = f->close(); !c.ok()) return fail(c);
    if (::rename(tmp.c_str(), index_path.c_str()) != 0) {
      return fail(internal::fileError("rename", tmp, errno));
    }
  }
  return okStatus();
}

Status Checkpointer::finalize(Job& job, Status own) {
  const std::string partial_name = partialName(job.step, job.token, job.seq);
  const std::string partial = dir_ + "/" + partial_name;
  auto abandon = [&](Status st) {
    std::error_code ec;
    fs::remove_all(partial, ec);
    return st;
  };

  // 1. Wait for every rank's index (or its failure marker).
  const auto deadline = std::chrono::steady_clock::now() + options_.finalize_timeout;
  Milliseconds pause(1);
  std::vector<int> missing;
  for (;;) {
    missing.clear();
    for (int r = 0; r < size_; ++r) {
      if (r == 0 && !own.ok()) continue;  // this rank failed: the others only need to stop
      std::error_code exists_ec;
      if (fs::exists(partial + "/" + shardFailedName(r), exists_ec)) {
        auto why = internal::readWholeFile(partial + "/" + shardFailedName(r));
        return abandon(ioError(fmt::format("rank {} could not write its shard: {}", r,
                                           why.ok() && !why->empty() ? *why : "see its log")));
      }
      if (!fs::exists(partial + "/" + shardIndexName(r), exists_ec)) missing.push_back(r);
    }
    if (missing.empty()) break;
    std::unique_lock lock(mu_);
    if (!own.ok() && (cancel_ || std::chrono::steady_clock::now() > deadline)) return abandon(own);
    if (cancel_) {
      return abandon(aborted(fmt::format(
          "abandoned while waiting for rank(s) {} (the world changed)", fmt::join(missing, ", "))));
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return abandon(
          timeoutError(fmt::format("rank(s) {} did not finish writing their shards within {} ms",
                                   fmt::join(missing, ", "), options_.finalize_timeout.count())));
    }
    cv_.wait_for(lock, pause, [&] { return cancel_; });
    // Polling a few files costs little; with many ranks (many stat() calls, perhaps on shared
    // storage) it backs off further.
    pause = std::min(pause * 2, Milliseconds(std::clamp(size_ / 8, 1, 20)));
  }

  if (!own.ok()) return abandon(own);  // removed once no other rank writes into it
  const auto committing = std::chrono::steady_clock::now();

  // 2. The manifest: every rank's shards, tensors in the ranks' registration order.
  Manifest m;
  m.step = job.step;
  m.commit = job.commit;
  m.created = job.created;
  m.block_bytes = options_.block_bytes;
  m.world_size = size_;
  m.layout = options_.layout;
  m.scalars = job.scalars;
  std::map<std::string, TensorRecord> tensors;
  std::set<std::string> listed = {kManifestName};
  for (int r = 0; r < size_; ++r) {
    auto text = internal::readWholeFile(partial + "/" + shardIndexName(r));
    if (!text.ok()) return abandon(text.status());
    json index = json::parse(*text, nullptr, false);
    if (index.is_discarded()) {
      return abandon(internalError(fmt::format("rank {}'s shard index is not valid JSON", r)));
    }
    try {
      FileRecord f{index["file"].get<std::string>(), index["bytes"].get<std::uint64_t>(), r};
      listed.insert(f.name);
      m.files.push_back(f);  // every rank's, even empty: a 0-byte shard may name it
      for (const json& sj : index["shards"]) {
        ShardRecord s;
        s.rank = r;
        s.file = f.name;
        s.offset = sj["offset"].get<std::uint64_t>();
        s.bytes = sj["bytes"].get<std::uint64_t>();
        s.box.start = sj["start"].get<std::vector<std::int64_t>>();
        s.box.shape = sj["shape"].get<std::vector<std::int64_t>>();
        s.checksum = std::stoull(sj["checksum"].get<std::string>(), nullptr, 16);
        for (const json& b : sj["blocks"])
          s.blocks.push_back(std::stoull(b.get<std::string>(), nullptr, 16));
        tensors[sj["tensor"].get<std::string>()].shards.push_back(std::move(s));
      }
    } catch (const std::exception& e) {
      return abandon(internalError(fmt::format("rank {}'s shard index: {}", r, e.what())));
    }
  }
  for (const TensorRecord& known : tensors_) {
    auto it = tensors.find(known.name);
    if (it == tensors.end()) continue;
    TensorRecord t = known;
    t.shards = std::move(it->second.shards);
    m.tensors.push_back(std::move(t));
  }
  if (Status v = parseManifest(toJson(m)).status(); !v.ok()) {
    return abandon(internalError("the merged manifest does not validate: " + v.message()));
  }

  // 3. Anything in the directory that the manifest does not name (a crashed earlier attempt's
  //    files) goes; then manifest last, and the rename that makes the checkpoint exist.
  std::error_code ec;
  for (const auto& de : fs::directory_iterator(partial, ec)) {
    if (listed.count(de.path().filename().string()) == 0) fs::remove_all(de.path(), ec);
  }
  const std::string manifest_path = partial + "/" + kManifestName;
  const std::string text = toJson(m);
  if (options_.write_hook != nullptr) {
    if (Status h = options_.write_hook->beforeWrite(manifest_path, 0, text.size()); !h.ok()) {
      return abandon(h);
    }
  }
  // Written in place (the directory is not a checkpoint until renamed), made durable with the
  // directory's entries (every rank's shard file), then the rename and the parent's fsync.
  {
    auto f = internal::openFile(manifest_path, O_WRONLY | O_CREAT | O_TRUNC);
    Status st = f.status();
    if (st.ok()) st = internal::writeAt(*f, text.data(), text.size(), 0);
    if (st.ok()) st = internal::syncData(*f);
    if (st.ok()) st = f->close();
    if (st.ok()) st = internal::syncDirectory(partial);
    if (!st.ok()) return abandon(st);
  }
  const std::string final_path = dir_ + "/" + stepDirectoryName(job.step);
  std::error_code exists_ec;
  if (fs::exists(final_path + "/" + kManifestName, exists_ec)) {
    log::get("checkpoint")
        ->warn("step {} already has a complete checkpoint at {}; keeping that one", job.step,
               final_path);
    return abandon(okStatus());
  }
  fs::remove_all(final_path, ec);  // an incomplete directory of that name
  if (::rename(partial.c_str(), final_path.c_str()) != 0) {
    return abandon(internal::fileError("rename", partial + " -> " + final_path, errno));
  }
  if (Status s = internal::syncDirectory(dir_); !s.ok()) return s;
  log::get("checkpoint")
      ->info("checkpoint step {} saved to {} ({} in {} files; commit {:.1f} ms)", job.step,
             final_path, formatBytes(static_cast<std::int64_t>(m.totalBytes())), m.files.size(),
             msSince(committing));

  // 4. Leftovers of saves that will never finish (older attachments, crashed runs), then
  //    retention.
  for (const auto& de : fs::directory_iterator(dir_, ec)) {
    std::uint64_t token = 0, seq = 0;
    if (de.path().filename().string().rfind(".removing-", 0) == 0) {  // a removal interrupted
      fs::remove_all(de.path(), ec);
      continue;
    }
    if (!parsePartialName(de.path().filename().string(), &token, &seq)) continue;
    if (token != job.token || seq < job.seq) fs::remove_all(de.path(), ec);
  }
  return okStatus();
}

void Checkpointer::applyRetention() {
  if (options_.keep_last <= 0) return;
  int kept = 0;
  for (const CheckpointEntry& e : listCheckpoints(dir_)) {
    if (!e.complete) continue;
    if (kept < options_.keep_last) {
      ++kept;
      continue;
    }
    if (options_.keep_every > 0 && e.step % static_cast<std::uint64_t>(options_.keep_every) == 0) {
      continue;
    }
    // Renamed first, so that a crash in the middle of the removal cannot leave a checkpoint that
    // has a manifest but lacks files.
    std::error_code ec;
    const std::string doomed = dir_ + "/.removing-" + fs::path(e.path).filename().string();
    if (::rename(e.path.c_str(), doomed.c_str()) != 0) {
      log::get("checkpoint")
          ->warn("retention: cannot rename {} away ({}); keeping it", e.path, std::strerror(errno));
      continue;
    }
    (void)internal::syncDirectory(dir_);
    fs::remove_all(doomed, ec);
    if (ec) {
      log::get("checkpoint")->warn("retention: cannot remove {}: {}", e.path, ec.message());
    } else {
      log::get("checkpoint")->debug("retention: removed {}", e.path);
    }
  }
}

}  // namespace rally::checkpoint
