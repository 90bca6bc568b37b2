// Megatron-style tensor parallelism for libtorch: layers whose weights are split across the ranks
// of a tensor-parallel communicator, with the collectives inside autograd functions, so forward
// and backward match the unsplit layers:
//   - ColumnParallelLinear: weight rows (output features) split; input replicated; the output
//     stays split (for a RowParallelLinear next) or is gathered;
//   - RowParallelLinear: weight columns (input features) split; input split; the partial outputs
//     are summed (allreduce) and the bias added once;
//   - VocabParallelEmbedding: vocabulary rows split; each rank looks up its rows, the others add 0;
//   - vocabParallelCrossEntropy: the loss of logits split along the vocabulary, without gathering
//     them (max, sum of exponentials and the target logit are reduced instead).
//
//   auto grid = collectives::makeGrid(world->comm(), /*tp_size=*/2);
//   ColumnParallelLinear up(1024, 4096, *grid->tp);
//   RowParallelLinear down(4096, 1024, *grid->tp);
//   auto y = down->forward(torch::gelu(up->forward(x)));
//
// Each rank's slice of a weight is the one its TP rank owns in the full weight (the first n % T
// ranks one row longer): the layers record where (out_begin, in_begin, vocab_begin), for
// checkpoints (registerModule) and for loading a full weight. Initialisation draws the full
// weight and keeps the slice, so a model seeded alike starts the same at any TP degree.
// A failure of a peer inside forward or backward throws collectives::CollectiveError with its
// Status (ElasticRun::run catches it and recovers in place).
//
// Thread-safety: one thread per layer instance. Every rank of the TP communicator runs the same
// layers in the same order.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <utility>

#include "collectives/communicator.h"

namespace rally::parallel {

// Rows [begin, end) of n for part `rank` of `parts` (the first n % parts parts one longer).
std::pair<std::int64_t, std::int64_t> partition(std::int64_t n, int parts, int rank);

// The tensor-parallel group a model's layers share: its size and this rank's place in it fix
// each layer's slice; the communicator may change (a recovery re-forms the group: set `comm` to
// the new one, e.g. ElasticRun::tp(), before the next forward).
struct TensorParallelGroup {
  int size = 1;
  int rank = 0;
  collectives::Communicator* comm = nullptr;
  // The communicator; throws std::logic_error when none is set and size > 1.
  collectives::Communicator& get() const;
  static std::shared_ptr<TensorParallelGroup> of(collectives::Communicator& comm);
};
using TpGroup = std::shared_ptr<TensorParallelGroup>;

class ColumnParallelLinearImpl : public ::torch::nn::Module {
 public:
  ColumnParallelLinearImpl(std::int64_t in, std::int64_t out, TpGroup tp, bool bias = true,
                           bool gather_output = false);
  ColumnParallelLinearImpl(std::int64_t in, std::int64_t out, collectives::Communicator& tp,
                           bool bias = true, bool gather_output = false)
      : ColumnParallelLinearImpl(in, out, TensorParallelGroup::of(tp), bias, gather_output) {}
  ::torch::Tensor forward(const ::torch::Tensor& x);
  ::torch::Tensor weight, bias;  // [out_local, in], [out_local]
  std::int64_t out_begin = 0, out_end = 0, out_total = 0;

 private:
  TpGroup tp_;
  bool gather_;
};
TORCH_MODULE(ColumnParallelLinear);

class RowParallelLinearImpl : public ::torch::nn::Module {
 public:
  RowParallelLinearImpl(std::int64_t in, std::int64_t out, TpGroup tp, bool bias = true,
                        bool input_is_parallel = true);
  RowParallelLinearImpl(std::int64_t in, std::int64_t out, collectives::Communicator& tp,
                        bool bias = true, bool input_is_parallel = true)
      : RowParallelLinearImpl(in, out, TensorParallelGroup::of(tp), bias, input_is_parallel) {}
  ::torch::Tensor forward(const ::torch::Tensor& x);
  ::torch::Tensor weight, bias;  // [out, in_local], [out]
  std::int64_t in_begin = 0, in_end = 0, in_total = 0;

 private:
  TpGroup tp_;
  bool input_is_parallel_;
};
TORCH_MODULE(RowParallelLinear);

class VocabParallelEmbeddingImpl : public ::torch::nn::Module {
 public:
  VocabParallelEmbeddingImpl(std::int64_t vocab, std::int64_t dim, TpGroup tp);
  VocabParallelEmbeddingImpl(std::int64_t vocab, std::int64_t dim, collectives::Communicator& tp)
      : VocabParallelEmbeddingImpl(vocab, dim, TensorParallelGroup::of(tp)) {}
  ::torch::Tensor forward(const ::torch::Tensor& ids);
  ::torch::Tensor weight;  // [vocab_local, dim]
  std::int64_t vocab_begin = 0, vocab_end = 0, vocab_total = 0;

 private:
  TpGroup tp_;
};
TORCH_MODULE(VocabParallelEmbedding);

// The full last dimension (`total` long) from every TP rank's slice of it, rank r holding
// partition(total, size, r): e.g. a ColumnParallelLinear's output, or the vocabulary logits to
// sample from. Differentiable (the gradient of a slice is its part of the full gradient). At a TP
// size of 1, `x` itself.
::torch::Tensor gatherFromTensorParallel(const ::torch::Tensor& x, std::int64_t total,
                                         const TensorParallelGroup& tp);

// Mean cross-entropy of `logits` [N, vocab_local] (this rank's vocabulary slice, starting at
// global id `vocab_begin`, as a ColumnParallelLinear without gathering produces: its out_begin)
// against `targets` [N] (global ids).
::torch::Tensor vocabParallelCrossEntropy(const ::torch::Tensor& logits,
                                          const ::torch::Tensor& targets, std::int64_t vocab_begin,
                                          const TensorParallelGroup& tp);
inline ::torch::Tensor vocabParallelCrossEntropy(const ::torch::Tensor& logits,
                                                 const ::torch::Tensor& targets,
                                                 std::int64_t vocab_begin,
                                                 collectives::Communicator& tp) {
  return vocabParallelCrossEntropy(logits, targets, vocab_begin, *TensorParallelGroup::of(tp));
}

}  // namespace rally::parallel
