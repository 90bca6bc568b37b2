// Collectives benchmark in the manner of nccl-tests: for each size from --min to --max bytes
// (doubling), the time per operation (the median of 5 timed rounds), algorithm bandwidth (bytes /
// time) and bus bandwidth (algbw x the operation's factor, comparable across rank counts), and a
// correctness check (the number of wrong elements on any rank). Ranks are processes forked by this
// program, bootstrapped through a directory of files.
//
//   collectives_bench --backend gloo --ranks 2 [--op allreduce|reduce_scatter|allgather|
//                     broadcast|alltoall|all] [--min 4B] [--max 256MiB] [--transport shm|tcp]
//                     [--no-check-calls] [--record]
//   mpirun -n 2 collectives_bench --backend mpi-raw      (Open MPI's own MPI_Allreduce, baseline)
//
// Output: one line per size, "size count type op time_us algbw_GBps busbw_GBps wrong".
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "collectives/communicator.h"
#include "collectives/recorder.h"
#include "kernels/base/units.h"
#include "rally/config.h"
#if RALLY_HAVE_GLOO
#include "collectives/gloo/gloo_communicator.h"
#endif
#if RALLY_HAVE_MPI
#include <mpi.h>
#endif

namespace rally::bench {
namespace {

using collectives::Communicator;
using collectives::DataType;
using collectives::ReduceOp;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string backend = "gloo";
  std::string op = "allreduce";
  std::string transport = "shm";
  int ranks = 2;
  size_t min_bytes = 4;
  size_t max_bytes = 256u << 20;
  bool check_calls = true;
  bool record = false;  // through collectives::recordCollectives
};

constexpr const char* kUsage =
    "usage: collectives_bench [--backend gloo|mpi-raw] [--ranks N] [--op allreduce|"
    "reduce_scatter|allgather|broadcast|alltoall|all] [--min BYTES] [--max BYTES] "
    "[--transport shm|tcp] [--no-check-calls] [--record]\n"
    "  BYTES takes units: 4B, 64KiB, 256MiB. Sizes double from --min to --max; each line is the\n"
    "  time per operation (5 rounds, each timed on its slowest rank; the median round), algbw and\n"
    "  busbw (as nccl-tests), and wrong elements after a check.\n"
    "  mpi-raw is Open MPI's own MPI_Allreduce: run it under mpirun (--ranks is then ignored).\n";

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "collectives_bench: " << problem << "\n" << kUsage;
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    auto bytes = [&](const std::string& v) {
      auto b = parseBytes(v);
      if (!b.ok()) usage(fmt::format("{} {}: {}", k, v, b.status().message()));
      return static_cast<size_t>(*b);
    };
    if (k == "--help" || k == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (k == "--backend") {
      a.backend = value();
    } else if (k == "--op") {
      a.op = value();
    } else if (k == "--transport") {
      a.transport = value();
      if (a.transport != "shm" && a.transport != "tcp") usage("--transport is shm or tcp");
    } else if (k == "--ranks") {
      a.ranks = std::atoi(value().c_str());
      if (a.ranks < 1 || a.ranks > 64) usage("--ranks must be 1 to 64");
    } else if (k == "--min") {
      a.min_bytes = bytes(value());
    } else if (k == "--max") {
      a.max_bytes = bytes(value());
    } else if (k == "--record") {
      a.record = true;
    } else if (k == "--no-check-calls") {
      a.check_calls = false;
    } else {
      usage("unknown argument " + k);
    }
  }
  if (a.min_bytes < 4 || a.max_bytes < a.min_bytes) usage("need 4 <= --min <= --max");
  return a;
}

