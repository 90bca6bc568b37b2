// Checkpointer: round trips of every dtype and of scalars; N -> M resharding for N, M in 1..5;
// a tensor-parallel split changed at load (TP=2 saved, TP=1 and TP=3 loaded); a truncated file, a
// flipped byte and a missing manifest each detected and named, with the previous checkpoint used
// instead; retention; a full disk (a write hook) leaving everything intact; the skip and wait
// policies while a save is in flight; manifests that do not validate. Ranks are threads over a
// Gloo communicator and an in-memory store.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "runtime/checkpoint/checkpointer.h"
#include "runtime/checkpoint/checksum.h"
#include "tests/unit/collectives/gloo_ranks.h"

namespace rally::checkpoint {
namespace {

namespace fs = std::filesystem;
using collectives::Communicator;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/rally-ckpt-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void runRanks(int n, const std::function<void(int, Communicator&)>& body) {
  collectives::test_support::runGlooRanks(
      n, body, {.generation = 1, .op_timeout = Milliseconds(30000), .shared_memory = false});
}

// Bytes that depend on (seed, tensor name, global element index): any rank can compute what any
// part of a tensor must hold, whatever the split.
unsigned char expectedByte(std::uint64_t seed, const std::string& name, std::int64_t byte) {
  std::uint64_t h = seed * 0x9E3779B97F4A7C15ull + std::hash<std::string>()(name);
  h ^= static_cast<std::uint64_t>(byte) * 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  h *= 0x94D049BB133111EBull;
  return static_cast<unsigned char>(h >> 56);
}

// A tensor and the box of it that one rank holds.
struct Part {
  std::string name;
  DataType type;
  std::vector<std::int64_t> global;
  std::vector<std::int64_t> offset;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> data;

