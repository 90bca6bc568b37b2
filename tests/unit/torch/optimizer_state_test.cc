// registerOptimizer: libtorch optimizers' state in an ElasticState. A worker that joins with fresh
// weights and an optimizer that never stepped receives the trained rank's parameters and optimizer
// state through sync() (the in-place recovery path) and from then on trains bitwise like it; a
// restore() rewinds both; TP layers' moments are shards like their weights; unsupported cases say
// why.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <ostream>
#include <string>

#include "runtime/torch/tensor_parallel.h"
#include "runtime/torch/torch_state.h"
#include "tests/unit/collectives/gloo_ranks.h"

namespace rally::parallel {
namespace {

namespace optim = ::torch::optim;
using ::torch::Tensor;

struct Net : ::torch::nn::Module {
  Net() {
    a = register_module("a", ::torch::nn::Linear(6, 8));
    b = register_module("b", ::torch::nn::Linear(8, 3));
  }
  Tensor forward(const Tensor& x) { return b(::torch::tanh(a(x))); }
  ::torch::nn::Linear a{nullptr}, b{nullptr};
};

using MakeOptimizer = std::function<std::unique_ptr<optim::Optimizer>(Net&)>;

struct Case {
  std::string name;
  MakeOptimizer make;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

void trainSteps(Net& net, optim::Optimizer& opt, int first, int count) {
  for (int s = first; s < first + count; ++s) {
    // The same batch for step s on every rank (ranks are threads: not the global generator).
    auto gen = at::detail::createCPUGenerator(100 + s);
    const Tensor x = ::torch::randn({5, 6}, gen), y = ::torch::randn({5, 3}, gen);
    opt.zero_grad();
    ::torch::mse_loss(net.forward(x), y).backward();
    opt.step();
  }
}

Tensor flat(Net& net) {
  std::vector<Tensor> all;
  for (const auto& p : net.parameters()) all.push_back(p.detach().reshape({-1}));
  return ::torch::cat(all);
}

class OptimizerState : public ::testing::TestWithParam<Case> {};

TEST_P(OptimizerState, AFreshReplacementReceivesItAndTrainsAlike) {
  collectives::test_support::runGlooRanks(2, [&](int rank, collectives::Communicator& comm) {
    ::torch::manual_seed(rank);  // rank 1 starts from other weights
    Net net;
    auto opt = GetParam().make(net);
    ElasticState state;
    ASSERT_TRUE(registerModule(state, net).ok());
    if (rank == 0) trainSteps(net, *opt, 0, 4);
    const Status reg = registerOptimizer(state, *opt, net);
    ASSERT_TRUE(reg.ok()) << reg.toString();
    if (rank == 0) {
      ASSERT_TRUE(state.commit().ok());
    }
    auto synced = state.sync(comm);
    ASSERT_TRUE(synced.ok()) << synced.status().toString();
    EXPECT_EQ(synced->received, rank == 1);
    trainSteps(net, *opt, 4, 3);
    Tensor mine = flat(net), theirs = mine.clone();
    ASSERT_TRUE(comm.broadcast(theirs.data_ptr(), static_cast<size_t>(theirs.numel()),
                               collectives::DataType::kF32, 0)
                    ->wait(Milliseconds(30000))
                    .ok());
    EXPECT_TRUE(::torch::equal(mine, theirs)) << "rank " << rank << " trains unlike rank 0";
  });
}

TEST_P(OptimizerState, RestoreRewindsParametersAndOptimizer) {
  ::torch::manual_seed(3);
  Net net;
  auto opt = GetParam().make(net);
  ElasticState state;
  ASSERT_TRUE(registerModule(state, net).ok());
  ASSERT_TRUE(registerOptimizer(state, *opt, net).ok());
  trainSteps(net, *opt, 0, 2);
  ASSERT_TRUE(state.commit().ok());
  trainSteps(net, *opt, 2, 3);
  const Tensor first = flat(net).clone();
  ASSERT_TRUE(state.restore().ok());
  trainSteps(net, *opt, 2, 3);
  EXPECT_TRUE(::torch::equal(flat(net), first));
}

INSTANTIATE_TEST_SUITE_P(
    Optimizers, OptimizerState,
    ::testing::Values(
        Case{"Adam",
             [](Net& n) {
               return std::make_unique<optim::Adam>(n.parameters(), optim::AdamOptions(0.01));
             }},
        Case{"AdamAmsgrad",
             [](Net& n) {
               return std::make_unique<optim::Adam>(
                   n.parameters(), optim::AdamOptions(0.01).amsgrad(true).weight_decay(0.1));
             }},
        Case{"AdamW",
             [](Net& n) {
               return std::make_unique<optim::AdamW>(n.parameters(), optim::AdamWOptions(0.01));
             }},
        Case{"SgdNesterov",
             [](Net& n) {
               return std::make_unique<optim::SGD>(
                   n.parameters(), optim::SGDOptions(0.05).momentum(0.9).nesterov(true));
             }},
        Case{"RmspropCentered",
             [](Net& n) {
               return std::make_unique<optim::RMSprop>(
                   n.parameters(), optim::RMSpropOptions(0.01).momentum(0.5).centered(true));
             }},
        Case{"Adagrad",
             [](Net& n) {
               return std::make_unique<optim::Adagrad>(n.parameters(), optim::AdagradOptions(0.1));
             }}),
    [](const auto& info) { return info.param.name; });

TEST(RegisterOptimizer, TensorParallelMomentsAreShardsLikeTheirWeights) {
  collectives::test_support::runGlooRanks(2, [&](int rank, collectives::Communicator& comm) {
    struct TpNet : ::torch::nn::Module {
      explicit TpNet(collectives::Communicator& tp)
          : up(register_module("up", ColumnParallelLinear(4, 6, tp))) {}
      ColumnParallelLinear up;
    } net(comm);
    optim::AdamW opt(net.parameters(), optim::AdamWOptions(0.01));
    ElasticState state;
    ASSERT_TRUE(registerModule(state, net).ok());
    ASSERT_TRUE(registerOptimizer(state, opt, net).ok());
    int checked = 0;
    for (const auto& e : state.registered()) {
      if (e.name == "optim.up.weight.exp_avg" || e.name == "optim.up.weight.exp_avg_sq") {
        EXPECT_EQ(e.global_shape, (std::vector<std::int64_t>{6, 4})) << e.name;
        EXPECT_EQ(e.global_offset, (std::vector<std::int64_t>{3 * rank, 0})) << e.name;
        EXPECT_EQ(e.shape, (std::vector<std::int64_t>{3, 4})) << e.name;
        ++checked;
      } else if (e.name == "optim.up.bias.exp_avg") {
        EXPECT_EQ(e.global_offset, (std::vector<std::int64_t>{3 * rank})) << e.name;
        ++checked;
      }
    }
    EXPECT_EQ(checked, 3);
  });
}

TEST(RegisterOptimizer, SaysWhatItCannotRegister) {
  Net net, other;
  optim::SGD damped(net.parameters(), optim::SGDOptions(0.1).momentum(0.9).dampening(0.5));
  ElasticState state;
  Status s = registerOptimizer(state, damped, net);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("dampening"), std::string::npos) << s.toString();
  EXPECT_NE(s.message().find("after"), std::string::npos) << s.toString();
  trainSteps(net, damped, 0, 1);  // now the buffers exist
  s = registerOptimizer(state, damped, net);
  EXPECT_TRUE(s.ok()) << s.toString();

