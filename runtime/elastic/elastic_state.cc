#include "runtime/elastic/elastic_state.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <climits>
#include <cstring>
#include <numeric>

#include "kernels/base/logging.h"

namespace rally {
namespace {

using collectives::Communicator;
using collectives::ReduceOp;

Status run(const std::shared_ptr<collectives::Work>& work, Milliseconds timeout,
           std::string_view what) {
  RALLY_RETURN_IF_ERROR(work->wait(timeout)) << "ElasticState::sync: " << what;
  return okStatus();
}

std::int64_t allreduceOne(Communicator& comm, std::int64_t v, ReduceOp op, Milliseconds timeout,
                          std::string_view what, Status& status) {
  if (status.ok()) status = run(comm.allreduce(&v, 1, DataType::kI64, op), timeout, what);
  return v;
}

}  // namespace

Status ElasticState::add(Entry e) {
  for (const Entry& other : entries_) {
    if (other.name == e.name) {
      return alreadyExists(fmt::format(
          "ElasticState: '{}' is already registered (unregister it first, or choose another name)",
          e.name));
    }
  }
  if (e.name.empty()) return invalidArgument("ElasticState: an entry needs a non-empty name");
  if (e.data == nullptr && e.bytes > 0) {
    return invalidArgument(fmt::format("ElasticState: '{}' has a null pointer", e.name));
  }
  if (e.kind == Kind::kBuffer) {
    e.offset = arena_.size();
    arena_.resize(arena_.size() + e.bytes);
  } else {
    e.offset = scalars_.size();
    scalars_.push_back(0);
  }
  entries_.push_back(std::move(e));
  discardSnapshot("the registrations changed");
  return okStatus();
}

Status ElasticState::registerBuffer(const std::string& name, void* data, DataType type,
                                    std::vector<std::int64_t> shape, Device device) {
  Sharding whole{shape, std::vector<std::int64_t>(shape.size(), 0)};
  return registerShard(name, data, type, std::move(shape), std::move(whole), device);
}

Status ElasticState::registerShard(const std::string& name, void* data, DataType type,
                                   std::vector<std::int64_t> shape, Sharding sharding,
                                   Device device) {
  if (device.kind != DeviceKind::kHost && copier_ == nullptr) {
    return failedPrecondition(fmt::format(
        "ElasticState: '{}' is in CUDA device memory: set a DeviceCopier first "
        "(setDeviceCopier(), e.g. rally::cuda::createCudaCopier()), or register a host copy",
        name));
  }
  std::int64_t elements = 1;
  for (std::int64_t d : shape) {
    if (d < 0) {
      return invalidArgument(fmt::format("ElasticState: '{}' has a negative dimension in [{}]",
                                         name, fmt::join(shape, ", ")));
    }
    elements *= d;
  }
  if (sharding.global_shape.size() != shape.size() || sharding.offset.size() != shape.size()) {
    return invalidArgument(fmt::format(
        "ElasticState: '{}' is a [{}] shard, but its global shape [{}] and offset [{}] need one "
        "entry per dimension ({})",
        name, fmt::join(shape, ", "), fmt::join(sharding.global_shape, ", "),
        fmt::join(sharding.offset, ", "), shape.size()));
  }
  for (size_t d = 0; d < shape.size(); ++d) {
    if (sharding.offset[d] < 0 || sharding.offset[d] + shape[d] > sharding.global_shape[d]) {
      return invalidArgument(fmt::format(
          "ElasticState: '{}': a [{}] shard at offset [{}] does not fit in the global shape [{}] "
          "(dimension {})",
          name, fmt::join(shape, ", "), fmt::join(sharding.offset, ", "),
          fmt::join(sharding.global_shape, ", "), d));
    }
  }
  return add({.name = name,
              .kind = Kind::kBuffer,
              .data = data,
              .type = type,
              .shape = std::move(shape),
              .global_shape = std::move(sharding.global_shape),
              .global_offset = std::move(sharding.offset),
              .device = device,
              .bytes = static_cast<size_t>(elements) * collectives::dataTypeSize(type),
              .offset = 0});
}

Status ElasticState::registerScalar(const std::string& name, std::int64_t* value) {
  return add({.name = name,
              .kind = Kind::kInt,
              .data = value,
              .type = DataType::kI64,
              .shape = {},
              .bytes = 8,
              .offset = 0});
}

Status ElasticState::registerScalar(const std::string& name, double* value) {
  return add({.name = name,
              .kind = Kind::kDouble,
              .data = value,
              .type = DataType::kF64,
              .shape = {},
              .bytes = 8,
              .offset = 0});
}

Status ElasticState::unregister(const std::string& name) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->name != name) continue;
    entries_.erase(it);
    // Re-pack the snapshot memory for what is left.
    size_t arena = 0, scalars = 0;
    for (Entry& e : entries_) {
      e.offset = e.kind == Kind::kBuffer ? std::exchange(arena, arena + e.bytes) : scalars++;
    }
    arena_.assign(arena, 0);
    arena_.shrink_to_fit();
    scalars_.assign(scalars, 0);
    discardSnapshot("the registrations changed");
    return okStatus();
  }
  return notFound(fmt::format("ElasticState: '{}' is not registered", name));
}