  size_t esize() const { return collectives::dataTypeSize(type); }
  // Calls f(local byte index, global byte index) for every byte of the box.
  void forEachByte(const std::function<void(size_t, std::int64_t)>& f) const {
    const size_t n = shape.size();
    std::int64_t elems = 1;
    for (auto d : shape) elems *= d;
    for (std::int64_t i = 0; i < elems; ++i) {
      std::int64_t rem = i, g = 0, stride = 1;
      std::vector<std::int64_t> idx(n);
      for (size_t d = n; d-- > 0;) {
        idx[d] = rem % shape[d];
        rem /= shape[d];
      }
      for (size_t d = n; d-- > 0;) {
        g += (idx[d] + offset[d]) * stride;
        stride *= global[d];
      }
      for (size_t b = 0; b < esize(); ++b) {
        f(static_cast<size_t>(i) * esize() + b,
          g * static_cast<std::int64_t>(esize()) + static_cast<std::int64_t>(b));
      }
    }
  }
  void fill(std::uint64_t seed) {
    data.assign(bytes(), 0);
    forEachByte([&](size_t l, std::int64_t g) { data[l] = expectedByte(seed, name, g); });
  }
  size_t bytes() const {
    size_t e = esize();
    for (auto d : shape) e *= static_cast<size_t>(d);
    return e;
  }
  // The first byte that differs from what `seed` wrote, or -1.
  std::int64_t firstWrong(std::uint64_t seed) const {
    std::int64_t wrong = -1;
    forEachByte([&](size_t l, std::int64_t g) {
      if (wrong < 0 && data[l] != expectedByte(seed, name, g)) wrong = static_cast<std::int64_t>(l);
    });
    return wrong;
  }
};

// A model's replicated tensors (odd sizes, every dtype), whole on every rank.
std::vector<Part> replicatedModel() {
  return {{"w", DataType::kF32, {7, 3}, {0, 0}, {7, 3}, {}},
          {"b", DataType::kF64, {5}, {0}, {5}, {}},
          {"h", DataType::kF16, {3, 2, 5}, {0, 0, 0}, {3, 2, 5}, {}},
          {"g", DataType::kBF16, {11}, {0}, {11}, {}},
          {"i", DataType::kI32, {2, 9}, {0, 0}, {2, 9}, {}},
          {"l", DataType::kI64, {1}, {0}, {1}, {}},
          {"rng", DataType::kU8, {13}, {0}, {13}, {}},
          {"scalar_t", DataType::kF32, {}, {}, {}, {}},
          {"empty", DataType::kF32, {0, 4}, {0, 0}, {0, 4}, {}}};
}

struct Scalars {
  std::int64_t step = 0;
  double lr = 0;
};

Status registerAll(ElasticState& state, std::vector<Part>& parts, Scalars& sc) {
  for (Part& p : parts) {
    if (p.data.size() != p.bytes()) p.data.assign(p.bytes(), 0);
    RALLY_RETURN_IF_ERROR(
        state.registerShard(p.name, p.data.data(), p.type, p.shape, {p.global, p.offset}));
  }
  RALLY_RETURN_IF_ERROR(state.registerScalar("step", &sc.step));
  return state.registerScalar("lr", &sc.lr);
}

// Saves `parts(rank, size)` filled from `seed` at `step` with `n` ranks, and waits.
void saveWith(const std::string& dir, int n, std::uint64_t seed, std::uint64_t step,
              const std::function<std::vector<Part>(int, int)>& parts,
              CheckpointOptions options = {}) {
  runRanks(n, [&](int r, Communicator& comm) {
    std::vector<Part> mine = parts(r, n);
    for (Part& p : mine) p.fill(seed);
    Scalars sc{static_cast<std::int64_t>(step), 0.1 * static_cast<double>(seed)};
    ElasticState state;
    ASSERT_TRUE(registerAll(state, mine, sc).ok());
    ASSERT_TRUE(state.commit().ok());
    Checkpointer ckpt(dir, options);
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    auto started = ckpt.save(step);
    ASSERT_TRUE(started.ok()) << started.status().toString();
    EXPECT_TRUE(*started);
    const Status st = ckpt.wait(Milliseconds(60000));
    EXPECT_TRUE(st.ok()) << st.toString();
  });
}

// Loads the newest checkpoint with `n` ranks holding `parts(rank, size)` and checks every byte.
void loadAndCheck(const std::string& dir, int n, std::uint64_t seed, std::uint64_t step,
                  const std::function<std::vector<Part>(int, int)>& parts,
                  std::vector<std::string>* skipped = nullptr) {
  std::mutex mu;
  runRanks(n, [&](int r, Communicator& comm) {
    std::vector<Part> mine = parts(r, n);
    Scalars sc;
    ElasticState state;
    ASSERT_TRUE(registerAll(state, mine, sc).ok());
    Checkpointer ckpt(dir);
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    auto loaded = ckpt.loadNewest();
    ASSERT_TRUE(loaded.ok()) << loaded.status().toString();
    EXPECT_EQ(loaded->step, step);
    EXPECT_EQ(sc.step, static_cast<std::int64_t>(step));
    EXPECT_EQ(sc.lr, 0.1 * static_cast<double>(seed));
    EXPECT_TRUE(state.hasCommit());
    for (const Part& p : mine) {
      EXPECT_EQ(p.firstWrong(seed), -1) << "rank " << r << " of " << n << ": tensor " << p.name;
    }
    EXPECT_GE(loaded->bytes_read, loaded->bytes_needed);
    if (skipped != nullptr && r == 0) {
      std::lock_guard lock(mu);
      *skipped = loaded->skipped;
    }
  });
}

TEST(Checkpoint, EveryDtypeAndScalarRoundTrips) {
  TempDir dir;
  auto parts = [](int, int) { return replicatedModel(); };
  saveWith(dir.path(), 1, 7, 100, parts);
  EXPECT_TRUE(fs::exists(dir.path() + "/step-000000000100/manifest.json"));
  loadAndCheck(dir.path(), 1, 7, 100, parts);
  auto verified = verifyCheckpoint(dir.path() + "/step-000000000100");
  ASSERT_TRUE(verified.ok()) << verified.status().toString();
  EXPECT_TRUE(verified->problems.empty());
}

TEST(Checkpoint, ReshardsEveryWorldSizeToEveryOther) {
  auto parts = [](int, int) { return replicatedModel(); };
  for (int n = 1; n <= 5; ++n) {
    TempDir dir;
    saveWith(dir.path(), n, 10 + n, 5, parts);
    auto m = readManifest(dir.path() + "/step-000000000005");
    ASSERT_TRUE(m.ok()) << m.status().toString();
    EXPECT_EQ(m->world_size, n);
    // Replicas split the writing: with 5 ranks, w's 7 rows come from 5 ranks.
    EXPECT_EQ(m->find("w")->shards.size(), static_cast<size_t>(n));
    for (int mm = 1; mm <= 5; ++mm) {
      SCOPED_TRACE(testing::Message() << "saved with " << n << " ranks, loaded with " << mm);
      loadAndCheck(dir.path(), mm, 10 + n, 5, parts);
    }
  }
}

// Megatron-style layers of a DP x TP grid: a column-parallel weight split along dim 0 and a
// row-parallel weight split along dim 1, replicated across the data-parallel ranks.
std::vector<Part> tpModel(int tp_rank, int tp) {
  auto split = [](std::int64_t n, int parts, int i) {
    return std::pair<std::int64_t, std::int64_t>{n * i / parts,
                                                 n * (i + 1) / parts - n * i / parts};
  };
  const auto [r0, rn] = split(12, tp, tp_rank);
  const auto [c0, cn] = split(9, tp, tp_rank);
  return {{"col.w", DataType::kF32, {12, 5}, {r0, 0}, {rn, 5}, {}},
          {"row.w", DataType::kBF16, {5, 9}, {0, c0}, {5, cn}, {}},
          {"norm", DataType::kF32, {5}, {0}, {5}, {}}};
}

TEST(Checkpoint, RanksWithNothingToWriteStillMakeAValidCheckpoint) {
  TempDir dir;
  // One row for two replicas, and an empty tensor: rank 1 writes no bytes at all.
  auto parts = [](int, int) {
    return std::vector<Part>{{"w", DataType::kF32, {1, 4}, {0, 0}, {1, 4}, {}},
                             {"e", DataType::kF32, {0}, {0}, {0}, {}}};
  };
  saveWith(dir.path(), 2, 9, 4, parts);
  loadAndCheck(dir.path(), 3, 9, 4, parts);
}

TEST(Checkpoint, TensorParallelSplitChangesAtLoad) {
  TempDir dir;
  // 4 ranks as DP=2 x TP=2 (tp rank = rank % 2).
  saveWith(dir.path(), 4, 3, 20, [](int r, int) { return tpModel(r % 2, 2); },
           {.layout = "dp=2 tp=2"});
  auto m = readManifest(dir.path() + "/step-000000000020");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->layout, "dp=2 tp=2");
  // TP=1 on 2 ranks, TP=3 on 3 ranks (DP=1), TP=3 x DP=2 on 6 ranks.
  loadAndCheck(dir.path(), 2, 3, 20, [](int, int) { return tpModel(0, 1); });
  loadAndCheck(dir.path(), 3, 3, 20, [](int r, int) { return tpModel(r, 3); });
  loadAndCheck(dir.path(), 6, 3, 20, [](int r, int) { return tpModel(r % 3, 3); });
}

TEST(Checkpoint, ABadLayoutIsRefusedOnEveryRank) {
  TempDir dir;
  runRanks(2, [&](int r, Communicator& comm) {
    // Both ranks claim rows 0..3 of 8 and nobody holds 4..7.
    std::vector<float> w(4 * 2);
    ElasticState state;
    ASSERT_TRUE(
        state.registerShard("w", w.data(), DataType::kF32, {4, 2}, {{8, 2}, {r == 0 ? 0 : 1, 0}})
            .ok());
    Checkpointer ckpt(dir.path());
    const Status st = ckpt.attach(comm, state);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("overlaps"), std::string::npos) << st.message();
    EXPECT_EQ(ckpt.save(1).status().code(), StatusCode::kFailedPrecondition);
  });
}

