// Checkpoint benchmark: for states of each --sizes across each --ranks (ranks as threads over
// Gloo, each holding 1/N of every tensor: 8 f32 tensors [rows, 1024] split along rows), measures
//   - the training thread's stall per save() against a plain memcpy of the same bytes (all ranks
//     copying at once in both cases; each round copies, then saves), medians over --saves rounds;
//   - the background write bandwidth (from save() to the checkpoint committed on rank 0) against
//   `dd if=/dev/zero bs=16M conv=fsync` of the same number of bytes in the
//     same directory, through the page cache and with oflag=direct, whichever is faster (each the
//     median of 3);
//   - the bytes read by a resharded load (N ranks saved, N+1 and N-1 load) against the bytes
//     they need.
//
//   checkpoint_bench [--dir /var/tmp/rally-ckpt-bench] [--sizes 256MiB,1GiB] [--ranks 2,4]
//                    [--saves 5]
//
// Last line: "checkpoint stall_vs_memcpy=S write_vs_dd=W reshard_read_ratio=R", each the worst
// over the table (largest stall and read ratios, smallest write ratio). RALLY_BENCH_DEBUG=1 adds
// each save's timings (copy, checksums, write, fdatasync, commit) on stderr.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"
#include "kernels/base/logging.h"
#include "kernels/base/units.h"
#include "runtime/checkpoint/checkpointer.h"

namespace rally::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr int kTensors = 8;
constexpr std::int64_t kCols = 1024;

double ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::vector<std::int64_t> parseList(const std::string& s, bool bytes) {
  std::vector<std::int64_t> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    const std::string item = s.substr(pos, end - pos);
    auto v = bytes ? parseBytes(item) : parseInteger(item);
    if (!v.ok() || *v <= 0) {
      std::fprintf(stderr, "checkpoint_bench: bad list item '%s'\n", item.c_str());
      std::exit(2);
    }
    out.push_back(*v);
    pos = end + 1;
  }
  return out;
}

// One rank's part: rows [lo, hi) of every tensor.
struct Shard {
  std::vector<std::vector<float>> tensors;
  ElasticState state;
  std::int64_t step = 0;
  Shard(std::int64_t rows, int rank, int size, bool fill) {
    const std::int64_t lo = rows * rank / size, hi = rows * (rank + 1) / size;
    tensors.resize(kTensors);
    for (int t = 0; t < kTensors; ++t) {
      auto& v = tensors[static_cast<size_t>(t)];
      v.resize(static_cast<size_t>((hi - lo) * kCols));
      if (fill) {
        for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 9973) * 0.5f + t;
      } else {
        std::memset(v.data(), 0, v.size() * 4);  // touched, like real parameters
      }
      Status s = state.registerShard(fmt::format("layer{}", t), v.data(), DataType::kF32,
                                     {hi - lo, kCols}, {{rows, kCols}, {lo, 0}});
      if (!s.ok()) std::abort();
    }
    if (!state.registerScalar("step", &step).ok()) std::abort();
  }
  size_t bytes() const { return tensors[0].size() * 4 * kTensors; }
};

void runThreads(int n, const std::function<void(int, collectives::Communicator&)>& body) {
  collectives::MemoryBootstrapStore store;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      auto comm = collectives::createGlooCommunicator(
          store, {.rank = r, .size = n, .generation = 1, .op_timeout = Milliseconds(600000)});
      if (!comm.ok()) {
        std::fprintf(stderr, "%s\n", comm.status().toString().c_str());
        std::exit(1);
      }
      body(r, **comm);
    });
  }
  for (auto& t : threads) t.join();
}

void check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "checkpoint_bench: %s: %s\n", what, s.toString().c_str());
    std::exit(1);
  }
}

