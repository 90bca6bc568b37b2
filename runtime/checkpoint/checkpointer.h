// Checkpoints of an ElasticState on storage: sharded (each rank writes its part of every tensor
// to its own file), asynchronous (the training thread only copies into preallocated host memory;
// a background thread writes), atomic (a checkpoint exists once its manifest does: shard files,
// fsync, manifest last, rename of the directory, fsync of the parent) and reshardable (a load
// reads, on each rank, only the byte ranges of the boxes it holds, whatever world size and
// tensor-parallel split the checkpoint was saved with).
//
//   rally::checkpoint::Checkpointer ckpt("/ckpt/run1", {.keep_last = 3});
//   RALLY_RETURN_IF_ERROR(ckpt.attach(comm, state));          // collective
//   auto loaded = ckpt.loadNewest();                           // collective; NotFound: none
//   for (;; ++step) {
//     train_one_step();
//     if (step % 100 == 0) RALLY_RETURN_IF_ERROR(ckpt.save(step).status());  // returns at once
//   }
//   RALLY_RETURN_IF_ERROR(ckpt.wait(Milliseconds(600'000)));
//
// On disk (docs/checkpoint-format.md): DIR/step-000000000100/{manifest.json, shard-00000.bin,
// shard-00001.bin, ...}; a save in progress lives in DIR/.partial-step-...-TOKEN-SEQ/ until rank 0
// renames it. Who writes what: the ranks holding the same box of a tensor (replicas, as in data
// parallelism) split it along its first dimension, so every byte is written once and the ranks
// write in parallel. DIR must be one filesystem that all ranks see (shared storage across nodes).
//
// Failures: a save that fails (a full disk, an I/O error, a rank that died) is logged, reported
// by lastSave() and wait() (until the next save starts), and leaves every earlier checkpoint as it
// was; training goes on. A checkpoint that a load skips as corrupt is moved aside to
// DIR/.corrupt-step-... (kept for inspection, out of retention's way and of the next save's). A
// load skips a checkpoint that is incomplete or corrupt (naming it and the reason) and takes the
// next older one; every rank loads the same one.
//
// Device buffers (registered with Device::cuda(i) and a DeviceCopier): save() copies them on the
// copier's stream into page-locked host memory; a load reads into host memory and copies up.
//
// Thread-safety: one training thread calls attach, save, wait and load; the writer thread is
// internal. Cross-rank contract: attach, save and load are called by every rank of the
// communicator in the same order (with the same steps).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "collectives/communicator.h"
#include "kernels/base/status.h"
#include "runtime/checkpoint/manifest.h"
#include "runtime/elastic/elastic_state.h"