// Saves steps 1 and 2 with 2 ranks, damages step 2 with `damage`, and expects the load to name
// the damage and take step 1.
void expectFallback(const std::function<void(const std::string&)>& damage,
                    const std::string& named) {
  TempDir dir;
  auto parts = [](int, int) { return replicatedModel(); };
  saveWith(dir.path(), 2, 1, 1, parts);
  saveWith(dir.path(), 2, 2, 2, parts);
  const std::string step2 = dir.path() + "/step-000000000002";
  damage(step2);
  auto verified = verifyCheckpoint(step2);
  if (verified.ok()) {
    ASSERT_FALSE(verified->problems.empty());
    EXPECT_NE(verified->problems[0].find(named), std::string::npos) << verified->problems[0];
  } else {
    EXPECT_NE(verified.status().message().find(named), std::string::npos)
        << verified.status().message();
  }
  std::vector<std::string> skipped;
  loadAndCheck(dir.path(), 2, 1, 1, parts, &skipped);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("step-000000000002"), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[0].find(named), std::string::npos) << skipped[0];
  // Damaged data is moved aside; an incomplete one stays (it has no manifest to be trusted).
  const bool damaged = named != "incomplete";
  EXPECT_EQ(fs::exists(dir.path() + "/.corrupt-step-000000000002"), damaged);
  EXPECT_EQ(fs::exists(step2), !damaged);
  if (damaged) {  // the step can be saved again, and then it loads
    saveWith(dir.path(), 2, 3, 2, parts);
    loadAndCheck(dir.path(), 2, 3, 2, parts);
  }
}