// dd's time for `bytes` into `dir` with fsync (through the page cache, or with `flags` such as
// oflag=direct), seconds: the median of 3.
double ddSeconds(const std::string& dir, std::int64_t bytes, const char* flags) {
  const std::string file = dir + "/dd.bin";
  const std::string cmd =
      fmt::format("dd if=/dev/zero of='{}' bs=16M count={} conv=fsync {} 2>&1 >/dev/null | tail -1",
                  file, std::max<std::int64_t>(1, bytes / (16 << 20)), flags);
  double best = 0;
  std::vector<double> runs;
  for (int i = 0; i < 3; ++i) {
    FILE* p = ::popen(cmd.c_str(), "r");
    char line[512] = {0};
    if (p == nullptr || std::fgets(line, sizeof line, p) == nullptr) std::exit(1);
    ::pclose(p);
    // "268435456 bytes (268 MB, 256 MiB) copied, 0.401 s, 669 MB/s"
    const char* copied = std::strstr(line, "copied, ");
    if (copied == nullptr) std::exit(1);
    runs.push_back(std::strtod(copied + 8, nullptr));
    fs::remove(file);
  }
  best = median(runs);
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/var/tmp/rally-ckpt-bench";
  std::string sizes = "256MiB,1GiB", ranks = "2,4";
  int saves = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help") {
      std::printf("checkpoint_bench [--dir DIR] [--sizes 256MiB,1GiB] [--ranks 2,4] [--saves 5]\n");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "checkpoint_bench: %s needs a value (see --help)\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--dir")
      dir = v;
    else if (a == "--sizes")
      sizes = v;
    else if (a == "--ranks")
      ranks = v;
    else if (a == "--saves")
      saves = std::max(1, std::atoi(v.c_str()));
    else {
      std::fprintf(stderr, "checkpoint_bench: unknown option %s (see --help)\n", a.c_str());
      return 2;
    }
  }
  (void)log::setup("", std::getenv("RALLY_BENCH_DEBUG") ? "info,checkpoint=debug" : "warn");
  fs::create_directories(dir);
  double worst_stall = 0, worst_write = 1e9, worst_read = 0;
  std::printf("%10s %5s %10s %10s %9s %7s %9s %10s %8s %8s %9s %10s\n", "state", "ranks",
              "per_rank", "memcpy_ms", "stall_ms", "stall/x", "write_ms", "write_GBps", "dd_GBps",
              "write/dd", "reshard", "read/need");
  for (std::int64_t size : parseList(sizes, true)) {
    for (std::int64_t n64 : parseList(ranks, false)) {
      const int n = static_cast<int>(n64);
      const std::int64_t rows = size / (kTensors * kCols * 4);
      const std::string cdir = fmt::format("{}/state{}-ranks{}", dir, size, n);
      fs::remove_all(cdir);
      std::mutex mu;
      std::vector<double> memcpy_ms, stall_ms, write_ms;
      runThreads(n, [&](int r, collectives::Communicator& comm) {
        Shard shard(rows, r, n, true);
        std::vector<unsigned char> dst(shard.bytes(), 1);
        checkpoint::Checkpointer ckpt(cdir, {.keep_last = 1});
        check(ckpt.attach(comm, shard.state), "attach");
        auto barrier = [&] { check(comm.barrier()->wait(Milliseconds(600000)), "barrier"); };
        // Each round: the baseline (the same bytes copied by every rank at once), then a save;
        // interleaved so that both see the same state of the machine.
        for (int i = 0; i < saves; ++i) {
          barrier();
          const auto c0 = Clock::now();
          size_t off = 0;
          for (const auto& t : shard.tensors) {
            std::memcpy(dst.data() + off, t.data(), t.size() * 4);
            off += t.size() * 4;
          }
          const double copy = ms(c0, Clock::now());
          barrier();
          shard.step = i + 1;
          const auto t0 = Clock::now();
          auto started = ckpt.save(static_cast<std::uint64_t>(i + 1));
          const double stall = ms(t0, Clock::now());
          if (!started.ok() || !*started) check(started.status(), "save");
          if (std::getenv("RALLY_BENCH_DEBUG")) {
            std::fprintf(stderr, "rank %d save %d: memcpy %.2f ms, save() %.2f ms, copy %.2f ms\n",
                         r, i, copy, stall, ckpt.lastSave().stall_ms);
          }
          check(ckpt.wait(Milliseconds(600000)), "writing");
          const double write = ms(t0, Clock::now());
          barrier();
          std::lock_guard lock(mu);
          memcpy_ms.push_back(copy);
          stall_ms.push_back(stall);
          if (r == 0) write_ms.push_back(write);
        }
      });
      const double dd_s = std::min(ddSeconds(dir, size, ""), ddSeconds(dir, size, "oflag=direct"));
      // Resharded loads: N -> N+1 and N -> N-1 (at least 1).
      double worst_ratio = 0;
      std::string reshard;
      for (int m : {n + 1, std::max(1, n - 1)}) {
        std::atomic<std::uint64_t> read{0}, need{0};
        runThreads(m, [&](int r, collectives::Communicator& comm) {
          Shard shard(rows, r, m, false);
          checkpoint::Checkpointer ckpt(cdir);
          check(ckpt.attach(comm, shard.state), "attach for load");
          auto loaded = ckpt.loadNewest();
          check(loaded.status(), "load");
          read += loaded->bytes_read;
          need += loaded->bytes_needed;
        });
        const double ratio = static_cast<double>(read) / static_cast<double>(need);
        if (ratio > worst_ratio) {
          worst_ratio = ratio;
          reshard = fmt::format("{}->{}", n, m);
        }
      }
      fs::remove_all(cdir);
      const double mc = median(memcpy_ms), st = median(stall_ms), wr = median(write_ms);
      const double write_gbps = static_cast<double>(size) / (wr / 1e3) / 1e9;
      const double dd_gbps = static_cast<double>(size) / dd_s / 1e9;
      std::printf("%10s %5d %10s %10.2f %9.2f %7.3f %9.1f %10.3f %8.3f %8.3f %9s %10.4f\n",
                  formatBytes(size).c_str(), n, formatBytes(size / n).c_str(), mc, st, st / mc, wr,
                  write_gbps, dd_gbps, write_gbps / dd_gbps, reshard.c_str(), worst_ratio);
      std::fflush(stdout);
      worst_stall = std::max(worst_stall, st / mc);
      worst_write = std::min(worst_write, write_gbps / dd_gbps);
      worst_read = std::max(worst_read, worst_ratio);
    }
  }
  std::printf("checkpoint stall_vs_memcpy=%.3f write_vs_dd=%.3f reshard_read_ratio=%.4f\n",
              worst_stall, worst_write, worst_read);
  return 0;
}

}  // namespace rally::bench

int main(int argc, char** argv) { return rally::bench::main(argc, argv); }