void ElasticState::discardSnapshot(const char* why) {
  if (commit_ > 0) {
    log::get("elastic")->info("dropping commit {}: {}; the next sync() fetches one from a peer",
                              commit_, why);
  }
  commit_ = 0;
}

Status ElasticState::takeSnapshot() {
  bool device = false;
  for (const Entry& e : entries_) {
    if (e.kind != Kind::kBuffer) {
      std::memcpy(&scalars_[e.offset], e.data, 8);
    } else if (e.bytes == 0) {
    } else if (e.device.kind == DeviceKind::kHost) {
      std::memcpy(arena_.data() + e.offset, e.data, e.bytes);
    } else {
      RALLY_RETURN_IF_ERROR(copier_->toHost(arena_.data() + e.offset, e.data, e.bytes, e.device))
          << "ElasticState: copying '" << e.name << "' from its device";
      device = true;
    }
  }
  if (device) {
    RALLY_RETURN_IF_ERROR(copier_->synchronize()) << "ElasticState: device copies";
  }
  return okStatus();
}

Status ElasticState::putBack() {
  bool device = false;
  for (const Entry& e : entries_) {
    if (e.kind != Kind::kBuffer) {
      std::memcpy(e.data, &scalars_[e.offset], 8);
    } else if (e.bytes == 0) {
    } else if (e.device.kind == DeviceKind::kHost) {
      std::memcpy(e.data, arena_.data() + e.offset, e.bytes);
    } else {
      RALLY_RETURN_IF_ERROR(copier_->toDevice(e.data, arena_.data() + e.offset, e.bytes, e.device))
          << "ElasticState: copying '" << e.name << "' to its device";
      device = true;
    }
  }
  if (device) {
    RALLY_RETURN_IF_ERROR(copier_->synchronize()) << "ElasticState: device copies";
  }
  return okStatus();
}

Status ElasticState::commit() {
  RALLY_RETURN_IF_ERROR(takeSnapshot());
  ++commit_;
  return okStatus();
}

Status ElasticState::adopt(std::uint64_t commit) {
  if (commit == 0) return invalidArgument("ElasticState::adopt: commit numbers start at 1");
  RALLY_RETURN_IF_ERROR(takeSnapshot());
  commit_ = commit;
  return okStatus();
}

Status ElasticState::restore() {
  if (commit_ == 0) {
    return failedPrecondition(
        "ElasticState::restore: there is no commit to restore (commit() or sync() first)");
  }
  return putBack();
}

std::string ElasticState::layout() const {
  std::string out;
  for (const Entry& e : entries_) {
    const char* kind = e.kind == Kind::kInt      ? "int64 scalar"
                       : e.kind == Kind::kDouble ? "float64 scalar"
                                                 : nullptr;
    if (kind != nullptr) {
      out += fmt::format("{} {}\n", e.name, kind);
    } else {
      const bool shard = e.global_shape != e.shape;
      out += fmt::format("{} {} [{}]{} {} B\n", e.name, collectives::dataTypeName(e.type),
                         fmt::join(e.shape, ", "),
                         shard ? fmt::format(" of [{}] at [{}]", fmt::join(e.global_shape, ", "),
                                             fmt::join(e.global_offset, ", "))
                               : "",
                         e.bytes);
    }
  }
  return out;
}

