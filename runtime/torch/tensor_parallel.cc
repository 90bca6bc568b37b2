#include "runtime/torch/tensor_parallel.h"

#include <torch/csrc/autograd/custom_function.h>

#include "runtime/torch/internal/tensor_comm.h"

namespace rally::parallel {
namespace {

using collectives::Communicator;
using collectives::ReduceOp;
using ::torch::Tensor;
using ::torch::autograd::AutogradContext;
using ::torch::autograd::variable_list;

Communicator* commOf(AutogradContext* ctx) {
  return reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
}
void keep(AutogradContext* ctx, Communicator* c) {
  ctx->saved_data["comm"] = reinterpret_cast<std::int64_t>(c);
}

// Forward: the input as it is; backward: the gradients of every TP rank summed (the input was
// used by all of them).
struct CopyToTensorParallel : ::torch::autograd::Function<CopyToTensorParallel> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, Communicator* c) {
    keep(ctx, c);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    Tensor grad = g[0].contiguous().clone();
    internal::allreduceInPlace(*commOf(ctx), grad);
    return {grad, Tensor()};
  }
};

// Forward: the partial results summed; backward: the gradient as it is.
struct ReduceFromTensorParallel : ::torch::autograd::Function<ReduceFromTensorParallel> {
  static Tensor forward(AutogradContext*, const Tensor& x, Communicator* c) {
    Tensor y = x.contiguous().clone();
    internal::allreduceInPlace(*c, y);
    return y;
  }
  static variable_list backward(AutogradContext*, variable_list g) { return {g[0], Tensor()}; }
};

// Forward: every rank's last-dimension slice concatenated (rank r's being partition(total, size,
// r)); backward: this rank's slice.
struct GatherFromTensorParallel : ::torch::autograd::Function<GatherFromTensorParallel> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, Communicator* c,
                        std::int64_t total) {
    keep(ctx, c);
    ctx->saved_data["total"] = total;
    return internal::allgatherLastDim(*c, x, total);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    Communicator* c = commOf(ctx);
    const auto [b, e] = partition(ctx->saved_data["total"].toInt(), c->size(), c->rank());
    return {g[0].narrow(-1, b, e - b).contiguous(), Tensor(), Tensor()};
  }
};

// Forward: the last dimension's slice of this rank; backward: the gradient gathered.
struct ScatterToTensorParallel : ::torch::autograd::Function<ScatterToTensorParallel> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, Communicator* c) {
    keep(ctx, c);
    ctx->saved_data["total"] = x.size(-1);
    const auto [b, e] = partition(x.size(-1), c->size(), c->rank());
    return x.narrow(-1, b, e - b).contiguous();
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {internal::allgatherLastDim(*commOf(ctx), g[0], ctx->saved_data["total"].toInt()),
            Tensor()};
  }
};

