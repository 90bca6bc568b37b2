// Tensor-parallel layers at TP = 2 and TP = 3 (uneven splits included), ranks as threads over
// Gloo, against the unsplit layers with the same full weights: forward outputs, the input's
// gradient and each rank's slice of the weight gradients, within 1e-5 (the split sums round
// differently): ColumnParallelLinear (gathered), RowParallelLinear (scattering its input), the
// column -> row MLP pattern, VocabParallelEmbedding, and the vocab-parallel cross-entropy.
#include "runtime/torch/tensor_parallel.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>

#include "runtime/checkpoint/checkpointer.h"
#include "runtime/torch/torch_state.h"
#include "tests/unit/collectives/gloo_ranks.h"

namespace rally::parallel {
namespace {

using ::torch::Tensor;

void runRanks(int n, const std::function<void(int, collectives::Communicator&)>& body) {
  collectives::test_support::runGlooRanks(n, [&](int r, collectives::Communicator& comm) {
    ::torch::set_num_threads(1);
    body(r, comm);
  });
}

void expectClose(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  EXPECT_TRUE(::torch::allclose(got, want, 1e-5, 1e-5))
      << what << ": max difference " << (got - want).abs().max().item<float>();
}

class TensorParallel : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    ::torch::manual_seed(42);  // all data made here, on the main thread
    w1 = ::torch::randn({12, 9}), b1 = ::torch::randn({12});
    w2 = ::torch::randn({9, 12}), b2 = ::torch::randn({9});
    x = ::torch::randn({5, 9}), probe = ::torch::randn({5, 12}), probe2 = ::torch::randn({5, 9});
    emb = ::torch::randn({10, 4});
    ids = ::torch::tensor({2, 7, 9, 0, 5, 3}, ::torch::kLong);
    logits = ::torch::randn({6, 12});
    targets = ::torch::tensor({0, 11, 4, 7, 3, 8}, ::torch::kLong);
  }
  Tensor w1, b1, w2, b2, x, probe, probe2, emb, ids, logits, targets;
};

TEST_P(TensorParallel, ColumnParallelLinearEqualsTheUnsplitLayer) {
  auto xf = x.clone().requires_grad_(true);
  auto w = w1.clone().requires_grad_(true);
  auto yf = ::torch::nn::functional::linear(xf, w, b1);
  (yf * probe).sum().backward();
  runRanks(GetParam(), [&](int, collectives::Communicator& tp) {
    ColumnParallelLinear layer(9, 12, tp, true, /*gather_output=*/true);
    {
      ::torch::NoGradGuard g;
      layer->weight.copy_(w1.narrow(0, layer->out_begin, layer->out_end - layer->out_begin));
      layer->bias.copy_(b1.narrow(0, layer->out_begin, layer->out_end - layer->out_begin));
    }
    auto xi = x.clone().requires_grad_(true);
    auto y = layer->forward(xi);
    expectClose(y, yf.detach(), "output");
    (y * probe).sum().backward();
    expectClose(xi.grad(), xf.grad(), "input gradient");
    expectClose(layer->weight.grad(),
                w.grad().narrow(0, layer->out_begin, layer->out_end - layer->out_begin),
                "weight gradient");
  });
}

TEST_P(TensorParallel, RowParallelLinearEqualsTheUnsplitLayer) {
  auto xf = probe.clone().requires_grad_(true);  // [5, 12]
  auto w = w2.clone().requires_grad_(true);
  auto yf = ::torch::nn::functional::linear(xf, w, b2);
  (yf * probe2).sum().backward();
  runRanks(GetParam(), [&](int, collectives::Communicator& tp) {
    RowParallelLinear layer(12, 9, tp, true, /*input_is_parallel=*/false);
    {
      ::torch::NoGradGuard g;
      layer->weight.copy_(w2.narrow(1, layer->in_begin, layer->in_end - layer->in_begin));
      layer->bias.copy_(b2);
    }
    auto xi = probe.clone().requires_grad_(true);
    auto y = layer->forward(xi);
    expectClose(y, yf.detach(), "output");
    (y * probe2).sum().backward();
    expectClose(xi.grad(), xf.grad(), "input gradient");
    expectClose(layer->weight.grad(),
                w.grad().narrow(1, layer->in_begin, layer->in_end - layer->in_begin),
                "weight gradient");
  });
}

