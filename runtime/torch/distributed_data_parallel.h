// Data parallelism for a libtorch module, in the manner of PyTorch's DDP: every rank holds the
// whole model and trains on its own part of the batch; the gradients are averaged across ranks
// during the backward pass. Gradients are packed into buckets (DdpOptions::bucket_bytes, in the
// reverse order of registration, roughly the order backward produces them); a bucket's allreduce
// starts from the autograd hooks as soon as its last gradient is ready, so communication overlaps
// the rest of the backward pass; when backward ends, the averaged gradients are written into
// each parameter's .grad. Parameters and buffers are broadcast from rank 0 at construction (and by
// broadcastParameters(), after a recovery).
//
//   auto model = std::make_shared<Net>();
//   rally::parallel::DistributedDataParallel ddp(model, world->comm());
//   torch::optim::SGD opt(model->parameters(), 0.1);
//   for (auto& batch : my_shard) {
//     opt.zero_grad();
//     loss_fn(model->forward(batch.x), batch.y).backward();  // averaged across ranks on return
//     RALLY_RETURN_IF_ERROR(ddp.status());                  // a collective's error, if any
//     opt.step();
//   }
//
// Averaging scales each reduced f32/f16/bf16 bucket by 1/world size and checks it for NaN and
// infinity in the same pass (rally's kernels: kernels/ops/kernels.h; f64 buckets with torch
// operations), so gradientsFinite() costs nothing extra; with setLossScale() the same pass also
// divides out a mixed-precision loss scale:
//
//   RALLY_RETURN_IF_ERROR(ddp.setLossScale(scale));
//   (loss * scale).backward();
//   if (ddp.gradientsFinite()) { opt.step(); } else { scale /= 2; }  // the same on every rank
//
// With DdpOptions::compression = kBf16, f32 buckets travel as bf16 (half the bytes) with error
// feedback.
//
// Gradient accumulation: backward passes made while a NoSync guard lives only accumulate locally;
// the next backward without it averages the accumulated gradients. Unused parameters: with
// find_unused_parameters, a parameter that received no gradient in a backward pass contributes
// zeros (another rank may have used it); without it, such a pass is an error naming the
// parameter, as in PyTorch.
//
// One gradient per parameter per pass: a bucket is reduced once each of its parameters has had
// its gradient, so a parameter whose gradient is accumulated twice in one backward pass (a backward
// inside a backward that uses it again, as hand-written activation checkpointing does when a
// checkpointed segment shares a parameter with the rest of the model) makes the pass an error
// naming it, as in PyTorch (whose static_graph option has no counterpart here). A backward inside
// a backward is otherwise fine: the pass ends with the outermost backward that gave it a gradient.
// If only nested ones did, it ends with the first of those after which every parameter has one
// (a later gradient from a backward around it is a second one; one from another nested backward
// as deep starts the next pass), or, if a parameter got none, at the next status() or
// gradientsFinite() after the backward. So with reentrant checkpointing call status() after each
// backward, on every rank (ending a pass may reduce buckets), as the loop above does.
//
// Thread-safety: one training thread; the hooks run on the autograd thread of that backward.
// Cross-rank contract: every rank runs the same number of synchronised backward passes, with the
// same parameters, registered in the same order.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "kernels/base/status.h"
#include "kernels/ops/kernels.h"

namespace torch::autograd {
struct Node;
}

namespace rally::parallel {

// How a bucket of f32 gradients travels in the allreduce.
enum class GradientCompression {
  kNone,
  // As bf16, half the bytes, with error feedback: what rounding to bf16 loses on this rank is kept
  // and added to the next pass's gradients, so over many steps nothing of this rank's gradients
  // is lost. (The rounding of the bf16 sums inside the reduction is not fed back.) Each f32
  // bucket gets a residual (f32) and a bf16 copy. Buckets of other dtypes travel as they are.
  kBf16,
};

struct DdpOptions {
  size_t bucket_bytes = 25u << 20;       // PyTorch's default
  size_t first_bucket_bytes = 1u << 20;  // smaller, so that communication starts early (PyTorch's)
  bool find_unused_parameters = false;
  bool broadcast_at_start = true;
  // Each parameter's .grad aliases its part of its bucket (PyTorch's gradient_as_bucket_view): no
  // second copy of the gradients, and no copies between .grad and the buckets. (An alias with
  // storage of its own, not an autograd view, so Optimizer::zero_grad() works on it.) Autograd then
  // accumulates into the bucket, and the bucket is reduced once its gradients are accumulated.
  // A .grad replaced by the user (set to none, or assigned) is copied back into the bucket and
  // made the view again at the next backward.
  bool gradient_as_bucket_view = false;
  GradientCompression compression = GradientCompression::kNone;
  Milliseconds timeout{600'000};  // waiting for one bucket's allreduce
};

class DistributedDataParallel {
 public:
  DistributedDataParallel(std::shared_ptr<::torch::nn::Module> module,
                          collectives::Communicator& comm, DdpOptions options = {});
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  // Collective: every parameter and buffer from rank 0 to every rank.
  Status broadcastParameters();
  // After a recovery: the new world's communicator (then broadcastParameters(), or restore the
  // parameters from a commit).
  void setCommunicator(collectives::Communicator& comm) { comm_ = &comm; }

