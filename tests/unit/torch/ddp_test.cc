// DistributedDataParallel over a Gloo communicator (ranks as threads): parameters start as rank
// 0's; after k SGD steps on half a batch each, they equal single-process training on the whole
// batch (within 1e-6: the averaged sums round differently from one big backward pass); bucket
// sizes (one bucket, or one per parameter) give bitwise-identical results, and small buckets
// overlap communication with the backward pass; find_unused_parameters with ranks using different
// branches; an unused parameter without it is an error naming it; no_sync accumulates locally and
// the next pass averages the sum; gradient_as_bucket_view; the averaging pass's NaN check (f32,
// f64, f16, bf16, with and without compression), loss-scale division and f64 precision; bf16
// compression with error feedback; parameters on two devices refused; a model it cannot average
// refused on every rank without a broadcast; a second gradient for a parameter in one pass (a
// backward inside the backward) an error naming it, and a pass whose gradients all come from
// backward passes inside the backward averaged once (a pass in which one got none ends at
// status()).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>

#include "runtime/torch/distributed_data_parallel.h"
#include "tests/unit/collectives/gloo_ranks.h"

namespace rally::parallel {
namespace {

struct MlpImpl : ::torch::nn::Module {
  MlpImpl() {
    fc1 = register_module("fc1", ::torch::nn::Linear(8, 32));
    fc2 = register_module("fc2", ::torch::nn::Linear(32, 32));
    fc3 = register_module("fc3", ::torch::nn::Linear(32, 4));
    left = register_module("left", ::torch::nn::Linear(4, 1));
    right = register_module("right", ::torch::nn::Linear(4, 1));
  }
  // branch: 0 both heads, 1 left only, 2 right only.
  ::torch::Tensor forward(const ::torch::Tensor& x, int branch = 0) {
    auto h = fc3(::torch::relu(fc2(::torch::relu(fc1(x)))));
    if (branch == 1) return left(h);
    if (branch == 2) return right(h);
    return left(h) + right(h);
  }
  ::torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr}, left{nullptr}, right{nullptr};
};
TORCH_MODULE(Mlp);

void runRanks(int n, const std::function<void(int, collectives::Communicator&)>& body) {
  collectives::test_support::runGlooRanks(n, [&](int r, collectives::Communicator& comm) {
    ::torch::set_num_threads(1);
    body(r, comm);
  });
}

// torch's random generator is one per process: data and initial weights are made on the main
// thread, before the rank threads start.
std::pair<::torch::Tensor, ::torch::Tensor> batch(int step) {
  static std::mutex mu;
  static std::vector<std::pair<::torch::Tensor, ::torch::Tensor>> made;
  std::lock_guard lock(mu);
  while (static_cast<int>(made.size()) <= step) {
    ::torch::manual_seed(1000 + static_cast<int>(made.size()));
    made.emplace_back(::torch::randn({16, 8}), ::torch::randn({16, 1}));
  }
  return made[static_cast<size_t>(step)];
}

// Rank r's model, initialised from seed 7 + 100 r (rank 0's is the reference's).
std::vector<std::shared_ptr<MlpImpl>> models(int n, bool same = false) {
  for (int s = 0; s < 8; ++s) (void)batch(s);
  std::vector<std::shared_ptr<MlpImpl>> out;
  for (int r = 0; r < n; ++r) {
    ::torch::manual_seed(same ? 7 : 7 + 100 * r);
    out.push_back(std::make_shared<MlpImpl>());
  }
  return out;
}

std::vector<::torch::Tensor> snapshot(const Mlp& m) {
  std::vector<::torch::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

// k steps of SGD on the whole batch in one process.
std::vector<::torch::Tensor> reference(int steps) {
  Mlp m(models(1).front());  // rank 0's initialisation
  ::torch::optim::SGD opt(m->parameters(), 0.1);
  for (int s = 0; s < steps; ++s) {
    auto [x, y] = batch(s);
    opt.zero_grad();
    ::torch::mse_loss(m->forward(x), y).backward();
    opt.step();
  }
  return snapshot(m);
}

// The same with `n` ranks, each on its slice of every batch (the loss times `loss_scale`, which
// DDP is told to divide out).
std::vector<std::vector<::torch::Tensor>> distributed(int n, int steps, DdpOptions options,
                                                      std::vector<double>* overlap = nullptr,
                                                      float loss_scale = 1.0f) {
  std::vector<std::vector<::torch::Tensor>> result(n);
  std::mutex mu;
  auto nets = models(n);  // different on each rank: DDP must broadcast rank 0's
  runRanks(n, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    DistributedDataParallel ddp(m, comm, options);
    ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
    ASSERT_TRUE(ddp.setLossScale(loss_scale).ok());
    ::torch::optim::SGD opt(m->parameters(), 0.1);
    for (int s = 0; s < steps; ++s) {
      auto [x, y] = batch(s);
      const int64_t per = 16 / n;
      opt.zero_grad();
      (::torch::mse_loss(m->forward(x.narrow(0, r * per, per)), y.narrow(0, r * per, per)) *
       loss_scale)
          .backward();
      ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
      ASSERT_TRUE(ddp.gradientsFinite());
      opt.step();
    }
    std::lock_guard lock(mu);
    result[r] = snapshot(Mlp(m));
    if (overlap != nullptr && r == 0) overlap->push_back(ddp.lastStats().overlap_fraction);
  });
  return result;
}

TEST(DistributedDataParallel, EqualsSingleProcessTrainingOnTheWholeBatch) {
  const auto want = reference(4);
  for (int n : {2, 4}) {
    const auto got = distributed(n, 4, {});
    for (int r = 0; r < n; ++r) {
      ASSERT_EQ(got[r].size(), want.size());
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_TRUE(::torch::allclose(got[r][i], want[i], 1e-6, 1e-6))
            << n << " ranks, rank " << r << ", parameter " << i << ": max difference "
            << (got[r][i] - want[i]).abs().max().item<float>();
        EXPECT_TRUE(::torch::equal(got[r][i], got[0][i])) << "ranks disagree";
      }
    }
  }
}