// 11 columns split unevenly (6+5 at TP = 2, 4+4+3 at TP = 3): a gathering column layer, a
// scattering row layer, and gatherFromTensorParallel on a 3-D tensor, forward and backward.
TEST_P(TensorParallel, UnevenSplitsGatherAndScatter) {
  ::torch::manual_seed(7);
  const Tensor wc = ::torch::randn({11, 9}), wr = ::torch::randn({9, 11}),
               full = ::torch::randn({2, 3, 11});
  const Tensor pc = ::torch::randn({5, 11}), pr = ::torch::randn({5, 9}),
               pf = ::torch::randn({2, 3, 11});
  auto xf = x.clone().requires_grad_(true);
  auto hf = ::torch::nn::functional::linear(xf, wc);
  auto yf = ::torch::nn::functional::linear(hf, wr);
  (hf * pc).sum().backward({}, /*retain_graph=*/true);
  (yf * pr).sum().backward();
  runRanks(GetParam(), [&](int rank, collectives::Communicator& tp) {
    ColumnParallelLinear col(9, 11, tp, /*bias=*/false, /*gather_output=*/true);
    RowParallelLinear row(11, 9, tp, /*bias=*/false, /*input_is_parallel=*/false);
    {
      ::torch::NoGradGuard g;
      col->weight.copy_(wc.narrow(0, col->out_begin, col->out_end - col->out_begin));
      row->weight.copy_(wr.narrow(1, row->in_begin, row->in_end - row->in_begin));
    }
    auto xi = x.clone().requires_grad_(true);
    auto h = col->forward(xi);
    expectClose(h, hf.detach(), "gathered column output");
    auto y = row->forward(h);
    expectClose(y, yf.detach(), "row output from a scattered input");
    ((h * pc).sum() + (y * pr).sum()).backward();
    expectClose(xi.grad(), xf.grad(), "input gradient");

    const auto [b, e] = partition(11, tp.size(), rank);
    auto slice = full.narrow(-1, b, e - b).clone().requires_grad_(true);
    auto gathered = gatherFromTensorParallel(slice, 11, *TensorParallelGroup::of(tp));
    expectClose(gathered, full, "gatherFromTensorParallel");
    (gathered * pf).sum().backward();
    expectClose(slice.grad(), pf.narrow(-1, b, e - b), "gatherFromTensorParallel gradient");
    EXPECT_THROW(gatherFromTensorParallel(full, 11, *TensorParallelGroup::of(tp)),
                 std::invalid_argument);
  });
}

TEST_P(TensorParallel, ColumnThenRowEqualsTheUnsplitMlp) {
  auto xf = x.clone().requires_grad_(true);
  auto yf = ::torch::nn::functional::linear(
      ::torch::relu(::torch::nn::functional::linear(xf, w1, b1)), w2, b2);
  (yf * probe2).sum().backward();
  runRanks(GetParam(), [&](int, collectives::Communicator& tp) {
    ColumnParallelLinear up(9, 12, tp);
    RowParallelLinear down(12, 9, tp);
    {
      ::torch::NoGradGuard g;
      up->weight.copy_(w1.narrow(0, up->out_begin, up->out_end - up->out_begin));
      up->bias.copy_(b1.narrow(0, up->out_begin, up->out_end - up->out_begin));
      down->weight.copy_(w2.narrow(1, down->in_begin, down->in_end - down->in_begin));
      down->bias.copy_(b2);
    }
    auto xi = x.clone().requires_grad_(true);
    auto y = down->forward(::torch::relu(up->forward(xi)));
    expectClose(y, yf.detach(), "output");
    (y * probe2).sum().backward();
    expectClose(xi.grad(), xf.grad(), "input gradient");
  });
}

TEST_P(TensorParallel, VocabParallelEmbeddingEqualsTheUnsplitOne) {
  auto e = emb.clone().requires_grad_(true);
  auto yf = ::torch::embedding(e, ids);
  auto p = ::torch::randn({6, 4});
  (yf * p).sum().backward();
  runRanks(GetParam(), [&](int, collectives::Communicator& tp) {
    VocabParallelEmbedding layer(10, 4, tp);
    {
      ::torch::NoGradGuard g;
      layer->weight.copy_(emb.narrow(0, layer->vocab_begin, layer->vocab_end - layer->vocab_begin));
    }
    auto y = layer->forward(ids);
    expectClose(y, yf.detach(), "output");
    (y * p).sum().backward();
    expectClose(layer->weight.grad(),
                e.grad().narrow(0, layer->vocab_begin, layer->vocab_end - layer->vocab_begin),
                "weight gradient");
  });
}