Result<SyncResult> ElasticState::sync(Communicator& comm, SyncOptions options) {
  const Milliseconds timeout = options.timeout;
  const int rank = comm.rank();
  Status st;

  // 1. Every rank must have registered the same entries: the lowest rank's layout is compared
  //    on every rank, and all fail together if any differs (none may go on to the broadcast).
  const std::string mine = layout();
  std::int64_t length = static_cast<std::int64_t>(mine.size());
  const std::int64_t longest =
      allreduceOne(comm, length, ReduceOp::kMax, timeout, "comparing registrations (length)", st);
  RALLY_RETURN_IF_ERROR(st);
  std::string reference(static_cast<size_t>(longest) + 8, '\0');
  std::memcpy(reference.data(), &length, 8);
  std::memcpy(reference.data() + 8, mine.data(), mine.size());
  RALLY_RETURN_IF_ERROR(run(comm.broadcast(reference.data(), reference.size(), DataType::kU8, 0),
                            timeout, "comparing registrations"));
  std::int64_t ref_length = 0;
  std::memcpy(&ref_length, reference.data(), 8);
  reference = reference.substr(8, static_cast<size_t>(ref_length));
  const bool same = reference == mine;
  const std::int64_t all_same =
      allreduceOne(comm, same ? 1 : 0, ReduceOp::kMin, timeout, "comparing registrations", st);
  RALLY_RETURN_IF_ERROR(st);
  if (all_same == 0) {
    if (same) {
      return invalidArgument(fmt::format(
          "ElasticState::sync: another rank's registered entries differ from rank 0's (rank {} "
          "matches rank 0: {} entries); see that rank's error",
          rank, entries_.size()));
    }
    return invalidArgument(fmt::format(
        "ElasticState::sync: rank {}'s registered entries differ from rank 0's; every rank must "
        "register the same names, dtypes and shapes in the same order.\nrank 0:\n{}rank {}:\n{}",
        rank, reference, rank, mine));
  }

  // 2. Which commit is newest, and who holds it.
  SyncResult result;
  std::int64_t newest = allreduceOne(comm, static_cast<std::int64_t>(commit_), ReduceOp::kMax,
                                     timeout, "finding the newest commit", st);
  RALLY_RETURN_IF_ERROR(st);
  if (newest == 0) {  // nobody has committed: start everyone from rank 0's values
    Status snap = rank == 0 ? takeSnapshot() : okStatus();
    if (rank == 0 && snap.ok()) commit_ = 1;
    // Every rank learns whether rank 0's values could be taken (a device copy can fail).
    const std::int64_t taken = allreduceOne(comm, snap.ok() ? 1 : 0, ReduceOp::kMin, timeout,
                                            "taking rank 0's values", st);
    RALLY_RETURN_IF_ERROR(st);
    RALLY_RETURN_IF_ERROR(snap);
    if (taken == 0) {
      return unavailable("ElasticState::sync: rank 0 could not copy its values (see its error)");
    }
    newest = 1;
  }
  const std::int64_t oldest = allreduceOne(comm, static_cast<std::int64_t>(commit_), ReduceOp::kMin,
                                           timeout, "finding the oldest commit", st);
  const std::int64_t source =
      allreduceOne(comm, static_cast<std::int64_t>(commit_) == newest ? rank : INT_MAX,
                   ReduceOp::kMin, timeout, "choosing the source rank", st);
  RALLY_RETURN_IF_ERROR(st);
  result.commit = static_cast<std::uint64_t>(newest);
  if (options.known_newest > result.commit) {
    result.fell_back_from = options.known_newest;
    if (rank == 0) {
      log::get("elastic")->warn(
          "falling back to commit {}: commit {} was held only by ranks that are gone", newest,
          options.known_newest);
    }
  }

  // 3. Bring the ranks that lack it up to date (the broadcast is skipped when all have it).
  if (oldest != newest) {
    result.source_rank = static_cast<int>(source);
    result.received = static_cast<std::int64_t>(commit_) != newest;
    RALLY_RETURN_IF_ERROR(
        run(comm.broadcast(arena_.data(), arena_.size(), DataType::kU8, static_cast<int>(source)),
            timeout, fmt::format("receiving commit {} from rank {}", newest, source)));
    RALLY_RETURN_IF_ERROR(run(
        comm.broadcast(scalars_.data(), scalars_.size(), DataType::kI64, static_cast<int>(source)),
        timeout, "receiving the scalars"));
    commit_ = static_cast<std::uint64_t>(newest);
  }
  RALLY_RETURN_IF_ERROR(putBack());
  return result;
}

}  // namespace rally