TEST(DistributedDataParallel, BucketSizesDoNotChangeResultsAndSmallBucketsOverlap) {
  std::vector<double> overlap;
  const auto one = distributed(2, 3, {.bucket_bytes = 1u << 30});
  const auto many = distributed(2, 3, {.bucket_bytes = 64}, &overlap);  // one per parameter
  for (size_t i = 0; i < one[0].size(); ++i) {
    EXPECT_TRUE(::torch::equal(one[0][i], many[0][i])) << "parameter " << i;
  }
  ASSERT_EQ(overlap.size(), 1u);
  EXPECT_GT(overlap[0], 0.0) << "no bucket was reduced before backward ended";
}

// Rank 0 uses the left head, rank 1 the right: each head's gradient is half its user's.
void expectUnusedParametersContributeZeros(DdpOptions options) {
  auto nets = models(2, /*same=*/true), locals = models(2, /*same=*/true);
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    DistributedDataParallel ddp(m, comm, options);
    auto [x, y] = batch(0);
    ::torch::mse_loss(m->forward(x, r + 1), y).backward();
    ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
    auto local = locals[r];
    ::torch::mse_loss(local->forward(x, r + 1), y).backward();
    const auto& used = r == 0 ? m->left : m->right;
    const auto& used_local = r == 0 ? local->left : local->right;
    EXPECT_TRUE(::torch::allclose(used->weight.grad(), used_local->weight.grad() / 2, 1e-6, 1e-7));
    const auto& other = r == 0 ? m->right : m->left;
    EXPECT_TRUE(other->weight.grad().defined());  // the other rank's half
  });
}

TEST(DistributedDataParallel, UnusedParametersAcrossRanks) {
  expectUnusedParametersContributeZeros({.find_unused_parameters = true});
}

TEST(DistributedDataParallel, AnUnusedParameterWithoutTheOptionIsAnErrorNamingIt) {
  auto nets = models(2);
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    DistributedDataParallel ddp(m, comm);
    auto [x, y] = batch(0);
    ::torch::mse_loss(m->forward(x, 1), y).backward();  // the right head is unused everywhere
    EXPECT_EQ(ddp.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(ddp.status().message().find("right.weight"), std::string::npos)
        << ddp.status().message();
    EXPECT_NE(ddp.status().message().find("find_unused_parameters"), std::string::npos);
    EXPECT_FALSE(ddp.gradientsFinite()) << "a failed pass's gradients were not averaged";
  });
}