// A BootstrapStore over a directory shared by the rank processes.
class FileStore : public collectives::BootstrapStore {
 public:
  explicit FileStore(std::filesystem::path dir) : dir_(std::move(dir)) {}
  Status set(const std::string& key, const std::string& value) override {
    const auto path = file(key);
    const auto tmp = path.string() + ".tmp" + std::to_string(::getpid());
    {
      std::ofstream out(tmp, std::ios::binary);
      out << value;
    }
    std::filesystem::rename(tmp, path);
    return okStatus();
  }
  Result<std::string> get(const std::string& key) override {
    std::ifstream in(file(key), std::ios::binary);
    if (!in) return notFound(key);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  Status wait(const std::vector<std::string>& keys, Milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      bool all = true;
      for (const auto& k : keys) all = all && std::filesystem::exists(file(k));
      if (all) return okStatus();
      if (Clock::now() > deadline) return timeoutError("bootstrap keys never appeared");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

 private:
  std::filesystem::path file(const std::string& key) const {
    std::string name = key;
    std::replace(name.begin(), name.end(), '/', '_');
    return dir_ / name;
  }
  std::filesystem::path dir_;
};

// What one operation does, in nccl-tests' terms: `bytes` is the size reported (for allgather and
// reduce-scatter the whole gathered buffer, as nccl-tests does), the bus factor makes bandwidths
// comparable across rank counts.
struct OpShape {
  size_t count;       // elements per call argument
  size_t in_elems;    // input buffer elements
  size_t out_elems;   // output buffer elements
  double bus_factor;  // busbw = algbw * bus_factor
};

OpShape shapeOf(const std::string& op, size_t bytes, int n) {
  const size_t elems = bytes / 4;
  const double nn = n;
  if (op == "allreduce") return {elems, elems, elems, 2 * (nn - 1) / nn};
  if (op == "broadcast") return {elems, elems, elems, 1};
  const size_t per = elems / static_cast<size_t>(n);
  if (op == "reduce_scatter") return {per, per * n, per, (nn - 1) / nn};
  if (op == "allgather") return {per, per, per * n, (nn - 1) / nn};
  return {per, per * n, per * n, (nn - 1) / nn};  // alltoall
}

// Runs `op` once on `comm`.
Status runOnce(Communicator& comm, const std::string& op, const OpShape& s, float* in, float* out) {
  std::shared_ptr<collectives::Work> w;
  if (op == "allreduce") {
    w = comm.allreduce(in, s.count, DataType::kF32, ReduceOp::kSum);
  } else if (op == "broadcast") {
    w = comm.broadcast(in, s.count, DataType::kF32, 0);
  } else if (op == "reduce_scatter") {
    w = comm.reduceScatter(in, out, s.count, DataType::kF32, ReduceOp::kSum);
  } else if (op == "allgather") {
    w = comm.allgather(in, out, s.count, DataType::kF32);
  } else {
    w = comm.alltoall(in, out, s.count, DataType::kF32);
  }
  return w->wait(Milliseconds(600'000));
}

// Fills inputs with small integers (exact in f32), runs once and counts wrong elements.
size_t check(Communicator& comm, const std::string& op, const OpShape& s, std::vector<float>& in,
             std::vector<float>& out) {
  const int r = comm.rank(), n = comm.size();
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>((r * 7 + i) % 11);
  if (!runOnce(comm, op, s, in.data(), out.data()).ok()) return s.out_elems + s.in_elems;
  size_t wrong = 0;
  auto input = [&](int rank, size_t i) { return static_cast<float>((rank * 7 + i) % 11); };
  if (op == "allreduce") {
    for (size_t i = 0; i < s.count; ++i) {
      float want = 0;
      for (int q = 0; q < n; ++q) want += input(q, i);
      wrong += in[i] != want;
    }
  } else if (op == "broadcast") {
    for (size_t i = 0; i < s.count; ++i) wrong += in[i] != input(0, i);
  } else if (op == "reduce_scatter") {
    for (size_t i = 0; i < s.count; ++i) {
      float want = 0;
      for (int q = 0; q < n; ++q) want += input(q, r * s.count + i);
      wrong += out[i] != want;
    }
  } else if (op == "allgather") {
    for (int q = 0; q < n; ++q) {
      for (size_t i = 0; i < s.count; ++i) wrong += out[q * s.count + i] != input(q, i);
    }
  } else {
    for (int q = 0; q < n; ++q) {
      for (size_t i = 0; i < s.count; ++i) {
        wrong += out[q * s.count + i] != input(q, r * s.count + i);
      }
    }
  }
  return wrong;
}

// Each size is timed in kRounds rounds, each ~0.04 s of work at a few GB/s (between 1 and 200
// iterations); a round's time is its slowest rank's, and the line shows the median round, so one
// round disturbed by another process on the machine does not move the result.
constexpr int kRounds = 5;

int iterationsPerRound(size_t bytes) {
  return static_cast<int>(std::clamp<size_t>((100u << 20) / std::max<size_t>(bytes, 1), 1, 200));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double maxOver(Communicator& comm, double v) {
  (void)comm.allreduce(&v, 1, DataType::kF64, ReduceOp::kMax)->wait(Milliseconds(600'000));
  return v;
}

int benchRank(Communicator& comm, const Args& a, const std::vector<std::string>& ops) {
  const int n = comm.size();
  for (const auto& op : ops) {
    if (comm.rank() == 0) {
      std::cout << fmt::format(
                       "# backend={} ranks={} op={} transport={} check_calls={} record={}\n",
                       a.backend, n, op, a.transport, a.check_calls, a.record)
                << fmt::format("{:>12} {:>10} {:>5} {:>5} {:>11} {:>8} {:>8} {:>6}\n", "size",
                               "count", "type", "redop", "time_us", "algbw", "busbw", "wrong")
                << std::flush;
    }
    for (size_t bytes = a.min_bytes; bytes <= a.max_bytes; bytes *= 2) {
      const OpShape s = shapeOf(op, bytes, n);
      const size_t reported =
          (op == "allreduce" || op == "broadcast") ? s.count * 4 : s.count * 4 * n;
      std::vector<float> in(std::max<size_t>(s.in_elems, 1)), out(std::max<size_t>(s.out_elems, 1));
      std::fill(in.begin(), in.end(), 1.0f);
      const int iters = iterationsPerRound(bytes);
      for (int i = 0; i < 3; ++i) (void)runOnce(comm, op, s, in.data(), out.data());
      std::vector<double> rounds(kRounds);
      for (double& round_us : rounds) {
        (void)comm.barrier()->wait(Milliseconds(600'000));
        const auto t0 = Clock::now();
        for (int i = 0; i < iters; ++i) {
          const Status st = runOnce(comm, op, s, in.data(), out.data());
          if (!st.ok()) {
            std::cerr << "rank " << comm.rank() << ": " << st.toString() << "\n";
            return 1;
          }
        }
        round_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
      }
      (void)comm.allreduce(rounds.data(), rounds.size(), DataType::kF64, ReduceOp::kMax)
          ->wait(Milliseconds(600'000));
      const double worst_us = median(rounds);
      const double wrong = maxOver(comm, static_cast<double>(check(comm, op, s, in, out)));
      if (comm.rank() == 0) {
        const double algbw = reported / worst_us / 1e3;  // GB/s
        std::cout << fmt::format("{:>12} {:>10} {:>5} {:>5} {:>11.2f} {:>8.3f} {:>8.3f} {:>6}\n",
                                 reported, s.count, "float", op == "allreduce" ? "sum" : "-",
                                 worst_us, algbw, algbw * s.bus_factor,
                                 static_cast<long long>(wrong))
                  << std::flush;
      }
    }
  }
  return 0;
}

std::vector<std::string> opsOf(const Args& a) {
  if (a.op == "all") return {"allreduce", "reduce_scatter", "allgather", "broadcast", "alltoall"};
  for (const char* o : {"allreduce", "reduce_scatter", "allgather", "broadcast", "alltoall"}) {
    if (a.op == o) return {a.op};
  }
  usage("unknown --op " + a.op);
}

#if RALLY_HAVE_GLOO
int runGloo(const Args& a) {
  const auto dir = std::filesystem::temp_directory_path() /
                   fmt::format("rally-collectives-bench-{}", ::getpid());
  std::filesystem::create_directories(dir);
  std::vector<pid_t> children;
  for (int r = 0; r < a.ranks; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      FileStore store(dir);
      auto comm =
          collectives::createGlooCommunicator(store, {.rank = r,
                                                      .size = a.ranks,
                                                      .generation = 1,
                                                      .op_timeout = Milliseconds(600'000),
                                                      .check_calls = a.check_calls,
                                                      .shared_memory = a.transport == "shm"});
      if (!comm.ok()) {
        std::cerr << "rank " << r << ": " << comm.status().toString() << "\n";
        std::_Exit(1);
      }
      if (r == 0 && a.transport == "shm" && !collectives::usesSharedMemory(**comm)) {
        std::cerr << "note: shared memory was refused; running over TCP\n";
      }
      // --record: through the flight recorder, as rally::World's communicators are (its cost).
      std::unique_ptr<Communicator> c = std::move(*comm);
      if (a.record) {
        c = collectives::recordCollectives(
            std::move(c), std::make_shared<collectives::CollectiveRecorder>(2000), "world");
      }
      std::_Exit(benchRank(*c, a, opsOf(a)));
    }
    children.push_back(pid);
  }
  int rc = 0;
  for (pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
  }
  std::filesystem::remove_all(dir);
  return rc;
}
#endif

#if RALLY_HAVE_MPI
// Open MPI's MPI_Allreduce on the same sizes (run under mpirun): the baseline.
int runMpiRaw(const Args& a) {
  MPI_Init(nullptr, nullptr);
  int rank = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  if (n == 1) {
    std::cerr << "note: mpi-raw has one rank (start it under mpirun -n N to compare with N)\n";
  }
  if (rank == 0) {
    std::cout << fmt::format("# backend=mpi-raw ranks={} op=allreduce\n", n)
              << fmt::format("{:>12} {:>10} {:>5} {:>5} {:>11} {:>8} {:>8} {:>6}\n", "size",
                             "count", "type", "redop", "time_us", "algbw", "busbw", "wrong");
  }
  for (size_t bytes = a.min_bytes; bytes <= a.max_bytes; bytes *= 2) {
    const size_t count = bytes / 4;
    std::vector<float> in(count, 1.0f), out(count);
    const int iters = iterationsPerRound(bytes);
    for (int i = 0; i < 3; ++i) {
      MPI_Allreduce(in.data(), out.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    }
    std::vector<double> rounds(kRounds), slowest(kRounds);
    for (double& round_us : rounds) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) {
        MPI_Allreduce(MPI_IN_PLACE, in.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                      MPI_COMM_WORLD);
      }
      round_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
    }
    MPI_Allreduce(rounds.data(), slowest.data(), kRounds, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    const double worst = median(slowest);
    for (size_t i = 0; i < count; ++i) in[i] = static_cast<float>((rank * 7 + i) % 11);
    MPI_Allreduce(MPI_IN_PLACE, in.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                  MPI_COMM_WORLD);
    long long wrong = 0;
    for (size_t i = 0; i < count; ++i) {
      float want = 0;
      for (int q = 0; q < n; ++q) want += static_cast<float>((q * 7 + i) % 11);
      wrong += in[i] != want;
    }
    long long worst_wrong = 0;
    MPI_Allreduce(&wrong, &worst_wrong, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0) {
      const double algbw = static_cast<double>(bytes) / worst / 1e3;
      std::cout << fmt::format("{:>12} {:>10} {:>5} {:>5} {:>11.2f} {:>8.3f} {:>8.3f} {:>6}\n",
                               bytes, count, "float", "sum", worst, algbw, algbw * 2 * (n - 1) / n,
                               worst_wrong)
                << std::flush;
    }
  }
  MPI_Finalize();
  return 0;
}
#endif

}  // namespace
}  // namespace rally::bench

int main(int argc, char** argv) {
  using namespace rally::bench;
  const Args a = parse(argc, argv);
#if RALLY_HAVE_MPI
  if (a.backend == "mpi-raw") return runMpiRaw(a);
#endif
#if RALLY_HAVE_GLOO
  if (a.backend == "gloo") return runGloo(a);
#endif
  usage("backend " + a.backend + " is not built here (gloo needs libgloo-dev, mpi-raw Open MPI)");
}
