// rally's C++ DDP step time, for bench/ddp/run to set beside PyTorch's Python DDP on the same
// models, batch and data: an MLP and the small GPT of examples/gpt, each step being zero_grad,
// forward, backward (with the gradient allreduce) and an SGD step. Run under rally run:
//
//   rally run --standalone --nproc-per-node 2 build/default/bench/ddp/ddp_bench --model mlp
//
// Prints (rank 0) "model M step_ms X overlap F comm_ms C" with X the median step over --steps
// steps after --warmup.
#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"
#include "examples/gpt/gpt_model.h"
#include "runtime/torch/distributed_data_parallel.h"
#include "runtime/world/world.h"

using namespace rally;            // NOLINT(google-build-using-namespace): a benchmark
using namespace rally::examples;  // NOLINT

struct MlpImpl : ::torch::nn::Module {
  MlpImpl() {
    a = register_module("a", ::torch::nn::Linear(512, 2048));
    b = register_module("b", ::torch::nn::Linear(2048, 2048));
    c = register_module("c", ::torch::nn::Linear(2048, 512));
  }
  ::torch::Tensor forward(const ::torch::Tensor& x) {
    return c(::torch::relu(b(::torch::relu(a(x)))));
  }
  ::torch::nn::Linear a{nullptr}, b{nullptr}, c{nullptr};
};
TORCH_MODULE(Mlp);

int main(int argc, char** argv) {
  std::map<std::string, std::string> opt = {
      {"--model", "mlp"}, {"--steps", "30"},      {"--warmup", "5"},        {"--batch", "32"},
      {"--ddp", "1"},     {"--bucket-view", "0"}, {"--compression", "none"}};
  for (int i = 1; i + 1 < argc; i += 2) opt[argv[i]] = argv[i + 1];
  ::torch::set_num_threads(1);
  auto world = init();
  if (!world.ok()) return std::fprintf(stderr, "%s\n", world.status().toString().c_str()), 1;
  World& w = **world;
  collectives::MemoryBootstrapStore self_store;
  auto tp = collectives::createGlooCommunicator(self_store, {.rank = 0, .size = 1});
  if (!tp.ok()) return 1;
  ::torch::manual_seed(1);
  const std::int64_t batch = std::stoll(opt["--batch"]);
  std::shared_ptr<::torch::nn::Module> module;
  std::function<::torch::Tensor()> loss;
  Config cfg;  // the GPT: vocab 256, context 64, dim 96, 4 heads, 3 layers
  ::torch::Tensor x, y;
  if (opt["--model"] == "mlp") {
    auto m = Mlp();
    module = m.ptr();
    x = ::torch::randn({batch, 512});
    y = ::torch::randn({batch, 512});
    loss = [m, &x, &y]() mutable { return ::torch::mse_loss(m->forward(x), y); };
  } else {
    auto m = Gpt(cfg, parallel::TensorParallelGroup::of(**tp));
    module = m.ptr();
    x = ::torch::randint(0, 256, {batch, cfg.context});
    y = ::torch::randint(0, 256, {batch, cfg.context});
    loss = [m, &x, &y]() mutable { return m->loss(x, y); };
  }
  // --ddp 0: plain local training (no DDP, no gradient allreduce), to measure what DDP adds.
  const bool use_ddp = opt["--ddp"] != "0";
  std::optional<parallel::DistributedDataParallel> ddp;
  // --bucket-view 1: gradients as views of the buckets (DdpOptions::gradient_as_bucket_view).
  // --compression bf16: f32 buckets travel as bf16 with error feedback.
  if (opt["--compression"] != "none" && opt["--compression"] != "bf16") {
    std::fprintf(stderr, "ddp_bench: --compression %s (expected none or bf16)\n",
                 opt["--compression"].c_str());
    return 2;
  }
  if (use_ddp) {
    ddp.emplace(module, w.comm(),
                parallel::DdpOptions{.gradient_as_bucket_view = opt["--bucket-view"] == "1",
                                     .compression = opt["--compression"] == "bf16"
                                                        ? parallel::GradientCompression::kBf16
                                                        : parallel::GradientCompression::kNone});
  }
  ::torch::optim::SGD opt_sgd(module->parameters(), 0.01);
  const int steps = std::stoi(opt["--steps"]), warmup = std::stoi(opt["--warmup"]);
  std::vector<double> times, overlap, comm;
  // RALLY_BENCH_PROFILE=FILE: rank 0 records its timed steps with the autograd profiler and
  // writes a chrome trace to FILE (the step times are then not comparable).
  const char* profile = std::getenv("RALLY_BENCH_PROFILE");
  std::unique_ptr<::torch::autograd::profiler::RecordProfile> recording;
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup && profile != nullptr && w.rank() == 0) {
      recording = std::make_unique<::torch::autograd::profiler::RecordProfile>(profile);
    }
    const auto t0 = std::chrono::steady_clock::now();
    opt_sgd.zero_grad();
    loss().backward();
    if (ddp && !ddp->status().ok()) {
      return std::fprintf(stderr, "%s\n", ddp->status().toString().c_str()), 1;
    }
    opt_sgd.step();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (s >= warmup) {
      times.push_back(ms);
      overlap.push_back(ddp ? ddp->lastStats().overlap_fraction : 0.0);
      comm.push_back(ddp ? ddp->lastStats().comm_ms : 0.0);
    }
  }
  recording.reset();
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  if (w.rank() == 0) {
    std::printf("model %s step_ms %.2f overlap %.3f comm_ms %.2f buckets %d\n",
                opt["--model"].c_str(), median(times), median(overlap), median(comm),
                ddp ? ddp->lastStats().buckets : 0);
  }
  return 0;
}