// y = x w computed without a graph and recomputed in its backward, whose own backward (inside the
// outer one) accumulates w's gradient: activation checkpointing, reentrant, as PyTorch's
// checkpoint(use_reentrant=True) does it.
struct Recomputed : ::torch::autograd::Function<Recomputed> {
  static ::torch::Tensor forward(::torch::autograd::AutogradContext* ctx, const ::torch::Tensor& x,
                                 const ::torch::Tensor& w) {
    ctx->saved_data["x"] = x;
    ctx->saved_data["w"] = w;  // the parameter itself (its gradient accumulator), not a copy
    return x.mm(w);
  }
  static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx,
                                                   ::torch::autograd::variable_list grads) {
    auto x = ctx->saved_data["x"].toTensor().detach().requires_grad_(true);
    const auto w = ctx->saved_data["w"].toTensor();
    ::torch::AutoGradMode grad(true);
    ::torch::autograd::backward({x.mm(w)}, {grads[0]});
    return {x.grad(), ::torch::Tensor()};
  }
};

// A parameter used in a recomputed segment and outside it: two gradients in one pass.
struct SharedImpl : ::torch::nn::Module {
  SharedImpl() {
    w = register_parameter("w", ::torch::randn({8, 1}));
    other = register_parameter("other", ::torch::randn({8, 1}));
  }
  ::torch::Tensor forward(const ::torch::Tensor& x) {
    return Recomputed::apply(x, w) + x.mm(w) + x.mm(other);
  }
  ::torch::Tensor w, other;
};

// One model per rank (of two), made on this thread (torch's generator is one per process).
template <class Net>
std::vector<std::shared_ptr<Net>> twoOf() {
  return {std::make_shared<Net>(), std::make_shared<Net>()};
}

// A second gradient for w in one pass, from Net's forward: an error naming w (only w), with copies
// and with bucket views, after which an ordinary pass is fine again.
template <class Net>
void expectASecondGradientOfWIsAnError() {
  for (bool view : {false, true}) {
    const auto nets = twoOf<Net>();
    runRanks(2, [&](int r, collectives::Communicator& comm) {
      auto m = nets[r];
      DistributedDataParallel ddp(m, comm, {.gradient_as_bucket_view = view});
      auto [x, y] = batch(0);
      ::torch::mse_loss(m->forward(x), y).backward();
      EXPECT_EQ(ddp.status().code(), StatusCode::kFailedPrecondition) << "view " << view;
      const std::string message = ddp.status().message();
      EXPECT_NE(message.find("parameter(s) w received more than one gradient"), std::string::npos)
          << message;
      EXPECT_FALSE(ddp.gradientsFinite()) << "a failed pass's gradients were not averaged";
      ::torch::mse_loss(x.mm(m->w) + x.mm(m->other), y).backward();  // each used once
      EXPECT_TRUE(ddp.status().ok()) << ddp.status().toString();
    });
  }
}

// The outer backward gives w its gradient first, then the recomputed segment's nested one.
TEST(DistributedDataParallel, ASecondGradientForAParameterInOnePassIsAnErrorNamingIt) {
  // The recomputation really accumulates a second gradient: without DDP, w's is twice x^T g.
  auto m = std::make_shared<SharedImpl>();
  auto [x, y] = batch(0);
  m->forward(x).sum().backward();
  EXPECT_TRUE(::torch::allclose(m->w.grad(), 2 * x.t().mm(::torch::ones({16, 1}))));
  expectASecondGradientOfWIsAnError<SharedImpl>();
}

