// Checkpointer's reading side: loads (resharding by box intersection, reading only the blocks
// that hold needed bytes, verifying each block read), listing and full verification.
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "kernels/base/logging.h"
#include "runtime/checkpoint/checkpointer.h"
#include "runtime/checkpoint/checksum.h"
#include "runtime/checkpoint/internal/file_io.h"

namespace rally::checkpoint {
namespace {

using internal::File;

constexpr std::uint64_t kMaxRead = 32 << 20;

// A contiguous piece of an intersection: `bytes` at `src` within the saved shard's bytes, going
// to `dst` within the local buffer.
struct Run {
  std::uint64_t src = 0, dst = 0, bytes = 0;
};

std::vector<std::int64_t> strides(const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> s(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) s[d - 1] = s[d] * shape[d];
  return s;
}

// The runs of `inter` (inside both `saved` and `local`), in the saved shard's byte order. Trailing
// dimensions that all three span fully merge into one run.
std::vector<Run> runsOf(const Box& saved, const Box& local, const Box& inter, size_t esize) {
  const size_t n = inter.shape.size();
  if (n == 0) return {{0, 0, esize}};
  const auto ss = strides(saved.shape), ls = strides(local.shape);
  size_t j = n - 1;
  auto full = [&](size_t d) {
    return inter.shape[d] == saved.shape[d] && inter.shape[d] == local.shape[d];
  };
  while (j > 0 && full(j)) --j;
  std::int64_t run_elems = 1;
  for (size_t d = j; d < n; ++d) run_elems *= inter.shape[d];
  std::vector<Run> runs;
  std::vector<std::int64_t> idx(j, 0);  // position within inter over dims 0..j-1
  for (;;) {
    std::int64_t src = 0, dst = 0;
    for (size_t d = 0; d < n; ++d) {
      const std::int64_t g = inter.start[d] + (d < j ? idx[d] : 0);
      src += (g - saved.start[d]) * ss[d];
      dst += (g - local.start[d]) * ls[d];
    }
    runs.push_back({static_cast<std::uint64_t>(src) * esize,
                    static_cast<std::uint64_t>(dst) * esize,
                    static_cast<std::uint64_t>(run_elems) * esize});
    size_t d = j;
    while (d > 0) {
      --d;
      if (++idx[d] < inter.shape[d]) break;
      idx[d] = 0;
      if (d == 0) return runs;
    }
    if (j == 0) return runs;
  }
}

class ShardFiles {
 public:
  explicit ShardFiles(std::string dir) : dir_(std::move(dir)) {}
  Result<const File*> get(const std::string& name) {
    auto it = files_.find(name);
    if (it == files_.end()) {
      RALLY_ASSIGN_OR_RETURN(File f, internal::openFile(dir_ + "/" + name, O_RDONLY));
      it = files_.emplace(name, std::move(f)).first;
    }
    return &it->second;
  }