struct VocabParallelCrossEntropyFn : ::torch::autograd::Function<VocabParallelCrossEntropyFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets,
                        Communicator* c, std::int64_t begin, std::int64_t end) {
    ::torch::NoGradGuard no_grad;
    Tensor max = std::get<0>(logits.max(-1)).contiguous();
    internal::allreduceInPlace(*c, max, ReduceOp::kMax);
    Tensor shifted = logits - max.unsqueeze(-1);
    Tensor exp = shifted.exp();
    Tensor sum = exp.sum(-1).contiguous();
    internal::allreduceInPlace(*c, sum);
    // The target's logit: from the rank whose slice holds it, 0 from the others.
    Tensor mine = (targets >= begin) & (targets < end);
    Tensor local = (targets - begin).clamp(0, end - begin - 1);
    Tensor target_logit =
        shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine.to(shifted.scalar_type());
    target_logit = target_logit.contiguous();
    internal::allreduceInPlace(*c, target_logit);
    Tensor loss = (sum.log() - target_logit).mean();
    Tensor softmax = exp / sum.unsqueeze(-1);
    ctx->save_for_backward({softmax, local, mine});
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto saved = ctx->get_saved_variables();
    Tensor grad = saved[0].clone();
    const Tensor& local = saved[1];
    const Tensor& mine = saved[2];
    grad.scatter_add_(-1, local.unsqueeze(-1), -mine.to(grad.scalar_type()).unsqueeze(-1));
    grad.mul_(g[0] / static_cast<double>(grad.size(0)));
    return {grad, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

collectives::Communicator& TensorParallelGroup::get() const {
  if (comm == nullptr) {
    throw std::logic_error(fmt::format(
        "rally: tensor-parallel group of {} has no communicator: set it (e.g. to ElasticRun::tp()) "
        "before the first forward",
        size));
  }
  return *comm;
}

std::shared_ptr<TensorParallelGroup> TensorParallelGroup::of(collectives::Communicator& c) {
  return std::make_shared<TensorParallelGroup>(TensorParallelGroup{c.size(), c.rank(), &c});
}

std::pair<std::int64_t, std::int64_t> partition(std::int64_t n, int parts, int rank) {
  const std::int64_t base = n / parts, extra = n % parts;
  const std::int64_t begin = rank * base + std::min<std::int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

ColumnParallelLinearImpl::ColumnParallelLinearImpl(std::int64_t in, std::int64_t out, TpGroup tp,
                                                   bool with_bias, bool gather_output)
    : tp_(std::move(tp)), gather_(gather_output) {
  std::tie(out_begin, out_end) = partition(out, tp_->size, tp_->rank);
  out_total = out;
  // Each rank keeps its slice of the full initial weight, so that a model starts the same
  // whatever the TP degree (the random generator is drawn as for the unsplit layer).
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight = register_parameter("weight", ::torch::empty({out, in})
                                            .uniform_(-bound, bound)
                                            .narrow(0, out_begin, out_end - out_begin)
                                            .clone());
  if (with_bias) {
    bias = register_parameter("bias", ::torch::empty({out})
                                          .uniform_(-bound, bound)
                                          .narrow(0, out_begin, out_end - out_begin)
                                          .clone());
  }
}

::torch::Tensor ColumnParallelLinearImpl::forward(const ::torch::Tensor& x) {
  if (tp_->size == 1) return ::torch::linear(x, weight, bias);  // nothing to share
  Communicator* c = &tp_->get();
  auto y = ::torch::linear(CopyToTensorParallel::apply(x, c), weight, bias);
  return gather_ ? GatherFromTensorParallel::apply(y, c, out_total) : y;
}

RowParallelLinearImpl::RowParallelLinearImpl(std::int64_t in, std::int64_t out, TpGroup tp,
                                             bool with_bias, bool input_is_parallel)
    : tp_(std::move(tp)), input_is_parallel_(input_is_parallel) {
  std::tie(in_begin, in_end) = partition(in, tp_->size, tp_->rank);
  in_total = in;
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight = register_parameter("weight", ::torch::empty({out, in})
                                            .uniform_(-bound, bound)
                                            .narrow(1, in_begin, in_end - in_begin)
                                            .clone());
  if (with_bias) bias = register_parameter("bias", ::torch::empty({out}).uniform_(-bound, bound));
}

::torch::Tensor RowParallelLinearImpl::forward(const ::torch::Tensor& x) {
  if (tp_->size == 1) return ::torch::linear(x, weight, bias);
  Communicator* c = &tp_->get();
  auto in = input_is_parallel_ ? x : ScatterToTensorParallel::apply(x, c);
  auto y = ReduceFromTensorParallel::apply(::torch::linear(in, weight), c);
  return bias.defined() ? y + bias : y;
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(std::int64_t vocab, std::int64_t dim,
                                                       TpGroup tp)
    : tp_(std::move(tp)) {
  std::tie(vocab_begin, vocab_end) = partition(vocab, tp_->size, tp_->rank);
  vocab_total = vocab;
  weight = register_parameter(
      "weight",
      ::torch::randn({vocab, dim}).narrow(0, vocab_begin, vocab_end - vocab_begin).clone());
}

::torch::Tensor VocabParallelEmbeddingImpl::forward(const ::torch::Tensor& ids) {
  if (tp_->size == 1) return ::torch::embedding(weight, ids);
  auto mine = (ids >= vocab_begin) & (ids < vocab_end);
  auto local = (ids - vocab_begin).clamp(0, vocab_end - vocab_begin - 1);
  auto rows = ::torch::embedding(weight, local) * mine.unsqueeze(-1).to(weight.scalar_type());
  return ReduceFromTensorParallel::apply(rows, &tp_->get());
}

::torch::Tensor gatherFromTensorParallel(const ::torch::Tensor& x, std::int64_t total,
                                         const TensorParallelGroup& tp) {
  if (tp.size == 1) return x;
  const auto [b, e] = partition(total, tp.size, tp.rank);
  if (x.size(-1) != e - b) {
    throw std::invalid_argument(
        fmt::format("gatherFromTensorParallel: rank {} of {} holds {} of the last dimension's {}; "
                    "partition() gives it {}",
                    tp.rank, tp.size, x.size(-1), total, e - b));
  }
  return GatherFromTensorParallel::apply(x, &tp.get(), total);
}

::torch::Tensor vocabParallelCrossEntropy(const ::torch::Tensor& logits,
                                          const ::torch::Tensor& targets, std::int64_t vocab_begin,
                                          const TensorParallelGroup& tp) {
  if (tp.size == 1) return ::torch::nn::functional::cross_entropy(logits, targets);
  return VocabParallelCrossEntropyFn::apply(logits, targets, &tp.get(), vocab_begin,
                                            vocab_begin + logits.size(-1));
}

}  // namespace rally::parallel
