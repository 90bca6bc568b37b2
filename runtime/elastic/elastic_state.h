// The training state that in-place recovery keeps: named buffers (pointer, dtype, shape; any
// framework's memory) and scalars (step, epoch, sampler position, loss scale), registered once.
// commit() snapshots them into this state's own host memory; restore() puts the snapshot back;
// sync() makes every rank of a communicator hold the newest commit that any of them has, taking it
// from the lowest rank that holds it. That is how survivors roll back to the last step every rank
// finished, and how a replacement or a new node receives the state.
//
//   rally::ElasticState state;
//   RALLY_RETURN_IF_ERROR(state.registerBuffer("w", w.data(), DataType::kF32, {rows, cols}));
//   RALLY_RETURN_IF_ERROR(state.registerScalar("step", &step));
//   RALLY_RETURN_IF_ERROR(state.sync(comm).status());   // everyone starts from the same state
//   for (;; ++step) {
//     train_one_step();
//     if (step % commit_every == 0) RALLY_RETURN_IF_ERROR(state.commit());
//   }
//
// Commits are numbered 1, 2, ... per job (sync() carries the number along), so "newest" is well
// defined across ranks. Buffers are replicated state (every rank holds the same values, as in data
// parallelism): sync() broadcasts one rank's snapshot to all. Registered memory must stay valid
// and in place until unregistered; changing the registrations discards this rank's snapshot (it
// no longer matches), so the next sync() fetches one from a peer.
//
// Memory: one host copy of every registered byte, allocated at registration (so commit() never
// allocates). Device buffers (Device::cuda(i)) go through a DeviceCopier (runtime/elastic/
// device_copier.h; the CUDA one is runtime/cuda/cuda_copier.h), set before registering them.
//
// Thread-safety: none; one training thread uses it. sync() is collective: every rank of `comm`
// calls it, with the same registrations (names, dtypes, shapes) in the same order.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "kernels/base/status.h"
#include "runtime/elastic/device_copier.h"

namespace rally {

using collectives::DataType;

enum class DeviceKind { kHost, kCuda };

struct Device {
  DeviceKind kind = DeviceKind::kHost;
  int index = 0;
  static Device host() { return {}; }
  static Device cuda(int i) { return {DeviceKind::kCuda, i}; }
};

// A buffer that holds one box of a larger tensor (tensor parallelism): the tensor's global shape
// and where the buffer's first element lies in it (one offset per dimension). Checkpoints store
// boxes by these global coordinates, so a load can cut the tensor differently.
struct Sharding {
  std::vector<std::int64_t> global_shape;
  std::vector<std::int64_t> offset;
};

struct SyncOptions {
  // The newest commit number the job is known to have made (e.g. recorded in the coordinator's
  // store). If no participant holds it, sync() still completes with the newest one they have and
  // reports the fallback (SyncResult::fell_back_from); 0: unknown.
  std::uint64_t known_newest = 0;
  Milliseconds timeout{600'000};  // per collective
};

struct SyncResult {
  std::uint64_t commit = 0;          // the commit every rank now holds and has restored
  int source_rank = -1;              // the rank it came from; -1 when every rank had it already
  bool received = false;             // this rank's state changed to the source's
  std::uint64_t fell_back_from = 0;  // known_newest when it was lost with its holders; else 0
};

class ElasticState {
 public:
  ElasticState() = default;
  ElasticState(const ElasticState&) = delete;
  ElasticState& operator=(const ElasticState&) = delete;

  // How device buffers are copied (not owned; it must outlive this state). Needed before a buffer
  // with Device::cuda(i) is registered.
  void setDeviceCopier(DeviceCopier* copier) { copier_ = copier; }
  DeviceCopier* deviceCopier() const { return copier_; }

  // `shape` gives the element count (the product; {} is a scalar of one element). Names are unique;
  // the state holds no reference to the name after the call.
  Status registerBuffer(const std::string& name, void* data, DataType type,
                        std::vector<std::int64_t> shape, Device device = Device::host());
  // A shard of a larger tensor (see Sharding); `shape` is the local box's. sync() still treats it
  // as replicated among the ranks of its communicator (sync over the data-parallel group).
  Status registerShard(const std::string& name, void* data, DataType type,
                       std::vector<std::int64_t> shape, Sharding sharding,
                       Device device = Device::host());
  Status registerScalar(const std::string& name, std::int64_t* value);
  Status registerScalar(const std::string& name, double* value);
  Status unregister(const std::string& name);

  // Snapshots every registered buffer and scalar; the commit number goes up by one.
  Status commit();
  // Puts the last snapshot back into the registered memory. FailedPrecondition if there is none.
  Status restore();
  // Collective over `comm`: every rank ends holding, and restored to, the newest commit that any
  // rank of `comm` holds. If no rank has committed yet, rank 0's current values are committed
  // first (so a job starts from one state, as DDP broadcasts rank 0's parameters). Fails on every
  // rank, naming the entry, if the ranks' registrations differ.
  Result<SyncResult> sync(collectives::Communicator& comm, SyncOptions options = {});

  // Makes the registered memory's current values this rank's snapshot, numbered `commit` (after a
  // checkpoint was loaded into it: every rank adopts the checkpoint's number, so sync() agrees).
  Status adopt(std::uint64_t commit);
  // Drops this rank's snapshot (the next sync() fetches one from a peer, or starts from rank 0's
  // values if nobody has one).
  void forget() { commit_ = 0; }

  // The number of this rank's snapshot; 0: none.
  std::uint64_t commitNumber() const { return commit_; }
  bool hasCommit() const { return commit_ > 0; }
  // Bytes of registered buffers (and of the snapshot).
  size_t bytes() const { return arena_.size(); }
  size_t entries() const { return entries_.size(); }
  // One line per entry: "w f32 [3, 4] 48 B", in registration order (what sync() compares); a shard
  // adds "of [6, 4] at [3, 0]".
  std::string layout() const;

  enum class Kind { kBuffer, kInt, kDouble };
  struct Entry {
    std::string name;
    Kind kind;
    void* data;
    DataType type;
    std::vector<std::int64_t> shape;          // the local buffer's
    std::vector<std::int64_t> global_shape;   // == shape unless registered as a shard
    std::vector<std::int64_t> global_offset;  // zeros unless registered as a shard
    Device device;                            // where `data` lives
    size_t bytes;
    size_t offset;  // in arena_ (buffers) or scalars_ (scalars: index)
  };
  // What is registered, in registration order (checkpoints read and write through these).
  const std::vector<Entry>& registered() const { return entries_; }

 private:
  Status add(Entry e);
  void discardSnapshot(const char* why);
  Status takeSnapshot();
  Status putBack();

  std::vector<Entry> entries_;
  std::vector<unsigned char> arena_;   // buffers' snapshot
  std::vector<std::int64_t> scalars_;  // scalars' snapshot (doubles by their bits)
  std::uint64_t commit_ = 0;
  DeviceCopier* copier_ = nullptr;
};

}  // namespace rally