// Every gradient from a backward inside the backward, each parameter's from its own: the pass ends
// once both have come (not when the first nested backward ends), averaged as without nesting.
TEST(DistributedDataParallel, GradientsFromNestedBackwardPassesAreAveragedOnce) {
  struct NestedOnly : SharedImpl {
    ::torch::Tensor forward(const ::torch::Tensor& x) {
      return Recomputed::apply(x, w) + Recomputed::apply(x, other);
    }
  };
  for (bool view : {false, true}) {
    ::torch::manual_seed(3);
    const auto nets = twoOf<NestedOnly>();
    auto [x, y] = batch(0);
    // The average of the two ranks' gradients, each on its half of the batch, without nesting.
    std::vector<::torch::Tensor> want;
    for (int r = 0; r < 2; ++r) {
      auto w = nets[0]->w.detach().clone().requires_grad_(true);
      auto other = nets[0]->other.detach().clone().requires_grad_(true);
      const auto xs = x.narrow(0, r * 8, 8), ys = y.narrow(0, r * 8, 8);
      ::torch::mse_loss(xs.mm(w) + xs.mm(other), ys).backward();
      if (want.empty()) {
        want = {w.grad() / 2, other.grad() / 2};
      } else {
        want[0] += w.grad() / 2;
        want[1] += other.grad() / 2;
      }
    }
    runRanks(2, [&](int r, collectives::Communicator& comm) {
      auto m = nets[r];
      DistributedDataParallel ddp(m, comm, {.gradient_as_bucket_view = view});  // rank 0's weights
      // Three passes; status() read only after the last: a loop that does not read it between
      // passes still has every pass averaged (the next pass's nested gradients are its own).
      for (int pass = 0; pass < 3; ++pass) {
        for (auto& p : m->parameters()) p.mutable_grad() = ::torch::Tensor();
        ::torch::mse_loss(m->forward(x.narrow(0, r * 8, 8)), y.narrow(0, r * 8, 8)).backward();
        EXPECT_TRUE(::torch::allclose(m->w.grad(), want[0], 1e-5, 1e-6)) << "pass " << pass;
        EXPECT_TRUE(::torch::allclose(m->other.grad(), want[1], 1e-5, 1e-6)) << "pass " << pass;
      }
      EXPECT_TRUE(ddp.status().ok()) << ddp.status().toString() << ", view " << view;
    });
  }
}

// Nested backward passes give every parameter its gradient first (the pass ends inside the last
// of them), then the outer one gives w a second: still an error naming w, not a second pass.
TEST(DistributedDataParallel, ASecondGradientAfterNestedOnesEndedThePassIsAnErrorNamingIt) {
  struct OuterLast : SharedImpl {
    ::torch::Tensor forward(const ::torch::Tensor& x) {
      auto outer = x.mm(w);  // made first, so its backward runs after the recomputed ones'
      return outer + Recomputed::apply(x, w) + Recomputed::apply(x, other);
    }
  };
  expectASecondGradientOfWIsAnError<OuterLast>();
}

// Only nested backward passes give gradients, and `other` gets none: the pass cannot end inside
// them (a gradient might still come); it ends at status(), as an ordinary pass with an unused
// parameter: an error naming it, or, with find_unused_parameters, zeros for it.
TEST(DistributedDataParallel, APassOnlyNestedOnesGaveGradientsToEndsAtStatus) {
  struct NestedW : SharedImpl {
    ::torch::Tensor forward(const ::torch::Tensor& x) { return Recomputed::apply(x, w); }
  };
  for (bool find_unused : {false, true}) {
    const auto nets = twoOf<NestedW>();
    runRanks(2, [&](int r, collectives::Communicator& comm) {
      auto m = nets[r];
      DistributedDataParallel ddp(m, comm, {.find_unused_parameters = find_unused});
      auto [x, y] = batch(0);
      for (int pass = 0; pass < 2; ++pass) {
        for (auto& p : m->parameters()) p.mutable_grad() = ::torch::Tensor();
        ::torch::mse_loss(m->forward(x.narrow(0, r * 8, 8)), y.narrow(0, r * 8, 8)).backward();
        if (!find_unused) {
          EXPECT_EQ(ddp.status().code(), StatusCode::kFailedPrecondition) << "pass " << pass;
          EXPECT_NE(ddp.status().message().find("parameter(s) other received no gradient"),
                    std::string::npos)
              << ddp.status().message();
          continue;
        }
        ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
        EXPECT_TRUE(ddp.gradientsFinite());
        ASSERT_TRUE(m->other.grad().defined());
        EXPECT_TRUE(::torch::equal(m->other.grad(), ::torch::zeros_like(m->other)));
      }
    });
  }
}