TEST(Checkpoint, TruncatedShardIsNamedAndThePreviousOneLoads) {
  expectFallback([](const std::string& d) { fs::resize_file(d + "/shard-00001.bin", 10); },
                 "shard-00001.bin");
}

TEST(Checkpoint, FlippedByteIsNamedAndThePreviousOneLoads) {
  expectFallback(
      [](const std::string& d) {
        std::fstream f(d + "/shard-00000.bin", std::ios::in | std::ios::out | std::ios::binary);
        f.seekg(5);
        char c = 0;
        f.read(&c, 1);
        c = static_cast<char>(c ^ 0x10);
        f.seekp(5);
        f.write(&c, 1);
      },
      "checksum mismatch");
}

TEST(Checkpoint, MissingManifestIsNamedAndThePreviousOneLoads) {
  expectFallback([](const std::string& d) { fs::remove(d + "/manifest.json"); }, "incomplete");
}

TEST(Checkpoint, NothingToLoadIsNotFound) {
  TempDir dir;
  runRanks(2, [&](int, Communicator& comm) {
    auto parts = replicatedModel();
    Scalars sc;
    ElasticState state;
    ASSERT_TRUE(registerAll(state, parts, sc).ok());
    Checkpointer ckpt(dir.path());
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    EXPECT_EQ(ckpt.loadNewest().status().code(), StatusCode::kNotFound);
  });
}

TEST(Checkpoint, RetentionKeepsTheLastKAndEveryNth) {
  TempDir dir;
  runRanks(2, [&](int, Communicator& comm) {
    auto parts = replicatedModel();
    Scalars sc;
    ElasticState state;
    ASSERT_TRUE(registerAll(state, parts, sc).ok());
    Checkpointer ckpt(dir.path(),
                      {.keep_last = 2, .keep_every = 4, .while_busy = WhileBusy::kWait});
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    for (std::uint64_t step = 1; step <= 9; ++step) {
      ASSERT_TRUE(ckpt.save(step).ok());
    }
    ASSERT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
  });
  std::vector<std::uint64_t> steps;
  for (const auto& e : listCheckpoints(dir.path())) {
    EXPECT_TRUE(e.complete);
    steps.push_back(e.step);
  }
  EXPECT_EQ(steps, (std::vector<std::uint64_t>{9, 8, 4}));
  for (const auto& de : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(de.path().filename().string().rfind(".partial", 0), std::string::npos)
        << "left behind: " << de.path();
  }
}

// A disk that fills up: writes to rank `rank`'s shard after `budget` bytes fail with ENOSPC's
// status, until disarmed.
class FullDisk : public WriteHook {
 public:
  std::atomic<bool> armed{false};
  Status beforeWrite(const std::string& path, std::uint64_t offset, size_t bytes) override {
    if (armed && path.find("shard-00001") != std::string::npos) {
      return resourceExhausted("write(" + path +
                               "): No space left on device (the disk or quota is full)");
    }
    return okStatus();
  }
};

