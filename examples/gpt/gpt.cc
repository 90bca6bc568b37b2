// A small decoder-only transformer (byte-level tokens) trained data-parallel with librally: DDP
// over the world, its parameters and AdamW moments in an ElasticState (commits in memory, in-place
// recovery, checkpoints with RALLY_CHECKPOINT_DIR), an exactly-once sampler over the corpus, and
// rally's AdamW kernel. The corpus is text already on this machine: every Markdown file under
// --data (the project's docs by default), read in name order.
//
//   rally run --standalone --nproc-per-node 4 --recovery in-place build/default/examples/gpt
//
// trains on docs/ for 300 steps (--steps).
//
// One line per --log-every steps on rank 0: step, loss, tokens/s, world size, generation; at the
// end a sample of generated text. Options: --data DIR --steps N --batch B (sequences per rank)
// --context T --layers L --dim D --heads H --lr X --commit-every K --seed S --sample-bytes N
// --temperature X (of the sample; 0: greedy) --tp N (tensor-parallel degree: the world is a
// DP x TP grid; see docs/torch.md) --nan-at-step N (for tests: world rank 0's loss at step N is
// NaN).
//
// A step whose averaged gradients are not all finite (NaN or Inf, as DDP's fused scale-and-check
// reports) is skipped on every rank, as a mixed-precision loss scaler would: the weights and the
// moments stay as they were, a line says so, and the final line counts such steps.
#include <fmt/format.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "collectives/memory_bootstrap_store.h"
#include "examples/gpt/gpt_model.h"
#include "kernels/ops/kernels.h"
#include "runtime/data/elastic_sampler.h"
#include "runtime/elastic/elastic_run.h"
#include "runtime/rendezvous/grpc_status.h"
#include "runtime/torch/distributed_data_parallel.h"
#include "runtime/torch/tensor_parallel.h"
#include "runtime/torch/torch_state.h"
#include "runtime/world/world.h"

using namespace rally;            // NOLINT(google-build-using-namespace): an example
using namespace rally::examples;  // NOLINT

std::string readCorpus(const std::string& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir, ec)) {
    if (e.is_regular_file() && e.path().extension() == ".md") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    text.append(std::istreambuf_iterator<char>(in), {});
    text += "\n";
  }
  return text;
}