// Two micro-batches per rank: the first under no_sync, the second synchronised. The gradient
// equals one pass over both micro-batches of both ranks (the losses summed).
void expectNoSyncAveragesTheSum(DdpOptions options) {
  std::vector<::torch::Tensor> want;
  auto nets = models(2, /*same=*/true);
  {
    Mlp m(models(1).front());
    auto [x, y] = batch(0);
    for (int part = 0; part < 4; ++part) {
      ::torch::mse_loss(m->forward(x.narrow(0, part * 4, 4)), y.narrow(0, part * 4, 4)).backward();
    }
    for (const auto& p : m->parameters()) want.push_back(p.grad().clone() / 2);  // 2 ranks
  }
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    DistributedDataParallel ddp(m, comm, options);
    auto [x, y] = batch(0);
    {
      DistributedDataParallel::NoSync guard(ddp);
      ::torch::mse_loss(m->forward(x.narrow(0, r * 8, 4)), y.narrow(0, r * 8, 4)).backward();
    }
    ::torch::mse_loss(m->forward(x.narrow(0, r * 8 + 4, 4)), y.narrow(0, r * 8 + 4, 4)).backward();
    ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
    size_t i = 0;
    for (const auto& p : m->parameters()) {
      EXPECT_TRUE(::torch::allclose(p.grad(), want[i], 1e-6, 1e-6)) << "parameter " << i;
      ++i;
    }
  });
}

TEST(DistributedDataParallel, NoSyncAccumulatesAndTheNextPassAveragesTheSum) {
  expectNoSyncAveragesTheSum({});
}

// gradient_as_bucket_view: the same training (with the optimizer's zero_grad), bitwise; each .grad
// aliases its bucket (two parameters of one bucket are adjacent in its memory), also after the
// user set the gradients to none;
// no_sync still accumulates, and unused parameters still contribute zeros.
TEST(DistributedDataParallel, GradientsAsBucketViewsTrainTheSameWithoutACopy) {
  const auto copies = distributed(2, 4, {});
  const auto views = distributed(2, 4, {.gradient_as_bucket_view = true});
  for (size_t i = 0; i < copies[0].size(); ++i) {
    EXPECT_TRUE(::torch::equal(copies[0][i], views[0][i])) << "parameter " << i;
    EXPECT_TRUE(::torch::equal(views[1][i], views[0][i])) << "ranks disagree";
  }
  auto nets = models(2, /*same=*/true);
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    DistributedDataParallel ddp(m, comm, {.gradient_as_bucket_view = true});
    auto [x, y] = batch(0);
    for (int pass = 0; pass < 2; ++pass) {
      for (auto& p : m->parameters()) p.mutable_grad() = ::torch::Tensor();  // set to none
      ::torch::mse_loss(m->forward(x.narrow(0, r * 8, 8)), y.narrow(0, r * 8, 8)).backward();
      ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
      const auto params = m->parameters();
      ASSERT_GE(params.size(), 2u);
      for (const auto& p : params) ASSERT_TRUE(p.grad().defined());
      // Reverse registration order in the bucket: the second parameter's gradient comes first.
      EXPECT_EQ(static_cast<const char*>(params[1].grad().data_ptr()) + params[1].grad().nbytes(),
                static_cast<const char*>(params[0].grad().data_ptr()))
          << "pass " << pass << ": .grad is not in the bucket";
    }
  });
}

TEST(DistributedDataParallel, GradientsAsBucketViewsWithNoSyncAndUnusedParameters) {
  expectNoSyncAveragesTheSum({.gradient_as_bucket_view = true});
  expectUnusedParametersContributeZeros(
      {.find_unused_parameters = true, .gradient_as_bucket_view = true});
}

void zeroGrads(const ::torch::nn::Module& m) {
  for (const auto& p : m.parameters()) {
    if (p.grad().defined()) p.grad().zero_();
  }
}

std::vector<::torch::Tensor> grads(const ::torch::nn::Module& m) {
  std::vector<::torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.grad().detach().clone());
  return out;
}