TEST(Checkpoint, AFullDiskLeavesThePreviousCheckpointAndTrainingGoesOn) {
  TempDir dir;
  FullDisk disk;
  auto parts = [](int, int) { return replicatedModel(); };
  runRanks(2, [&](int r, Communicator& comm) {
    std::vector<Part> mine = parts(r, 2);
    Scalars sc;
    ElasticState state;
    ASSERT_TRUE(registerAll(state, mine, sc).ok());
    Checkpointer ckpt(dir.path(), {.while_busy = WhileBusy::kWait, .write_hook = &disk});
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    for (Part& p : mine) p.fill(1);
    sc.step = 1;
    ASSERT_TRUE(ckpt.save(1).ok());
    ASSERT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
    ASSERT_TRUE(comm.barrier()->wait(Milliseconds(30000)).ok());
    if (r == 0) disk.armed = true;
    ASSERT_TRUE(comm.barrier()->wait(Milliseconds(30000)).ok());
    for (Part& p : mine) p.fill(2);
    sc.step = 2;
    sc.lr = 0.2;
    auto started = ckpt.save(2);
    ASSERT_TRUE(started.ok());  // the training thread is not stopped by the disk
    const Status failed = ckpt.wait(Milliseconds(60000));
    if (r == 1) {
      EXPECT_EQ(failed.code(), StatusCode::kResourceExhausted) << failed.toString();
    }
    if (r == 0) {
      EXPECT_FALSE(failed.ok());
      EXPECT_NE(failed.message().find("rank 1"), std::string::npos) << failed.message();
      EXPECT_NE(failed.message().find("No space left"), std::string::npos) << failed.message();
    }
    EXPECT_EQ(ckpt.lastSave().status.code(), failed.code());
    ASSERT_TRUE(comm.barrier()->wait(Milliseconds(30000)).ok());
    if (r == 0) disk.armed = false;
    ASSERT_TRUE(comm.barrier()->wait(Milliseconds(30000)).ok());
    sc.step = 3;
    ASSERT_TRUE(ckpt.save(3).ok());
    EXPECT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
  });
  std::vector<std::uint64_t> steps;
  for (const auto& e : listCheckpoints(dir.path())) steps.push_back(e.step);
  EXPECT_EQ(steps, (std::vector<std::uint64_t>{3, 1}));
  loadAndCheck(dir.path(), 2, 2, 3, parts);  // step 3 holds the values filled for step 2
  for (const auto& de : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(de.path().filename().string().rfind(".partial", 0), std::string::npos);
  }
}

// Holds every write until released: a save in flight for as long as the test wants.
class Gate : public WriteHook {
 public:
  Status beforeWrite(const std::string&, std::uint64_t, size_t) override {
    std::unique_lock lock(mu_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
    return okStatus();
  }
  void waitForWriter(int n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return waiting_ >= n; });
  }
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int waiting_ = 0;
  bool open_ = false;
};

TEST(Checkpoint, WhileASaveIsWrittenTheNextIsSkippedOnEveryRank) {
  TempDir dir;
  Gate gate;
  runRanks(2, [&](int r, Communicator& comm) {
    auto parts = replicatedModel();
    Scalars sc;
    ElasticState state;
    ASSERT_TRUE(registerAll(state, parts, sc).ok());
    // Only rank 0's writes are held: rank 1 is idle, yet it must skip too.
    Checkpointer ckpt(dir.path(),
                      {.while_busy = WhileBusy::kSkip, .write_hook = r == 0 ? &gate : nullptr});
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    ASSERT_TRUE(*ckpt.save(1));
    if (r == 0) gate.waitForWriter(1);
    if (r == 1) {
      ASSERT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
    }
    auto second = ckpt.save(2);
    ASSERT_TRUE(second.ok()) << second.status().toString();
    EXPECT_FALSE(*second) << "rank " << r;
    if (r == 0) gate.open();
    EXPECT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
    auto third = ckpt.save(3);
    ASSERT_TRUE(third.ok());
    EXPECT_TRUE(*third);
    EXPECT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
  });
  std::vector<std::uint64_t> steps;
  for (const auto& e : listCheckpoints(dir.path())) steps.push_back(e.step);
  EXPECT_EQ(steps, (std::vector<std::uint64_t>{3, 1}));
}

