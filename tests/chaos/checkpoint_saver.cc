// A process that saves checkpoints as fast as it can, for checkpoint_crash_test to SIGKILL at
// random moments: 2 ranks (threads over Gloo) hold a replicated state of `--bytes` whose contents
// are a function of the step; each starts from the newest checkpoint in DIR (checking it holds
// exactly what that step wrote) and then saves steps after it until `--steps` saves are done
// (0: until killed). Rank 0 prints "saving S" before each save and "saved S" once committed.
//   checkpoint_saver DIR --bytes 8388608 --steps 0
// With --full-disk (DIR a small filesystem, e.g. a 1 MiB tmpfs): saves step 1, then a step 2 that
// cannot fit, and prints what each rank saw, whether partial directories were left, and whether
// step 1 still loads with its contents:
//   checkpoint_saver DIR --full-disk
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"
#include "runtime/checkpoint/checkpointer.h"

using namespace rally;  // NOLINT(google-build-using-namespace): a test helper

namespace {

std::uint64_t value(std::int64_t step, size_t i) {
  return static_cast<std::uint64_t>(step) * 0x9E3779B97F4A7C15ull + i * 0x2545F4914F6CDD1Dull;
}

int rankMain(int r, collectives::MemoryBootstrapStore& store, const std::string& dir, size_t words,
             std::int64_t saves) {
  auto comm = collectives::createGlooCommunicator(
      store, {.rank = r, .size = 2, .generation = 1, .shared_memory = false});
  if (!comm.ok()) return std::fprintf(stderr, "%s\n", comm.status().toString().c_str()), 1;
  std::vector<std::uint64_t> data(words);
  std::int64_t step = 0;
  ElasticState state;
  Status st =
      state.registerBuffer("data", data.data(), DataType::kI64, {static_cast<std::int64_t>(words)});
  if (st.ok()) st = state.registerScalar("step", &step);
  checkpoint::Checkpointer ckpt(dir, {.while_busy = checkpoint::WhileBusy::kWait});
  if (st.ok()) st = ckpt.attach(**comm, state);
  if (!st.ok()) return std::fprintf(stderr, "%s\n", st.toString().c_str()), 1;
  auto loaded = ckpt.loadNewest();
  if (!loaded.ok() && loaded.status().code() != StatusCode::kNotFound) {
    return std::fprintf(stderr, "load: %s\n", loaded.status().toString().c_str()), 3;
  }
  for (size_t i = 0; i < words; ++i) {
    if (loaded.ok() && data[i] != value(step, i)) {
      std::fprintf(stderr, "rank %d: step %lld loaded, but word %zu is wrong\n", r,
                   static_cast<long long>(step), i);
      return 3;
    }
  }
  for (std::int64_t n = 0; saves == 0 || n < saves; ++n) {
    ++step;
    for (size_t i = 0; i < words; ++i) data[i] = value(step, i);
    if (r == 0) std::printf("saving %lld\n", static_cast<long long>(step)), std::fflush(stdout);
    auto started = ckpt.save(static_cast<std::uint64_t>(step));
    if (!started.ok()) return std::fprintf(stderr, "%s\n", started.status().toString().c_str()), 1;
    if (Status w = ckpt.wait(Milliseconds(60000)); !w.ok()) {
      return std::fprintf(stderr, "%s\n", w.toString().c_str()), 1;
    }
    if (r == 0) std::printf("saved %lld\n", static_cast<long long>(step)), std::fflush(stdout);
  }
  return 0;
}

bool holds(const std::vector<std::uint64_t>& data, std::int64_t step) {
  for (size_t i = 0; i < data.size(); ++i) {
    if (data[i] != value(step, i)) return false;
  }
  return true;
}

int fullDiskRank(int r, collectives::MemoryBootstrapStore& store, const std::string& dir) {
  auto comm = collectives::createGlooCommunicator(
      store, {.rank = r, .size = 2, .generation = 1, .shared_memory = false});
  if (!comm.ok()) return std::fprintf(stderr, "%s\n", comm.status().toString().c_str()), 1;
  std::vector<std::uint64_t> data((640 << 10) / 8);
  std::int64_t step = 1;
  ElasticState state;
  Status st = state.registerBuffer("data", data.data(), DataType::kI64,
                                   {static_cast<std::int64_t>(data.size())});
  if (st.ok()) st = state.registerScalar("step", &step);
  checkpoint::Checkpointer ckpt(dir, {.while_busy = checkpoint::WhileBusy::kWait});
  if (st.ok()) st = ckpt.attach(**comm, state);
  for (size_t i = 0; st.ok() && i < data.size(); ++i) data[i] = value(1, i);
  if (st.ok()) st = ckpt.save(1).status();
  if (st.ok()) st = ckpt.wait(Milliseconds(30000));
  if (!st.ok()) return std::fprintf(stderr, "first save: %s\n", st.toString().c_str()), 4;
  step = 2;
  for (size_t i = 0; i < data.size(); ++i) data[i] = value(2, i);
  st = ckpt.save(2).status();
  if (!st.ok()) return std::fprintf(stderr, "save 2 refused: %s\n", st.toString().c_str()), 5;
  const Status second = ckpt.wait(Milliseconds(30000));
  std::printf("rank %d save 2: %s\n", r, second.ok() ? "OK" : second.toString().c_str());
  std::fflush(stdout);
  if (!(**comm).barrier()->wait(Milliseconds(30000)).ok()) return 1;
  if (r == 0) {
    int partials = 0;
    for (const auto& de : std::filesystem::directory_iterator(dir)) {
      partials += de.path().filename().string().rfind(".partial", 0) == 0;
    }
    std::printf("partials %d\n", partials);
  }
  auto loaded = ckpt.loadNewest();
  if (r == 0) {
    std::printf("loaded %lld %s\n", loaded.ok() ? static_cast<long long>(loaded->step) : -1LL,
                loaded.ok() && step == 1 && holds(data, 1) ? "ok" : "wrong");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[2], "--full-disk") == 0) {
    collectives::MemoryBootstrapStore store;
    int rc1 = 0;
    std::thread other([&] { rc1 = fullDiskRank(1, store, argv[1]); });
    const int rc0 = fullDiskRank(0, store, argv[1]);
    other.join();
    return rc0 != 0 ? rc0 : rc1;
  }
  if (argc != 6 || std::strcmp(argv[2], "--bytes") != 0 || std::strcmp(argv[4], "--steps") != 0) {
    std::fprintf(stderr, "usage: checkpoint_saver DIR --bytes N --steps S\n");
    return 2;
  }
  const size_t words = std::strtoull(argv[3], nullptr, 10) / 8;
  const std::int64_t saves = std::strtoll(argv[5], nullptr, 10);
  collectives::MemoryBootstrapStore store;
  int rc[2] = {0, 0};
  std::thread other([&] { rc[1] = rankMain(1, store, argv[1], words, saves); });
  rc[0] = rankMain(0, store, argv[1], words, saves);
  other.join();
  return rc[0] != 0 ? rc[0] : rc[1];
}