 private:
  std::string dir_;
  std::map<std::string, File> files_;
};

Status checkBlock(const std::string& dir, const TensorRecord& t, const ShardRecord& s,
                  std::uint64_t block, std::uint64_t block_bytes, const unsigned char* data,
                  std::uint64_t bytes) {
  const std::uint64_t got = checksum(data, bytes);
  if (got == s.blocks[block]) return okStatus();
  const std::uint64_t lo = s.offset + block * block_bytes;
  return ioError(fmt::format(
      "{}/{} bytes [{}, {}) (tensor '{}', rank {}'s shard {}, block {}): checksum mismatch "
      "(manifest {}, data {}): the file is corrupt",
      dir, s.file, lo, lo + bytes, t.name, s.rank, describe(s.box), block,
      checksumHex(s.blocks[block]), checksumHex(got)));
}

// Reads the runs of one saved shard into `dst`, verifying every block it reads.
Status readRuns(const std::string& dir, ShardFiles& files, const Manifest& m, const TensorRecord& t,
                const ShardRecord& s, std::vector<Run> runs, unsigned char* dst,
                std::vector<unsigned char>& buf, std::uint64_t* bytes_read) {
  const std::uint64_t B = m.block_bytes;
  // Long runs in pieces, so one read never exceeds kMaxRead.
  std::vector<Run> pieces;
  for (const Run& r : runs) {
    for (std::uint64_t o = 0; o < r.bytes; o += kMaxRead / 2) {
      pieces.push_back({r.src + o, r.dst + o, std::min(kMaxRead / 2, r.bytes - o)});
    }
  }
  RALLY_ASSIGN_OR_RETURN(const File* f, files.get(s.file));
  size_t i = 0;
  while (i < pieces.size()) {
    std::uint64_t b0 = pieces[i].src / B, b1 = (pieces[i].src + pieces[i].bytes - 1) / B;
    size_t j = i + 1;
    while (j < pieces.size()) {
      const std::uint64_t c0 = pieces[j].src / B, c1 = (pieces[j].src + pieces[j].bytes - 1) / B;
      if (c0 > b1 + 1 || (std::max(b1, c1) - b0 + 1) * B > kMaxRead) break;
      b1 = std::max(b1, c1);
      ++j;
    }
    const std::uint64_t lo = b0 * B, hi = std::min((b1 + 1) * B, s.bytes);
    buf.resize(std::max<size_t>(buf.size(), hi - lo));
    RALLY_RETURN_IF_ERROR(internal::readAt(*f, buf.data(), hi - lo, s.offset + lo))
        << "reading tensor '" << t.name << "'";
    *bytes_read += hi - lo;
    for (std::uint64_t b = b0; b <= b1; ++b) {
      const std::uint64_t off = b * B - lo;
      RALLY_RETURN_IF_ERROR(
          checkBlock(dir, t, s, b, B, buf.data() + off, std::min(B, s.bytes - b * B)));
    }
    for (size_t k = i; k < j; ++k) {
      std::memcpy(dst + pieces[k].dst, buf.data() + (pieces[k].src - lo), pieces[k].bytes);
    }
    i = j;
  }
  return okStatus();
}

}  // namespace

Status Checkpointer::loadOne(std::uint64_t step, LoadReport* report) {
  const std::string path = dir_ + "/" + stepDirectoryName(step);
  RALLY_ASSIGN_OR_RETURN(const Manifest m, readManifest(path));
  if (m.step != step) {
    return invalidArgument(fmt::format("{}: the manifest says step {}", path, m.step));
  }
  report->step = m.step;
  report->commit = m.commit;
  report->path = path;
  report->bytes_read = report->bytes_needed = 0;

  // Names, types, shapes, and that the saved shards cover every box this rank holds, are checked
  // before any registered memory is touched; checksums as the blocks are read (a corrupt block
  // can leave earlier boxes loaded: the callers restore the state's commit then).
  struct Plan {
    const ElasticState::Entry* entry;
    const TensorRecord* tensor;
    std::vector<std::pair<const ShardRecord*, std::vector<Run>>> reads;
  };
  std::vector<Plan> plans;
  std::vector<std::string> names;
  for (const TensorRecord& t : m.tensors) names.push_back(t.name);
  for (const ElasticState::Entry& e : state_->registered()) {
    if (e.kind != ElasticState::Kind::kBuffer) {
      auto it = m.scalars.find(e.name);
      if (it == m.scalars.end()) {
        return notFound(fmt::format("{} has no scalar '{}'", path, e.name));
      }
      if (it->second.is_double != (e.kind == ElasticState::Kind::kDouble)) {
        return invalidArgument(fmt::format("{}: scalar '{}' was saved as {}, registered as {}",
                                           path, e.name, it->second.is_double ? "float64" : "int64",
                                           it->second.is_double ? "int64" : "float64"));
      }
      continue;
    }
    const TensorRecord* t = m.find(e.name);
    if (t == nullptr) {
      return notFound(
          fmt::format("{} has no tensor '{}' (it has: {})", path, e.name, fmt::join(names, ", ")));
    }
    if (t->type != e.type || t->shape != e.global_shape) {
      return invalidArgument(
          fmt::format("{}: tensor '{}' was saved as {} [{}], registered as {} [{}]", path, e.name,
                      collectives::dataTypeName(t->type), fmt::join(t->shape, ", "),
                      collectives::dataTypeName(e.type), fmt::join(e.global_shape, ", ")));
    }
    Plan plan{&e, t, {}};
    const Box local{e.global_offset, e.shape};
    std::int64_t covered = 0;
    const size_t esize = collectives::dataTypeSize(e.type);
    for (const ShardRecord& s : t->shards) {
      const Box inter = intersect(s.box, local);
      if (inter.empty() || (local.elements() == 0)) continue;
      covered += inter.elements();
      plan.reads.emplace_back(&s, runsOf(s.box, local, inter, esize));
    }
    if (covered != local.elements()) {
      return invalidArgument(fmt::format(
          "{}: the saved shards of '{}' cover {} of the {} elements of this rank's box {}", path,
          e.name, covered, local.elements(), describe(local)));
    }
    report->bytes_needed += e.bytes;
    plans.push_back(std::move(plan));
  }

  ShardFiles files(path);
  std::vector<unsigned char> buf, bounce;
  for (const Plan& p : plans) {
    // A device buffer is assembled in host memory, then copied up in one piece.
    const bool on_device = p.entry->device.kind != DeviceKind::kHost;
    if (on_device) bounce.resize(p.entry->bytes);
    unsigned char* dst = on_device ? bounce.data() : static_cast<unsigned char*>(p.entry->data);
    for (const auto& [shard, runs] : p.reads) {
      RALLY_RETURN_IF_ERROR(
          readRuns(path, files, m, *p.tensor, *shard, runs, dst, buf, &report->bytes_read));
    }
    if (on_device && p.entry->bytes > 0) {
      DeviceCopier* copier = state_->deviceCopier();
      RALLY_RETURN_IF_ERROR(copier->toDevice(p.entry->data, dst, p.entry->bytes, p.entry->device))
          << "copying '" << p.entry->name << "' to its device";
      RALLY_RETURN_IF_ERROR(copier->synchronize());
    }
  }
  for (const ElasticState::Entry& e : state_->registered()) {
    if (e.kind != ElasticState::Kind::kBuffer) std::memcpy(e.data, &m.scalars.at(e.name).bits, 8);
  }
  return okStatus();
}

Result<LoadReport> Checkpointer::load(std::uint64_t step) {
  RALLY_RETURN_IF_ERROR(checkAttached());
  LoadReport report;
  const Status st = loadOne(step, &report);
  bool all_ok = false;
  RALLY_RETURN_IF_ERROR(agree(st.ok(), "agreeing on the loaded checkpoint", &all_ok));
  if (!all_ok && report.bytes_read > 0 && state_->hasCommit()) {
    RALLY_RETURN_IF_ERROR(state_->restore());  // undo a partial load
  }
  if (!st.ok()) return st;
  if (!all_ok) {
    return ioError(fmt::format("{}/{} could not be loaded on another rank (see its log)", dir_,
                               stepDirectoryName(step)));
  }
  RALLY_RETURN_IF_ERROR(state_->adopt(report.commit));
  return report;
}

Result<LoadReport> Checkpointer::loadNewest() {
  RALLY_RETURN_IF_ERROR(checkAttached());
  auto log = log::get("checkpoint");
  std::vector<std::uint64_t> candidates;
  std::vector<std::string> skipped;
  if (rank_ == 0) {
    for (const CheckpointEntry& e : listCheckpoints(dir_)) {
      if (e.complete) {
        candidates.push_back(e.step);
      } else {
        skipped.push_back(e.path + ": incomplete (no manifest)");
        log->warn("ignoring {}: incomplete (no manifest; a save was interrupted)", e.path);
      }
    }
  }
  bool touched = false;  // registered memory was written by a load that then failed
  for (size_t i = 0;; ++i) {
    std::int64_t step =
        rank_ == 0 ? (i < candidates.size() ? static_cast<std::int64_t>(candidates[i]) : -1) : 0;
    if (size_ > 1) {
      RALLY_RETURN_IF_ERROR(comm_->broadcast(&step, 1, DataType::kI64, 0)->wait(options_.timeout))
          << "checkpoint: choosing the checkpoint to load";
    }
    if (step < 0) {
      if (touched && state_->hasCommit()) {
        RALLY_RETURN_IF_ERROR(state_->restore());
      }
      return notFound(fmt::format(
          "no usable checkpoint in {}{}{}", dir_,
          skipped.empty() ? "" : fmt::format(" (skipped: {})", fmt::join(skipped, "; ")),
          touched && !state_->hasCommit()
              ? "; the registered memory holds part of a corrupt checkpoint"
              : ""));
    }
    LoadReport report;
    const Status st = loadOne(static_cast<std::uint64_t>(step), &report);
    touched = touched || report.bytes_read > 0;
    // 2: loaded; 1: does not fit this state (another model, a missing tensor); 0: damaged data
    // (a checksum, a short or unreadable file). The least over the ranks decides.
    std::int64_t verdict = st.ok() ? 2 : st.code() == StatusCode::kIo ? 0 : 1;
    if (size_ > 1) {
      RALLY_RETURN_IF_ERROR(
          comm_->allreduce(&verdict, 1, DataType::kI64, collectives::ReduceOp::kMin)
              ->wait(options_.timeout))
          << "checkpoint: agreeing on the loaded checkpoint";
    }
    const bool all_ok = verdict == 2;
    const std::string path = dir_ + "/" + stepDirectoryName(static_cast<std::uint64_t>(step));
    if (all_ok) {
      RALLY_RETURN_IF_ERROR(state_->adopt(report.commit));
      report.skipped = skipped;
      if (rank_ == 0) {
        if (!skipped.empty()) {
          log->warn("loaded {} instead of a newer checkpoint: {}", path, fmt::join(skipped, "; "));
        }
        log->info("loaded checkpoint step {} from {} (commit {})", report.step, path,
                  report.commit);
      }
      return report;
    }
    if (!st.ok()) log->warn("rank {}: cannot load {}: {}", rank_, path, st.toString());
    skipped.push_back(
        path + ": " +
        (st.ok() ? std::string("unreadable on another rank (see its log)") : st.message()));
    if (verdict == 0 && rank_ == 0) {
      // Damaged: moved aside (kept for inspection), so that retention does not count it among
      // the checkpoints to keep and a new save of this step can take its name.
      std::string aside = dir_ + "/.corrupt-" + stepDirectoryName(static_cast<std::uint64_t>(step));
      for (int n = 1; ::access(aside.c_str(), F_OK) == 0; ++n) {
        aside = fmt::format("{}/.corrupt-{}.{}", dir_,
                            stepDirectoryName(static_cast<std::uint64_t>(step)), n);
      }
      if (::rename(path.c_str(), aside.c_str()) == 0) {
        log->warn("{} is damaged; moved aside to {}", path, aside);
      }
    }
  }
}

Result<VerifyReport> verifyCheckpoint(const std::string& path) {
  RALLY_ASSIGN_OR_RETURN(const Manifest m, readManifest(path));
  VerifyReport report;
  ShardFiles files(path);
  for (const FileRecord& f : m.files) {
    auto file = files.get(f.name);
    if (!file.ok()) {
      report.problems.push_back(fmt::format("{}/{}: {}", path, f.name, file.status().message()));
      continue;
    }
    auto size = internal::fileSize(**file);
    if (size.ok() && *size < f.bytes) {
      report.problems.push_back(fmt::format("{}/{}: {} bytes, the manifest says {}: truncated",
                                            path, f.name, *size, f.bytes));
    }
  }
  std::vector<unsigned char> buf;
  for (const TensorRecord& t : m.tensors) {
    for (const ShardRecord& s : t.shards) {
      auto file = files.get(s.file);
      if (!file.ok()) continue;  // reported above
      StreamingChecksum whole;
      bool readable = true;
      const std::uint64_t step =
          std::max<std::uint64_t>(m.block_bytes, kMaxRead / m.block_bytes * m.block_bytes);
      for (std::uint64_t lo = 0; lo < s.bytes && readable; lo += step) {
        const std::uint64_t n = std::min(step, s.bytes - lo);
        buf.resize(std::max<size_t>(buf.size(), n));
        if (Status r = internal::readAt(**file, buf.data(), n, s.offset + lo); !r.ok()) {
          report.problems.push_back(fmt::format("tensor '{}', rank {}'s shard {}: {}", t.name,
                                                s.rank, describe(s.box), r.message()));
          readable = false;
          break;
        }
        report.bytes_checked += n;
        whole.update(buf.data(), n);
        for (std::uint64_t b = lo / m.block_bytes; b * m.block_bytes < lo + n; ++b) {
          const std::uint64_t off = b * m.block_bytes - lo;
          if (Status c = checkBlock(path, t, s, b, m.block_bytes, buf.data() + off,
                                    std::min(m.block_bytes, s.bytes - b * m.block_bytes));
              !c.ok()) {
            report.problems.push_back(c.message());
          }
        }
      }
      if (readable && whole.value() != s.checksum) {
        report.problems.push_back(fmt::format(
            "{}/{} bytes [{}, {}) (tensor '{}', rank {}'s shard {}): checksum of the whole shard "
            "{} differs from the manifest's {}",
            path, s.file, s.offset, s.offset + s.bytes, t.name, s.rank, describe(s.box),
            checksumHex(whole.value()), checksumHex(s.checksum)));
      }
    }
  }
  return report;
}

}  // namespace rally::checkpoint