TEST(Checkpoint, ChangedRegistrationsNeedANewAttach) {
  TempDir dir;
  runRanks(1, [&](int, Communicator& comm) {
    auto parts = replicatedModel();
    Scalars sc;
    ElasticState state;
    ASSERT_TRUE(registerAll(state, parts, sc).ok());
    Checkpointer ckpt(dir.path());
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    ASSERT_TRUE(state.unregister("b").ok());
    const Status st = ckpt.save(1).status();
    EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(st.message().find("attach() again"), std::string::npos) << st.message();
  });
}

TEST(Checkpoint, LoadNamesAMissingTensorAndAShapeMismatch) {
  TempDir dir;
  saveWith(dir.path(), 1, 1, 1, [](int, int) { return replicatedModel(); });
  runRanks(1, [&](int, Communicator& comm) {
    std::vector<float> other(4), w(7 * 4);
    ElasticState state;
    ASSERT_TRUE(state.registerBuffer("other", other.data(), DataType::kF32, {4}).ok());
    Checkpointer ckpt(dir.path());
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    auto r = ckpt.load(1);
    EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
    EXPECT_NE(r.status().message().find("no tensor 'other'"), std::string::npos);
    ElasticState state2;
    ASSERT_TRUE(state2.registerBuffer("w", w.data(), DataType::kF32, {7, 4}).ok());
    ASSERT_TRUE(ckpt.attach(comm, state2).ok());
    r = ckpt.load(1);
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("saved as f32 [7, 3], registered as f32 [7, 4]"),
              std::string::npos)
        << r.status().message();
  });
}

// "Device memory" that is host memory with every byte XORed with 0x5A: read or written directly
// (not through the copier), it gives wrong values, so the tests catch any path that forgets it.
class FakeDeviceCopier final : public DeviceCopier {
 public:
  std::atomic<int> to_host{0}, to_device{0}, syncs{0}, pinned{0};
  static void encode(void* p, size_t n) {
    auto* b = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) b[i] ^= 0x5A;
  }
  Result<void*> allocateHost(size_t bytes) override {
    void* p = nullptr;
    if (::posix_memalign(&p, 4096, bytes) != 0) return resourceExhausted("fake");
    ++pinned;
    return p;
  }
  void freeHost(void* p) override { std::free(p); }
  Status toHost(void* host, const void* dev, size_t n, const Device& d) override {
    EXPECT_EQ(d.kind, DeviceKind::kCuda);
    std::memcpy(host, dev, n);
    encode(host, n);
    ++to_host;
    return okStatus();
  }
  Status toDevice(void* dev, const void* host, size_t n, const Device&) override {
    std::memcpy(dev, host, n);
    encode(dev, n);
    ++to_device;
    return okStatus();
  }
  Status synchronize() override {
    ++syncs;
    return okStatus();
  }
};

TEST(DeviceBuffers, CommitRestoreSaveAndReshardedLoadGoThroughTheCopier) {
  TempDir dir;
  FakeDeviceCopier copier;
  // Replicated [9, 5] f32 "on the device" and a host scalar; saved by 2 ranks, loaded by 3.
  auto values = [](float base) {
    std::vector<float> v(45);
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + static_cast<float>(i) * 0.25f;
    return v;
  };
  runRanks(2, [&](int, Communicator& comm) {
    std::vector<float> dev = values(1);
    FakeDeviceCopier::encode(dev.data(), dev.size() * 4);
    std::int64_t step = 7;
    ElasticState state;
    state.setDeviceCopier(&copier);
    ASSERT_TRUE(
        state.registerBuffer("w", dev.data(), DataType::kF32, {9, 5}, Device::cuda(0)).ok());
    ASSERT_TRUE(state.registerScalar("step", &step).ok());
    ASSERT_TRUE(state.commit().ok());
    std::vector<float> other = values(100);
    FakeDeviceCopier::encode(other.data(), other.size() * 4);
    std::vector<float> committed = dev;
    dev = other;  // training moved on
    ASSERT_TRUE(state.restore().ok());
    EXPECT_EQ(dev, committed);
    Checkpointer ckpt(dir.path());
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    ASSERT_TRUE(*ckpt.save(7));
    ASSERT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
  });
  EXPECT_GE(copier.pinned.load(), 2);  // each rank's host memory came from the copier
  runRanks(3, [&](int, Communicator& comm) {
    std::vector<float> dev(45, 0.0f);
    std::int64_t step = 0;
    ElasticState state;
    state.setDeviceCopier(&copier);
    ASSERT_TRUE(
        state.registerBuffer("w", dev.data(), DataType::kF32, {9, 5}, Device::cuda(0)).ok());
    ASSERT_TRUE(state.registerScalar("step", &step).ok());
    Checkpointer ckpt(dir.path());
    ASSERT_TRUE(ckpt.attach(comm, state).ok());
    auto loaded = ckpt.loadNewest();
    ASSERT_TRUE(loaded.ok()) << loaded.status().toString();
    FakeDeviceCopier::encode(dev.data(), dev.size() * 4);  // what the device holds, read back
    EXPECT_EQ(dev, values(1));
    EXPECT_EQ(step, 7);
  });
  EXPECT_GT(copier.to_host.load(), 0);
  EXPECT_GT(copier.to_device.load(), 0);
  EXPECT_GT(copier.syncs.load(), 0);
}