namespace rally::checkpoint {

// What save() does when the previous save is still being written (the disk is slower than the
// save interval): wait for it (every requested checkpoint is written; the training thread then
// waits for the disk), or skip this one (the training thread never waits for the disk; every rank
// skips together, which costs each save() one 8-byte allreduce to agree).
enum class WhileBusy { kWait, kSkip };

// A fault seam for tests: called before every write of shard data and metadata. Returning an
// error makes that write fail with it (e.g. ResourceExhausted: a full disk).
class WriteHook {
 public:
  virtual ~WriteHook() = default;
  virtual Status beforeWrite(const std::string& path, std::uint64_t offset, size_t bytes) = 0;
};

struct CheckpointOptions {
  int keep_last = 3;   // complete checkpoints kept, newest first; 0: keep all
  int keep_every = 0;  // also kept for good: steps that are multiples of this; 0: none
  WhileBusy while_busy = WhileBusy::kWait;
  std::uint64_t block_bytes = 64 << 10;  // checksum granularity (a load verifies whole blocks)
  std::uint64_t write_chunk_bytes = 16 << 20;  // one write() call
  Milliseconds finalize_timeout{300'000};      // rank 0 waits this long for the others' shards
  Milliseconds timeout{600'000};               // each collective
  std::string layout;                          // described in manifests ("dp=2 tp=2")
  WriteHook* write_hook = nullptr;
};

struct SaveReport {
  std::uint64_t step = 0;
  bool started = false;     // false: skipped (a save was in flight) or never asked
  bool finished = false;    // this rank's part is done (rank 0: the checkpoint is committed)
  Status status;            // of this rank's part (rank 0: of the whole checkpoint)
  std::uint64_t bytes = 0;  // this rank wrote
  double stall_ms = 0;      // the training thread's part: the copy into host memory
  double write_ms = 0;      // the background part: checksums, writes, fsync (and commit on rank 0)
};

struct LoadReport {
  std::uint64_t step = 0;
  std::uint64_t commit = 0;
  std::string path;
  std::uint64_t bytes_read = 0;      // by this rank, including whole checksum blocks
  std::uint64_t bytes_needed = 0;    // the bytes of the boxes this rank holds
  std::vector<std::string> skipped;  // "DIR/step-...: why", newest first (rank 0's view)
};

class Checkpointer {
 public:
  explicit Checkpointer(std::string dir, CheckpointOptions options = {});
  ~Checkpointer();  // waits for the save in flight (at most finalize_timeout)
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Collective: every rank tells every other which boxes of which tensors it holds; the split of
  // the writing is planned and its host memory allocated. Again after the world changes (a new
  // communicator) or the registrations do. A save of the previous attachment still in flight is
  // abandoned (its ranks may be gone; earlier checkpoints are unaffected).
  Status attach(collectives::Communicator& comm, ElasticState& state);

  // Copies this rank's part of the state into host memory and hands it to the writer: true. While
  // the previous save is being written: with WhileBusy::kWait (the default) waits for it first;
  // with kSkip returns false, on every rank (collective then: one allreduce of 8 bytes per call).
  Result<bool> save(std::uint64_t step);
  // Waits for this rank's part of the save in flight (rank 0: until the checkpoint is committed)
  // and returns its status (OK when none was in flight). Timeout if it takes longer.
  Status wait(Milliseconds timeout);
  bool busy() const;
  SaveReport lastSave() const;

  // Collective: loads the newest checkpoint that every rank can read in full into the registered
  // memory, and makes it the state's commit (ElasticState::adopt). NotFound when there is none.
  Result<LoadReport> loadNewest();
  // Collective: this step, or an error naming why it cannot be loaded.
  Result<LoadReport> load(std::uint64_t step);

  const std::string& directory() const { return dir_; }

 private:
  struct Item;  // one box this rank writes
  struct Job;
  Status checkAttached() const;
  Status loadOne(std::uint64_t step, LoadReport* report);
  void writerLoop();
  Status writeJob(Job& job);
  // Rank 0: waits for every rank's part and commits the checkpoint; with `own` failed, waits for
  // the others to stop and removes what was written.
  Status finalize(Job& job, Status own);
  void applyRetention();
  Status agree(bool ok, const char* what, bool* all_ok);

  std::string dir_;
  CheckpointOptions options_;
  collectives::Communicator* comm_ = nullptr;
  ElasticState* state_ = nullptr;
  std::string attached_layout_;
  int rank_ = 0, size_ = 1;
  std::uint64_t token_ = 0, seq_ = 0;
  std::vector<Item> items_;
  std::vector<TensorRecord> tensors_;  // every rank's tensors (no shards), rank 0's order first
  void freeStaging();
  unsigned char* staging_ = nullptr;  // this rank's shard file image, page aligned
  std::uint64_t staging_bytes_ = 0;
  DeviceCopier* staging_copier_ = nullptr;  // allocated the staging memory (page-locked), if any

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<Job> job_;   // handed to the writer; null when idle
  bool cancel_ = false;        // abandon the save in flight (re-attach, destruction)
  bool housekeeping_ = false;  // rank 0's writer removes old checkpoints (after a commit)
  bool stop_ = false;
  SaveReport last_;
  std::thread writer_;
};

// The checkpoints in `dir`, by step, newest first: complete ones (a manifest) and incomplete ones.
struct CheckpointEntry {
  std::uint64_t step = 0;
  std::string path;
  bool complete = false;
};
std::vector<CheckpointEntry> listCheckpoints(const std::string& dir);
std::string stepDirectoryName(std::uint64_t step);  // "step-000000000100"

// Reads every byte of a checkpoint and checks every checksum and size against its manifest.
// Problems are listed one per line, naming the file, the byte range and the tensor; OK if none.
struct VerifyReport {
  std::uint64_t bytes_checked = 0;
  std::vector<std::string> problems;
};
Result<VerifyReport> verifyCheckpoint(const std::string& path);

}  // namespace rally::checkpoint