// A NaN in one rank's input makes every rank's averaged gradients non-finite, for that pass only;
// for f32 buckets (the kernels' check), f64 ones (torch's) and f32 buckets sent as bf16 (whose
// residuals must not keep the NaN).
TEST(DistributedDataParallel, AveragedGradientsAreCheckedForNanOnEveryRank) {
  for (auto [dtype, compression] : {std::pair{::torch::kFloat32, GradientCompression::kNone},
                                    std::pair{::torch::kFloat64, GradientCompression::kNone},
                                    std::pair{::torch::kFloat32, GradientCompression::kBf16}}) {
    auto nets = models(2);
    std::vector<std::vector<bool>> finite(2);
    runRanks(2, [&](int r, collectives::Communicator& comm) {
      auto m = nets[r];
      m->to(dtype);
      DistributedDataParallel ddp(m, comm, {.compression = compression});
      for (int s = 0; s < 3; ++s) {
        auto [x, y] = batch(s);
        auto xs = x.narrow(0, r * 8, 8).to(dtype).clone();  // the batch is shared
        if (s == 1 && r == 1) xs[3][5] = std::numeric_limits<double>::quiet_NaN();
        zeroGrads(*m);
        ::torch::mse_loss(m->forward(xs), y.narrow(0, r * 8, 8).to(dtype)).backward();
        ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
        finite[r].push_back(ddp.gradientsFinite());
      }
    });
    for (int r = 0; r < 2; ++r) {
      EXPECT_EQ(finite[r], (std::vector<bool>{true, false, true}))
          << "rank " << r << ", " << dtype
          << (compression == GradientCompression::kBf16 ? ", bf16" : "");
    }
  }
}

// f64 gradients at 3 ranks are divided by 3 in f64 (not multiplied by a float 1/3, which is off
// by about 3e-8).
TEST(DistributedDataParallel, F64GradientsAreAveragedInF64) {
  auto nets = models(3, /*same=*/true);
  std::vector<std::vector<::torch::Tensor>> local(3), averaged(3);
  runRanks(3, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    m->to(::torch::kFloat64);
    DistributedDataParallel ddp(m, comm);
    auto [x, y] = batch(0);
    auto pass = [&] {
      zeroGrads(*m);
      ::torch::mse_loss(m->forward(x.narrow(0, r * 5, 5).to(::torch::kFloat64)),
                        y.narrow(0, r * 5, 5).to(::torch::kFloat64))
          .backward();
    };
    {
      DistributedDataParallel::NoSync guard(ddp);
      pass();
      local[r] = grads(*m);
    }
    pass();
    ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
    averaged[r] = grads(*m);
  });
  for (size_t i = 0; i < local[0].size(); ++i) {
    const auto want = (local[0][i] + local[1][i] + local[2][i]) / 3;
    EXPECT_TRUE(::torch::allclose(averaged[0][i], want, 1e-14, 1e-17))
        << "parameter " << i << ": max difference "
        << (averaged[0][i] - want).abs().max().item<double>();
  }
}

// f16 and bf16 parameters: their buckets are reduced in their own dtype (each sum rounded) and
// halved by the kernels' scale-and-check, so the averaged gradient of sum(w * x_r) is exactly
// round(x_0 + x_1) / 2. A rank's infinity is found in them too.
TEST(DistributedDataParallel, HalfPrecisionBucketsAreAveragedAndChecked) {
  struct Elementwise : ::torch::nn::Module {
    explicit Elementwise(::torch::ScalarType t) {
      w = register_parameter("w", ::torch::ones({1000}, ::torch::dtype(t)));
    }
    ::torch::Tensor w;
  };
  for (auto dtype : {::torch::kFloat16, ::torch::kBFloat16}) {
    std::vector<::torch::Tensor> x(2), got(2);
    // Not vector<bool>: its elements share bytes, and both rank threads write.
    std::vector<char> finite(2, 1);
    for (int r = 0; r < 2; ++r) {
      ::torch::manual_seed(50 + r);
      x[r] = ::torch::randn({1000}).to(dtype);
    }
    runRanks(2, [&](int r, collectives::Communicator& comm) {
      auto m = std::make_shared<Elementwise>(dtype);
      DistributedDataParallel ddp(m, comm);
      (m->w * x[r]).sum().backward();
      ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
      EXPECT_TRUE(ddp.gradientsFinite());
      got[r] = m->w.grad().clone();
      m->w.grad().zero_();
      auto xs = x[r].clone();
      if (r == 0) xs[999] = std::numeric_limits<float>::infinity();
      (m->w * xs).sum().backward();
      finite[r] = ddp.gradientsFinite();
    });
    const auto want = (x[0].to(::torch::kFloat32) + x[1].to(::torch::kFloat32)).to(dtype) * 0.5;
    for (int r = 0; r < 2; ++r) {
      EXPECT_TRUE(::torch::equal(got[r], want)) << dtype << ", rank " << r;
      EXPECT_FALSE(finite[r]) << dtype << ", rank " << r;
    }
  }
}