TEST(Manifest, RoundTripsAndRejectsWhatDoesNotAddUp) {
  Manifest m;
  m.step = 3;
  m.commit = 2;
  m.created = "2026-11-30T00:00:00Z";
  m.block_bytes = 16;
  m.world_size = 1;
  m.scalars["lr"] = {true, 0};
  double lr = 0.25;
  std::memcpy(&m.scalars["lr"].bits, &lr, 8);
  m.files.push_back({"shard-00000.bin", 4096, 0});
  TensorRecord t{"w", DataType::kF32, {2, 4}, {}};
  ShardRecord s;
  s.file = "shard-00000.bin";
  s.bytes = 32;
  s.box = {{0, 0}, {2, 4}};
  s.checksum = 0x0123456789abcdefull;
  s.blocks = {1, 2};
  t.shards.push_back(s);
  m.tensors.push_back(t);
  auto back = parseManifest(toJson(m));
  ASSERT_TRUE(back.ok()) << back.status().toString();
  EXPECT_EQ(back->scalars.at("lr").asDouble(), 0.25);
  EXPECT_EQ(back->find("w")->shards[0].checksum, 0x0123456789abcdefull);

  auto broken = [&](const std::function<void(Manifest&)>& f) {
    Manifest b = m;
    f(b);
    auto r = parseManifest(toJson(b));
    EXPECT_FALSE(r.ok());
    return r.status().message();
  };
  EXPECT_NE(broken([](Manifest& b) {
              b.tensors[0].shards[0].box.shape = {3, 4};
            }).find("outside"),
            std::string::npos);
  EXPECT_NE(broken([](Manifest& b) { b.tensors[0].shards[0].bytes = 31; }).find("expected 32"),
            std::string::npos);
  EXPECT_NE(broken([](Manifest& b) { b.tensors[0].shards[0].blocks = {1}; }).find("block"),
            std::string::npos);
  EXPECT_NE(broken([](Manifest& b) { b.tensors[0].shards[0].file = "x.bin"; }).find("not listed"),
            std::string::npos);
  EXPECT_NE(parseManifest("{\"format\": \"rally-checkpoint\"}").status().message().find(".version"),
            std::string::npos);
  EXPECT_NE(parseManifest("{ truncated").status().message().find("not valid JSON"),
            std::string::npos);
}

TEST(Checksum, StreamingEqualsOneShot) {
  std::vector<unsigned char> data(1000003);
  std::mt19937 rng(5);
  for (auto& b : data) b = static_cast<unsigned char>(rng());
  StreamingChecksum s;
  s.update(data.data(), 1);
  s.update(data.data() + 1, 65535);
  s.update(data.data() + 65536, data.size() - 65536);
  EXPECT_EQ(s.value(), checksum(data.data(), data.size()));
  EXPECT_NE(checksum(data.data(), 10), checksum(data.data() + 1, 10));
}

}  // namespace
}  // namespace rally::checkpoint