  // A foreign parameter in a second group: refused before anything is registered.
  optim::AdamW foreign(net.parameters(), optim::AdamWOptions(0.01));
  foreign.add_param_group(optim::OptimizerParamGroup(other.parameters()));
  ElasticState state2;
  s = registerOptimizer(state2, foreign, net);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("not a parameter of the module"), std::string::npos) << s.toString();
  EXPECT_EQ(state2.entries(), 0u) << "nothing registered by a refused call";

  optim::LBFGS lbfgs(net.parameters(), optim::LBFGSOptions(1));
  ElasticState state3;
  s = registerOptimizer(state3, lbfgs, net);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Adam, AdamW, SGD"), std::string::npos) << s.toString();
}

// Adagrad's constructor makes each parameter's accumulator, add_param_group does not:
// registerOptimizer makes it as the constructor would, so training equals an Adagrad built with
// every parameter at once.
TEST(RegisterOptimizer, AdagradGroupsAddedLaterGetTheirAccumulator) {
  ::torch::manual_seed(9);
  Net a, b;
  {
    ::torch::NoGradGuard g;
    for (size_t i = 0; i < a.parameters().size(); ++i) b.parameters()[i].copy_(a.parameters()[i]);
  }
  const auto opts = optim::AdagradOptions(0.1).initial_accumulator_value(0.25);
  optim::Adagrad whole(a.parameters(), opts);
  optim::Adagrad split(std::vector<Tensor>{b.a->weight, b.a->bias}, opts);
  split.add_param_group(optim::OptimizerParamGroup({b.b->weight, b.b->bias}));
  ElasticState state;
  const Status s = registerOptimizer(state, split, b);
  ASSERT_TRUE(s.ok()) << s.toString();
  trainSteps(a, whole, 0, 3);
  trainSteps(b, split, 0, 3);
  EXPECT_TRUE(::torch::equal(flat(a), flat(b)));
}

// Empty parameters (a TP rank's empty slice, say) all have a null data pointer: they are still
// told apart, each under its own name.
TEST(RegisterOptimizer, EmptyParametersKeepTheirNames) {
  struct WithEmpty : ::torch::nn::Module {
    WithEmpty() {
      e1 = register_parameter("e1", ::torch::empty({0}));
      e2 = register_parameter("e2", ::torch::empty({0, 3}));
      w = register_parameter("w", ::torch::ones({2}));
    }
    Tensor e1, e2, w;
  } m;
  optim::Adam opt(m.parameters(), optim::AdamOptions(0.1));
  ElasticState state;
  ASSERT_TRUE(registerModule(state, m).ok());
  const Status s = registerOptimizer(state, opt, m);
  ASSERT_TRUE(s.ok()) << s.toString();
  std::vector<std::string> names;
  for (const auto& e : state.registered()) names.push_back(e.name);
  for (const char* want : {"optim.e1.exp_avg", "optim.e2.exp_avg", "optim.w.exp_avg"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  }
}

}  // namespace
}  // namespace rally::parallel