  // The outcome of the last synchronised backward pass (a collective's error, an unused
  // parameter), OK otherwise. Backward itself cannot return it. Not const: a pass that only
  // backward passes nested in the backward gave gradients to may end here (see above).
  Status status() {
    settle();
    return status_;
  }

  // Mixed-precision loss scaling: the loss was multiplied by `scale` before backward, so the
  // averaged gradients are divided by it as well, in the pass that averages them (PyTorch's
  // GradScaler.unscale_). 1 until set; InvalidArgument unless positive and finite. With bf16
  // compression the residuals, which are in the scaled units, are rescaled with it.
  Status setLossScale(float scale);
  // Whether every averaged gradient of the last synchronised backward pass is finite (no NaN, no
  // infinity), after the loss scale is divided out; false too if that pass failed (status()).
  // The same on every rank: it is checked on the reduced values. With bf16 compression a NaN or
  // infinity resets its element's residual, so it spoils that pass only.
  bool gradientsFinite() {
    settle();
    return finite_;
  }

  // While alive, backward passes accumulate gradients locally, without communication.
  class NoSync {
   public:
    explicit NoSync(DistributedDataParallel& d) : d_(d) { ++d_.no_sync_; }
    ~NoSync() { --d_.no_sync_; }
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;

   private:
    DistributedDataParallel& d_;
  };

  struct Stats {
    int buckets = 0;
    double comm_ms = 0;           // allreduce time in the last synchronised backward
    double overlap_fraction = 0;  // of comm_ms, the part done before backward ended
  };
  Stats lastStats() const { return stats_; }
  const ::torch::nn::Module& module() const { return *module_; }

 private:
  struct Param {
    ::torch::Tensor tensor;
    std::string name;
    int bucket = 0;
    std::int64_t offset = 0;  // elements into the bucket
  };
  struct Bucket {
    ::torch::Tensor flat;
    collectives::DataType type = collectives::DataType::kF32;
    ::torch::Tensor residual, bf16;  // GradientCompression::kBf16 on an f32 bucket
    std::vector<int> params;
    int pending = 0;
    std::shared_ptr<collectives::Work> work;
    std::chrono::steady_clock::time_point launched;
  };
  void onGradient(int index, const ::torch::Tensor& grad);
  void onAccumulated(int index);  // gradient_as_bucket_view: after autograd accumulated .grad
  ::torch::Tensor slotOf(const Param& p) const;
  void pointGradAtBucket(Param& p);
  void launch(Bucket& b);
  // A reduced bucket: decompressed if it travelled as bf16, divided by `divisor`, checked for
  // finiteness (*finite; with the kernels the check is queued, and finishBackward reads it once
  // for every bucket).
  Status average(Bucket& b, double divisor, bool* finite);
  Status broadcastAll();
  void finishBackward();
  void beginBackward();
  // From every hook of a pass: makes sure finishBackward will run when the pass's backward ends
  // (see the .cc).
  void queueFinish();
  // The start of both hooks: whether parameter `index`'s gradient is counted into its bucket
  // (not under no_sync, nor a second one: the pass fails for that).
  bool countGradient(int index);
  // status() and gradientsFinite(), outside any backward: the backward has returned. Ends a pass
  // left open by nested backward passes (which may reduce buckets: every rank calls it), and
  // closes the window in which a gradient is a second one of a pass that ended inside a nested
  // backward. Nothing when called inside a backward (a hook, a custom function).
  void settle();

  std::shared_ptr<::torch::nn::Module> module_;
  collectives::Communicator* comm_;
  DdpOptions options_;
  std::unique_ptr<kernels::Kernels> kernels_;  // averaging, checking and compressing buckets
  float loss_scale_ = 1.0f;
  bool finite_ = true;
  std::vector<Param> params_;
  std::vector<unsigned> hooks_;  // per parameter, removed on destruction
  // gradient_as_bucket_view: each parameter's gradient accumulator (held, so that autograd keeps
  // using it and its hook) and the key of the post hook on it.
  std::vector<std::shared_ptr<::torch::autograd::Node>> accumulators_;
  std::vector<std::uintptr_t> post_hooks_;
  std::vector<Bucket> buckets_;
  std::vector<bool> ready_;
  std::vector<std::string> repeated_;  // parameters with a second gradient in this pass
  bool in_backward_ = false;
  bool finish_queued_ = false;           // on the outermost backward of this pass
  const void* nested_queued_ = nullptr;  // the nested backward a conditional finish waits on
  int ended_depth_ = 0;  // > 0: the last pass ended inside a backward nested this deep
  int no_sync_ = 0;
  Status status_;
  Status init_status_;       // what construction found wrong; every backward pass reports it
  Status broadcast_status_;  // the last broadcastParameters(); every backward pass reports it
  Stats stats_;
  std::chrono::steady_clock::time_point backward_started_;
};

}  // namespace rally::parallel