// A module with parameters on two devices is refused, naming one on each.
TEST(DistributedDataParallel, ParametersOnTwoDevicesAreRefused) {
  struct TwoDevices : ::torch::nn::Module {
    TwoDevices() {
      register_parameter("here", ::torch::zeros({3}));
      register_parameter("elsewhere", ::torch::empty({3}, ::torch::device(::torch::kMeta)));
    }
  };
  auto m = std::make_shared<TwoDevices>();
  runRanks(1, [&](int, collectives::Communicator& comm) {
    DistributedDataParallel ddp(m, comm, {.broadcast_at_start = false});
    EXPECT_EQ(ddp.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(ddp.status().message().find("meta"), std::string::npos) << ddp.status().message();
    EXPECT_NE(ddp.status().message().find("one device"), std::string::npos);
  });
}

// A model DDP cannot average (a complex parameter) is refused on every rank alike, and nothing
// is broadcast from it: rank 1 keeps its own values.
TEST(DistributedDataParallel, AModelItCannotAverageIsRefusedWithoutABroadcast) {
  struct Complex : ::torch::nn::Module {
    explicit Complex(float v) {
      w = register_parameter("w", ::torch::full({3}, v));
      register_parameter("z", ::torch::zeros({2}, ::torch::kComplexFloat));
    }
    ::torch::Tensor w;
  };
  std::vector<std::shared_ptr<Complex>> nets = {std::make_shared<Complex>(1.0f),
                                                std::make_shared<Complex>(2.0f)};
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    DistributedDataParallel ddp(nets[r], comm);
    EXPECT_EQ(ddp.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(ddp.status().message().find("ComplexFloat"), std::string::npos)
        << ddp.status().message();
    EXPECT_EQ(nets[r]->w[0].item<float>(), r == 0 ? 1.0f : 2.0f) << "rank " << r;
  });
}

// The loss times 1024, with setLossScale(1024): the same training bitwise (powers of two scale
// exactly), the scale divided out in the averaging pass. A scale that overflows the loss is
// reported as non-finite gradients; a scale that is not positive and finite is refused.
TEST(DistributedDataParallel, ALossScaleIsDividedOutWhileAveraging) {
  const auto plain = distributed(2, 3, {});
  const auto scaled = distributed(2, 3, {}, nullptr, 1024.0f);
  for (size_t i = 0; i < plain[0].size(); ++i) {
    EXPECT_TRUE(::torch::equal(plain[0][i], scaled[0][i])) << "parameter " << i;
  }
  auto nets = models(2);
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    DistributedDataParallel ddp(m, comm);
    for (float bad : {0.0f, -2.0f, std::numeric_limits<float>::infinity(),
                      std::numeric_limits<float>::quiet_NaN()}) {
      const Status s = ddp.setLossScale(bad);
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
      EXPECT_NE(s.message().find("positive and finite"), std::string::npos) << s.message();
    }
    const float huge = 3e38f;  // the loss's gradients overflow f32 once multiplied by it
    ASSERT_TRUE(ddp.setLossScale(huge).ok());
    auto [x, y] = batch(0);
    (::torch::mse_loss(m->forward(x.narrow(0, r * 8, 8) * 100), y.narrow(0, r * 8, 8)) * huge)
        .backward();
    ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
    EXPECT_FALSE(ddp.gradientsFinite());
  });
}

