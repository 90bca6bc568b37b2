// librally in one small program, without libtorch: least-squares regression by gradient descent on
// generated data, data-parallel (each rank's gradients allreduced), with elastic state, an
// exactly-once sampler and in-place recovery. Run it alone, or under rally run:
//   rally run --standalone --nproc-per-node 4 --recovery in-place build/default/examples/minimal
// Options: --samples N --epochs E --batch B (per rank) --commit-every K --lr X --step-ms MS
//          --out FILE (final weights as hex floats, and every sample's use count).
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "runtime/data/elastic_sampler.h"
#include "runtime/elastic/elastic_run.h"
#include "runtime/rendezvous/grpc_status.h"
#include "runtime/world/world.h"

using namespace rally;  // NOLINT(google-build-using-namespace): an example
using collectives::ReduceOp;

constexpr int kDim = 8;

// Sample i: features from a hash of i, target from fixed true weights plus small noise.
void sample(std::uint64_t i, float* x, float* y) {
  std::uint64_t h = i * 0x9e3779b97f4a7c15ull + 1;
  float t = 0;
  for (int d = 0; d < kDim; ++d) {
    h ^= h >> 31, h *= 0xbf58476d1ce4e5b9ull, h ^= h >> 29;
    x[d] = static_cast<float>(h % 2001) / 1000.0f - 1.0f;
    t += x[d] * static_cast<float>(d + 1) * 0.5f;
  }
  *y = t + static_cast<float>(h % 101) / 5000.0f - 0.01f;
}

int main(int argc, char** argv) {
  // gRPC (librally's coordinator client) cleans up here when main ends, not on a detached thread.
  const rally::rendezvous::GrpcLifetime grpc;
  std::map<std::string, double> opt = {{"--samples", 4096},   {"--epochs", 3}, {"--batch", 16},
                                       {"--commit-every", 5}, {"--lr", 0.05},  {"--step-ms", 0}};
  std::string out;
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i], v = i + 1 < argc ? argv[i + 1] : "";
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (k == "--out" && !v.empty()) {
      out = v;
    } else if (opt.count(k) == 0 || v.empty() || *end != '\0' || x < 0) {
      std::fprintf(stderr,
                   "minimal: bad option '%s %s' (--samples N --epochs E --batch B "
                   "--commit-every K --lr X --step-ms MS --out FILE)\n",
                   k.c_str(), v.c_str());
      return 2;
    } else {
      opt[k] = x;
    }
  }
  const auto samples = static_cast<std::uint64_t>(opt["--samples"]);
  const auto epochs = static_cast<std::uint64_t>(opt["--epochs"]);
  const auto batch = static_cast<std::uint64_t>(opt["--batch"]);
  const auto commit_every =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(opt["--commit-every"]));
  const auto step_ms = static_cast<int>(opt["--step-ms"]);
  const auto lr = static_cast<float>(opt["--lr"]);
  auto world = init();
  if (!world.ok()) return std::fprintf(stderr, "%s\n", world.status().toString().c_str()), 1;
  World& w = **world;

  // The state: weights, the step, the sampler's position, and how often each sample was used.
  std::vector<float> weights(kDim, 0.0f);
  std::vector<std::int32_t> uses(samples, 0);
  std::int64_t step = 0;
  auto sampler_or = ElasticSampler::create({.dataset_size = samples, .seed = 1234});
  if (!sampler_or.ok() || batch == 0) {
    std::fprintf(stderr, "minimal: need --samples and --batch of at least 1\n");
    return 2;
  }
  ElasticSampler& sampler = *sampler_or;
  ElasticState state;
  Status s = state.registerBuffer("weights", weights.data(), DataType::kF32, {kDim});
  if (s.ok())
    s = state.registerBuffer("uses", uses.data(), DataType::kI32, {(std::int64_t)samples});
  if (s.ok()) s = state.registerScalar("step", &step);
  if (s.ok()) s = sampler.attach(state);
  if (!s.ok()) return std::fprintf(stderr, "%s\n", s.toString().c_str()), 1;

  ElasticRun run(w, state);
  std::vector<float> grad(kDim + 2);  // gradient sum, sample count, loss sum
  std::vector<std::int32_t> used(samples);
  s = run.run([&]() -> Status {
    while (sampler.epoch() < epochs) {
      RALLY_RETURN_IF_ERROR(run.atStep(step));
      const auto b = sampler.next(w.rank(), w.size(), batch);
      std::fill(grad.begin(), grad.end(), 0.0f);
      std::fill(used.begin(), used.end(), 0);
      for (std::uint64_t i : b.indices) {
        float x[kDim], y, err = 0;
        sample(i, x, &y);
        for (int d = 0; d < kDim; ++d) err += x[d] * weights[d];
        err -= y;
        for (int d = 0; d < kDim; ++d) grad[d] += 2 * err * x[d];
        grad[kDim] += 1, grad[kDim + 1] += err * err, used[i] += 1;
      }
      auto& comm = w.comm();
      RALLY_RETURN_IF_ERROR(comm.allreduce(grad.data(), grad.size(), DataType::kF32, ReduceOp::kSum)
                                ->wait(Milliseconds(60'000)));
      RALLY_RETURN_IF_ERROR(comm.allreduce(used.data(), used.size(), DataType::kI32, ReduceOp::kSum)
                                ->wait(Milliseconds(60'000)));
      for (int d = 0; d < kDim; ++d) weights[d] -= lr * grad[d] / std::max(grad[kDim], 1.0f);
      for (std::uint64_t i = 0; i < samples; ++i) uses[i] += used[i];
      if (step_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(step_ms));
      ++step;
      if (w.rank() == 0 && step % 10 == 0) {
        std::printf("step %lld epoch %llu loss %.6f world %d generation %llu\n", (long long)step,
                    (unsigned long long)sampler.epoch(), grad[kDim + 1] / grad[kDim], w.size(),
                    (unsigned long long)w.generation());
        std::fflush(stdout);
      }
      if (b.epoch_finished) sampler.startEpoch(sampler.epoch() + 1);
      if (step % commit_every == 0 || b.epoch_finished) {
        RALLY_RETURN_IF_ERROR(run.commit());
      }
    }
    return okStatus();
  });
  if (!s.ok()) return std::fprintf(stderr, "rank %d: %s\n", w.rank(), s.toString().c_str()), 1;
  if (w.rank() == 0) {
    std::string text = "weights";
    for (float v : weights) text += fmt::format(" {:a}", v);
    std::int64_t min_use = INT32_MAX, max_use = 0;
    for (std::int32_t u : uses)
      min_use = std::min<std::int64_t>(min_use, u), max_use = std::max<std::int64_t>(max_use, u);
    text += fmt::format("\nsteps {} recoveries {} world {} uses_min {} uses_max {}\n", step,
                        run.recoveries(), w.size(), min_use, max_use);
    std::printf("%s", text.c_str());
    if (!out.empty()) {
      if (FILE* f = std::fopen(out.c_str(), "w")) std::fputs(text.c_str(), f), std::fclose(f);
    }
  }
  return 0;
}