int main(int argc, char** argv) {
  // gRPC (librally's coordinator client) cleans up here when main ends, not on a detached thread.
  const rally::rendezvous::GrpcLifetime grpc;
  std::map<std::string, std::string> opt = {
      {"--data", "docs"},       {"--steps", "300"},    {"--batch", "8"},
      {"--context", "64"},      {"--layers", "3"},     {"--dim", "96"},
      {"--heads", "4"},         {"--lr", "3e-3"},      {"--commit-every", "10"},
      {"--seed", "1234"},       {"--log-every", "10"}, {"--sample-bytes", "200"},
      {"--temperature", "0.8"}, {"--step-ms", "0"},    {"--tp", "1"},
      {"--nan-at-step", "-1"}};
  for (int i = 1; i < argc; i += 2) {
    if (opt.count(argv[i]) == 0 || i + 1 >= argc) {
      std::fprintf(stderr, "gpt: bad option '%s' (see the comment at the top of gpt.cc)\n",
                   argv[i]);
      return 2;
    }
    opt[argv[i]] = argv[i + 1];
  }
  auto num = [&](const char* k) { return std::stoll(opt[k]); };
  char* end = nullptr;
  const double temperature = std::strtod(opt["--temperature"].c_str(), &end);
  if (end == opt["--temperature"].c_str() || *end != '\0' || !(temperature >= 0)) {
    std::fprintf(stderr, "gpt: --temperature '%s' is not a number >= 0 (0: greedy)\n",
                 opt["--temperature"].c_str());
    return 2;
  }
  ::torch::set_num_threads(1);
  const std::string text = readCorpus(opt["--data"]);
  Config cfg;
  cfg.context = num("--context");
  cfg.dim = num("--dim");
  cfg.heads = num("--heads");
  cfg.layers = num("--layers");
  const std::int64_t windows = (static_cast<std::int64_t>(text.size()) - 1) / cfg.context;
  if (windows < 16 || cfg.dim % cfg.heads != 0) {
    std::fprintf(stderr,
                 "gpt: need at least %lld bytes of *.md text under %s (found %zu), and "
                 "--dim divisible by --heads\n",
                 static_cast<long long>(16 * cfg.context + 1), opt["--data"].c_str(), text.size());
    return 2;
  }
  auto world = init();
  if (!world.ok()) return std::fprintf(stderr, "%s\n", world.status().toString().c_str()), 1;
  World& w = **world;
  // Tensor parallelism: groups of --tp consecutive ranks; the layers' slices are fixed by the place
  // in the group, the communicator is ElasticRun's (set again after each recovery).
  const int tp = static_cast<int>(num("--tp"));
  if (tp < 1 || w.size() % tp != 0 || cfg.heads % tp != 0) {
    std::fprintf(stderr, "gpt: --tp %d must divide the world size %d and --heads %lld\n", tp,
                 w.size(), static_cast<long long>(cfg.heads));
    return 2;
  }
  auto group = std::make_shared<parallel::TensorParallelGroup>(
      parallel::TensorParallelGroup{tp, w.rank() % tp, nullptr});

  // The same full model on every rank, each keeping its slices (ElasticRun syncs replicas).
  ::torch::manual_seed(num("--seed"));
  Gpt model(cfg, group);
  // State: the model, AdamW's moments, the step, the sampler.
  ElasticState state;
  std::vector<::torch::Tensor> params, m, v;
  Status s = parallel::registerModule(state, *model);
  // The moments are sliced as their parameter is (a TP shard's moments are that shard's).
  const auto shardings = parallel::parameterShardings(*model);
  for (const auto& p : model->named_parameters()) {
    params.push_back(p.value());
    m.push_back(::torch::zeros_like(p.value()));
    v.push_back(::torch::zeros_like(p.value()));
    const std::optional<Sharding>& shard = shardings.at(p.key());
    if (s.ok()) s = parallel::registerTensor(state, "adam.m." + p.key(), m.back(), shard);
    if (s.ok()) s = parallel::registerTensor(state, "adam.v." + p.key(), v.back(), shard);
  }
  std::int64_t step = 0;
  std::int64_t skipped = 0;  // steps with non-finite gradients, not applied
  auto sampler = ElasticSampler::create({.dataset_size = static_cast<std::uint64_t>(windows),
                                         .seed = static_cast<std::uint64_t>(num("--seed"))});
  if (s.ok()) s = state.registerScalar("step", &step);
  if (s.ok()) s = state.registerScalar("skipped", &skipped);
  if (s.ok() && sampler.ok()) s = sampler->attach(state);
  if (!s.ok() || !sampler.ok()) {
    std::fprintf(stderr, "%s\n", (!s.ok() ? s : sampler.status()).toString().c_str());
    return 1;
  }
  auto adamw = kernels::cpuKernels();
  ElasticRun run(w, state, {.tp_size = tp});
  const std::int64_t steps = num("--steps"), batch = num("--batch");
  const float lr = std::stof(opt["--lr"]);
  auto t0 = std::chrono::steady_clock::now();
  s = run.run([&]() -> Status {
    // Per (re)formed world: this generation's TP group, and DDP over the data-parallel replicas.
    group->comm = &run.tp();
    parallel::DistributedDataParallel ddp(
        model.ptr(), run.dp(), {.broadcast_at_start = false, .gradient_as_bucket_view = true});
    while (step < steps) {
      RALLY_RETURN_IF_ERROR(run.atStep(step));
      // The TP ranks of a group train on the same sequences.
      auto b = sampler->next(run.dp().rank(), run.dp().size(), static_cast<std::uint64_t>(batch));
      if (b.epoch_finished) sampler->startEpoch(sampler->epoch() + 1);
      std::vector<std::int64_t> in, out;
      for (std::uint64_t i : b.indices) {
        const auto at = static_cast<std::size_t>(i) * static_cast<std::size_t>(cfg.context);
        for (std::int64_t t = 0; t < cfg.context; ++t) {
          in.push_back(static_cast<unsigned char>(text[at + t]));
          out.push_back(static_cast<unsigned char>(text[at + t + 1]));
        }
      }
      const auto rows = static_cast<std::int64_t>(b.indices.size());
      auto x = ::torch::tensor(in).view({rows, cfg.context});
      auto y = ::torch::tensor(out).view({rows, cfg.context});
      for (auto& p : params) p.mutable_grad() = ::torch::Tensor();
      auto loss = model->loss(x, y);
      if (step + 1 == num("--nan-at-step") && w.rank() == 0) {  // step N as the log numbers it
        loss = loss * std::numeric_limits<float>::quiet_NaN();
      }
      loss.backward();
      RALLY_RETURN_IF_ERROR(ddp.status());
      // The loss averaged over the world, for the log line, and whether any rank's averaged
      // gradients were not finite (DDP's check covers its replicas; with TP the groups must agree).
      float stats[2] = {loss.item<float>(), ddp.gradientsFinite() ? 0.0f : 1.0f};
      RALLY_RETURN_IF_ERROR(w.comm()
                                .allreduce(stats, 2, DataType::kF32, collectives::ReduceOp::kAvg)
                                ->wait(Milliseconds(60'000)));
      const float l = stats[0];
      if (stats[1] != 0.0f) {
        ++skipped;
        ++step;
        if (w.rank() == 0) {
          std::printf(
              "step %lld: non-finite gradients (NaN or Inf); skipped, the weights unchanged\n",
              static_cast<long long>(step));
          std::fflush(stdout);
        }
        if (step % num("--commit-every") == 0) {
          RALLY_RETURN_IF_ERROR(run.commit());
        }
        continue;
      }
      std::vector<kernels::AdamWTensor> ts;
      for (size_t i = 0; i < params.size(); ++i) {
        ts.push_back({params[i].data_ptr<float>(), params[i].grad().data_ptr<float>(),
                      m[i].data_ptr<float>(), v[i].data_ptr<float>(), nullptr,
                      static_cast<size_t>(params[i].numel())});
      }
      RALLY_RETURN_IF_ERROR(adamw->adamw(ts, {.lr = lr, .weight_decay = 0.01f, .step = step + 1}));
      if (num("--step-ms") > 0)
        std::this_thread::sleep_for(std::chrono::milliseconds(num("--step-ms")));
      ++step;
      if (w.rank() == 0 && step % num("--log-every") == 0) {
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf(
            "step %lld loss %.4f tokens/s %.0f world %d generation %llu\n",
            static_cast<long long>(step), l,
            static_cast<double>(num("--log-every") * batch * cfg.context * (w.size() / tp)) / secs,
            w.size(), static_cast<unsigned long long>(w.generation()));
        std::fflush(stdout);
        t0 = std::chrono::steady_clock::now();
      }
      if (step % num("--commit-every") == 0) {
        RALLY_RETURN_IF_ERROR(run.commit());
      }
    }
    return okStatus();
  });
  if (!s.ok()) return std::fprintf(stderr, "rank %d: %s\n", w.rank(), s.toString().c_str()), 1;
  // A sample: a continuation of a prompt (--temperature; 0: the likeliest byte each time), by
  // world rank 0's TP group (with
  // TP > 1 the forward pass is collective within the group, and the logits are gathered from
  // the vocabulary slices; TP rank 0 draws each byte and the group follows it).
  if (w.rank() / tp == 0) {
    ::torch::NoGradGuard g;
    ::torch::manual_seed(num("--seed"));
    group->comm = &run.tp();
    const size_t at = text.find("\n## ");
    std::string sample = text.substr(at == std::string::npos ? 0 : at + 1, 16);
    for (std::int64_t i = 0; i < num("--sample-bytes"); ++i) {
      const std::string ctx = sample.substr(sample.size() > static_cast<size_t>(cfg.context)
                                                ? sample.size() - static_cast<size_t>(cfg.context)
                                                : 0);
      std::vector<std::int64_t> ids;
      for (unsigned char ch : ctx) ids.push_back(ch);
      ::torch::Tensor next;
      try {
        auto logits = model->forward(::torch::tensor(ids).view({1, -1}));
        auto full = parallel::gatherFromTensorParallel(logits[0][-1], cfg.vocab, *group);
        next = temperature > 0 ? ::torch::multinomial(::torch::softmax(full / temperature, -1), 1)
                               : full.argmax(-1, /*keepdim=*/true);
        if (tp > 1) {
          const Status b = run.tp()
                               .broadcast(next.data_ptr(), 1, collectives::DataType::kI64, 0)
                               ->wait(Milliseconds(60'000));
          if (!b.ok()) throw collectives::CollectiveError(b);
        }
      } catch (const std::exception& e) {  // a collective's failure, or a bad argument
        std::fprintf(stderr, "rank %d: no sample: %s\n", w.rank(), e.what());
        return 1;
      }
      sample += static_cast<char>(next.item<std::int64_t>());
    }
    if (w.rank() == 0) {
      std::printf("steps %lld recoveries %d world %d skipped %lld\nsample:\n%s\n",
                  static_cast<long long>(step), run.recoveries(), w.size(),
                  static_cast<long long>(skipped), sample.c_str());
    }
  }
  return 0;
}