TEST_P(TensorParallel, VocabParallelCrossEntropyEqualsTheUnsplitLoss) {
  auto lf = logits.clone().requires_grad_(true);
  auto loss = ::torch::nn::functional::cross_entropy(lf, targets);
  loss.backward();
  runRanks(GetParam(), [&](int r, collectives::Communicator& tp) {
    const auto [b, e] = partition(12, tp.size(), r);
    auto li = logits.narrow(1, b, e - b).clone().requires_grad_(true);
    auto l = vocabParallelCrossEntropy(li, targets, b, tp);
    expectClose(l, loss.detach(), "loss");
    l.backward();
    expectClose(li.grad(), lf.grad().narrow(1, b, e - b), "logits gradient");
  });
}

INSTANTIATE_TEST_SUITE_P(TpSizes, TensorParallel, ::testing::Values(2, 3),
                         [](const auto& info) { return "tp" + std::to_string(info.param); });

// A model of tensor-parallel layers checkpointed at TP = 2 (registered through registerModule: the
// layers' parameters as shards of the full weights) loads at TP = 1 and at TP = 3 with every
// weight where the full layer has it.
TEST(TensorParallelCheckpoint, SavedAtTp2LoadsAtTp1AndTp3) {
  char tmpl[] = "/tmp/rally-tp-ckpt-XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  ::torch::manual_seed(5);
  const Tensor w1 = ::torch::randn({12, 9}), b1 = ::torch::randn({12}),
               w2 = ::torch::randn({9, 12});
  const Tensor emb = ::torch::randn({10, 4});
  struct Net : ::torch::nn::Module {
    Net(collectives::Communicator& tp)
        : up(register_module("up", ColumnParallelLinear(9, 12, tp))),
          down(register_module("down", RowParallelLinear(12, 9, tp, /*bias=*/false))),
          embed(register_module("embed", VocabParallelEmbedding(10, 4, tp))) {}
    ColumnParallelLinear up;
    RowParallelLinear down;
    VocabParallelEmbedding embed;
  };
  auto fill = [&](Net& n) {
    ::torch::NoGradGuard g;
    n.up->weight.copy_(w1.narrow(0, n.up->out_begin, n.up->out_end - n.up->out_begin));
    n.up->bias.copy_(b1.narrow(0, n.up->out_begin, n.up->out_end - n.up->out_begin));
    n.down->weight.copy_(w2.narrow(1, n.down->in_begin, n.down->in_end - n.down->in_begin));
    n.embed->weight.copy_(
        emb.narrow(0, n.embed->vocab_begin, n.embed->vocab_end - n.embed->vocab_begin));
  };
  runRanks(2, [&](int, collectives::Communicator& tp) {
    Net net(tp);
    fill(net);
    ElasticState state;
    ASSERT_TRUE(registerModule(state, net).ok());
    checkpoint::Checkpointer ckpt(dir, {.layout = "tp=2"});
    ASSERT_TRUE(ckpt.attach(tp, state).ok());
    ASSERT_TRUE(*ckpt.save(1));
    ASSERT_TRUE(ckpt.wait(Milliseconds(60000)).ok());
  });
  for (int tp_size : {1, 3}) {
    runRanks(tp_size, [&](int, collectives::Communicator& tp) {
      Net net(tp);  // fresh random weights
      ElasticState state;
      ASSERT_TRUE(registerModule(state, net).ok());
      checkpoint::Checkpointer ckpt(dir);
      ASSERT_TRUE(ckpt.attach(tp, state).ok());
      auto loaded = ckpt.loadNewest();
      ASSERT_TRUE(loaded.ok()) << loaded.status().toString();
      EXPECT_TRUE(::torch::equal(
          net.up->weight, w1.narrow(0, net.up->out_begin, net.up->out_end - net.up->out_begin)));
      EXPECT_TRUE(::torch::equal(
          net.up->bias, b1.narrow(0, net.up->out_begin, net.up->out_end - net.up->out_begin)));
      EXPECT_TRUE(
          ::torch::equal(net.down->weight,
                         w2.narrow(1, net.down->in_begin, net.down->in_end - net.down->in_begin)));
      EXPECT_TRUE(::torch::equal(
          net.embed->weight,
          emb.narrow(0, net.embed->vocab_begin, net.embed->vocab_end - net.embed->vocab_begin)));
    });
  }
  std::filesystem::remove_all(dir);
}

TEST(Partition, SplitsEvenlyWithTheRemainderFirst) {
  using Range = std::pair<std::int64_t, std::int64_t>;
  EXPECT_EQ(partition(10, 3, 0), Range(0, 4));
  EXPECT_EQ(partition(10, 3, 1), Range(4, 7));
  EXPECT_EQ(partition(10, 3, 2), Range(7, 10));
}

}  // namespace
}  // namespace rally::parallel