// bf16 compression. Error feedback, on a batch both ranks share (so that the reduction's sum of
// two equal bf16 values is exact, and only the ranks' own rounding is left): 64 passes without a
// step, the loss scale alternating between 1 and 1024, send gradients whose sum stays within two
// residuals of 64 x the true one, where compression without feedback would be off by 64 x its
// rounding error. And with each rank on its own half of
// a batch, one pass's average is exactly bf16(bf16(g0) + bf16(g1)) / 2: each rank's gradient
// rounded, and the sum rounded in the reduction.
void expectBf16CompressionFeedsErrorsBack(bool bucket_view) {
  const int passes = 64;
  auto nets = models(2, /*same=*/true);
  std::vector<std::vector<::torch::Tensor>> half(2), first(2), whole(2), sum(2);
  const DdpOptions options{.gradient_as_bucket_view = bucket_view,
                           .compression = GradientCompression::kBf16};
  runRanks(2, [&](int r, collectives::Communicator& comm) {
    auto m = nets[r];
    auto [x, y] = batch(0);
    auto pass = [&](const ::torch::Tensor& in, const ::torch::Tensor& out) {
      zeroGrads(*m);
      ::torch::mse_loss(m->forward(in), out).backward();
    };
    const auto xs = x.narrow(0, r * 8, 8), ys = y.narrow(0, r * 8, 8);
    {
      DistributedDataParallel ddp(m, comm, options);
      {
        DistributedDataParallel::NoSync guard(ddp);
        pass(x, y);
        whole[r] = grads(*m);
      }
      for (int k = 0; k < passes; ++k) {
        // The loss scale alternates between 1 and 1024: the residuals must follow it.
        const float scale = k % 2 == 0 ? 1.0f : 1024.0f;
        ASSERT_TRUE(ddp.setLossScale(scale).ok());
        zeroGrads(*m);
        (::torch::mse_loss(m->forward(x), y) * scale).backward();
        ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
        ASSERT_TRUE(ddp.gradientsFinite());
        const auto g = grads(*m);
        for (size_t i = 0; i < g.size(); ++i) {
          if (k == 0) {
            sum[r].push_back(g[i].clone());
          } else {
            sum[r][i] += g[i];
          }
        }
      }
    }
    DistributedDataParallel ddp(m, comm, options);  // residuals zero again
    {
      DistributedDataParallel::NoSync guard(ddp);
      pass(xs, ys);
      half[r] = grads(*m);
    }
    pass(xs, ys);
    ASSERT_TRUE(ddp.status().ok()) << ddp.status().toString();
    first[r] = grads(*m);
  });
  auto bf16 = [](const ::torch::Tensor& t) {
    return t.to(::torch::kBFloat16).to(::torch::kFloat32);
  };
  double fed_back = 0, without = 0;
  for (size_t i = 0; i < half[0].size(); ++i) {
    const auto once = bf16(bf16(half[0][i]) + bf16(half[1][i])) * 0.5f;
    EXPECT_TRUE(::torch::equal(first[0][i], once)) << "parameter " << i;
    EXPECT_TRUE(::torch::equal(sum[1][i], sum[0][i])) << "ranks disagree";
    const auto& g = whole[0][i];
    fed_back += (sum[0][i] - g * passes).pow(2).sum().item<double>();
    without += ((bf16(g) - g) * passes).pow(2).sum().item<double>();
  }
  EXPECT_GT(without, 0.0) << "no rounding to compensate: the test's data are too tame";
  EXPECT_LT(std::sqrt(fed_back), 0.1 * std::sqrt(without))
      << "error with feedback " << std::sqrt(fed_back) << ", without " << std::sqrt(without);
}

TEST(DistributedDataParallel, Bf16CompressionFeedsTheRoundingErrorBack) {
  expectBf16CompressionFeedsErrorsBack(/*bucket_view=*/false);
  expectBf16CompressionFeedsErrorsBack(/*bucket_view=*/true);
}

// Training with compression stays within bf16's precision of training without it.
TEST(DistributedDataParallel, Bf16CompressionTrainsCloseToUncompressed) {
  const auto plain = distributed(2, 4, {});
  const auto compressed = distributed(2, 4, {.compression = GradientCompression::kBf16});
  for (size_t i = 0; i < plain[0].size(); ++i) {
    EXPECT_TRUE(::torch::allclose(compressed[0][i], plain[0][i], 1e-2, 1e-3))
        << "parameter " << i << ": max difference "
        << (compressed[0][i] - plain[0][i]).abs().max().item<float>();
    EXPECT_TRUE(::torch::equal(compressed[1][i], compressed[0][i])) << "ranks disagree";
  }
}

}  // namespace
}  // namespace rally::parallel
