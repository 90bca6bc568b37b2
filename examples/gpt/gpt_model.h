// The GPT of examples/gpt (also timed by bench/ddp): a decoder-only transformer over byte tokens,
// built from rally's tensor-parallel layers (at a TP degree of 1 it is an ordinary transformer).
#pragma once

#include <fmt/format.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "runtime/torch/tensor_parallel.h"

namespace rally::examples {

using parallel::ColumnParallelLinear;
using parallel::RowParallelLinear;
namespace nn = ::torch::nn;

struct Config {
  std::int64_t vocab = 256, context = 64, dim = 96, heads = 4, layers = 3;
};

struct BlockImpl : nn::Module {
  BlockImpl(const Config& c, parallel::TpGroup tp)
      : heads(c.heads / tp->size), head_dim(c.dim / c.heads) {
    ln1 = register_module("ln1", nn::LayerNorm(nn::LayerNormOptions({c.dim})));
    ln2 = register_module("ln2", nn::LayerNorm(nn::LayerNormOptions({c.dim})));
    q = register_module("q", ColumnParallelLinear(c.dim, c.dim, tp));
    k = register_module("k", ColumnParallelLinear(c.dim, c.dim, tp));
    v = register_module("v", ColumnParallelLinear(c.dim, c.dim, tp));
    proj = register_module("proj", RowParallelLinear(c.dim, c.dim, tp));
    up = register_module("up", ColumnParallelLinear(c.dim, 4 * c.dim, tp));
    down = register_module("down", RowParallelLinear(4 * c.dim, c.dim, tp));
  }
  ::torch::Tensor forward(const ::torch::Tensor& x) {
    const auto B = x.size(0), T = x.size(1);
    auto h = ln1(x);
    auto split = [&](const ::torch::Tensor& t) {  // [B * heads, T, head_dim]
      return t.view({B, T, heads, head_dim}).transpose(1, 2).reshape({B * heads, T, head_dim});
    };
    auto qh = split(q(h)), kh = split(k(h)), vh = split(v(h));
    // Scaled scores with the causal mask as an additive -inf above the diagonal, in one baddbmm
    // (no separate scaling and masking passes over the [B * heads, T, T] scores).
    auto causal =
        ::torch::full({T, T}, -std::numeric_limits<float>::infinity(), qh.options()).triu(1);
    auto att =
        ::torch::softmax(::torch::baddbmm(causal, qh, kh.transpose(1, 2), /*beta=*/1,
                                          /*alpha=*/1.0 / std::sqrt(static_cast<double>(head_dim))),
                         -1);
    auto y = ::torch::bmm(att, vh)
                 .view({B, heads, T, head_dim})
                 .transpose(1, 2)
                 .reshape({B, T, heads * head_dim});
    auto x1 = x + proj(y);
    return x1 + down(::torch::gelu(up(ln2(x1))));
  }
  std::int64_t heads, head_dim;
  nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  ColumnParallelLinear q{nullptr}, k{nullptr}, v{nullptr}, up{nullptr};
  RowParallelLinear proj{nullptr}, down{nullptr};
};
TORCH_MODULE(Block);

struct GptImpl : nn::Module {
  GptImpl(const Config& c, parallel::TpGroup tp) : cfg(c), tp_(tp) {
    tokens = register_module("tokens", parallel::VocabParallelEmbedding(c.vocab, c.dim, tp));
    positions = register_parameter("positions", ::torch::randn({c.context, c.dim}) * 0.02);
    for (int i = 0; i < c.layers; ++i) {
      blocks.push_back(register_module(fmt::format("block{}", i), Block(c, tp)));
    }
    ln = register_module("ln", nn::LayerNorm(nn::LayerNormOptions({c.dim})));
    head = register_module("head", ColumnParallelLinear(c.dim, c.vocab, tp, /*bias=*/false));
    ::torch::NoGradGuard g;
    tokens->weight.mul_(0.02);
  }
  // Logits of this rank's vocabulary slice, [B, T, vocab_local].
  ::torch::Tensor forward(const ::torch::Tensor& ids) {
    const auto T = ids.size(1);
    auto x = tokens(ids) + positions.narrow(0, 0, T);
    for (auto& b : blocks) x = b(x);
    return head(ln(x));
  }
  ::torch::Tensor loss(const ::torch::Tensor& ids, const ::torch::Tensor& targets) {
    auto logits = forward(ids);
    return parallel::vocabParallelCrossEntropy(logits.reshape({-1, logits.size(-1)}),
                                               targets.reshape({-1}), head->out_begin, *tp_);
  }
  Config cfg;
  parallel::TpGroup tp_;
  parallel::VocabParallelEmbedding tokens{nullptr};
  ::torch::Tensor positions;
  std::vector<Block> blocks;
  nn::LayerNorm ln{nullptr};
  ColumnParallelLinear head{nullptr};
};
TORCH_MODULE(Gpt);

}  // namespace rally::examples
