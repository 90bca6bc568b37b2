#include "runtime/torch/distributed_data_parallel.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <optional>

#include "kernels/ops/cuda_kernels.h"
#include "runtime/torch/internal/tensor_comm.h"

namespace rally::parallel {
namespace {

using collectives::DataType;
using collectives::ReduceOp;
using Clock = std::chrono::steady_clock;

// Gradients are averaged: floating-point parameters only (tensor_comm.h maps the types).
Result<DataType> rallyType(::torch::ScalarType t) {
  if (!c10::isFloatingType(t)) {
    return invalidArgument(
        fmt::format("DistributedDataParallel: a parameter of dtype {} cannot "
                    "be averaged (f32, f64, f16 or bf16)",
                    c10::toString(t)));
  }
  return internal::rallyType(t);
}

// The backward pass the calling hook runs in: its identity, and how many backward passes it is
// nested in (0 for one that training code started; 1 or more for one started inside a backward,
// as reentrant activation checkpointing does). libtorch gives no direct way to the depth: it is
// read from the current GraphTask, found around the member whose address libtorch does return.
struct GraphTaskAt {
  const void* id = nullptr;
  int depth = 0;
};
GraphTaskAt currentGraphTask() {
  const auto* nodes = ::torch::autograd::get_current_graph_task_nodes_in_graph();
  if (nodes == nullptr) return {};
  using ::torch::autograd::GraphTask;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"  // GraphTask is not standard-layout
  const auto* task = reinterpret_cast<const GraphTask*>(reinterpret_cast<const char*>(nodes) -
                                                        offsetof(GraphTask, nodes_in_graph_));
#pragma GCC diagnostic pop
  // Checked against another member whose address libtorch returns, in case the headers built
  // against are not the library's: then every backward counts as the outermost, as before nested
  // ones were told apart.
  const int depth = task->reentrant_depth_;
  if (::torch::autograd::get_current_graph_task_exec_info() != &task->exec_info_ || depth < 0 ||
      depth > (1 << 16)) {
    return {task, 0};
  }
  return {task, depth};
}

// Parameters that received more than one gradient in one backward pass.
Status repeatedGradients(std::vector<std::string> names) {
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return failedPrecondition(fmt::format(
      "DistributedDataParallel: parameter(s) {} received more than one gradient in this backward "
      "pass (a backward inside the backward used them again, as activation checkpointing does "
      "when a checkpointed segment shares a parameter with the rest of the model); their buckets "
      "are reduced after the first, so the average would miss the others. Give each parameter one "
      "gradient per pass: keep a shared parameter wholly inside or wholly outside the "
      "checkpointed segments",
      fmt::join(names, ", ")));
}

// The kernels' dtype for a bucket's, if they have it (not f64).
std::optional<kernels::DType> kernelType(DataType t) {
  switch (t) {
    case DataType::kF32:
      return kernels::DType::kF32;
    case DataType::kF16:
      return kernels::DType::kF16;
    case DataType::kBF16:
      return kernels::DType::kBF16;
    default:
      return std::nullopt;
  }
}

// The kernels for buckets on `device`: the CPU references for host tensors, the CUDA kernels on
// the tensor's device otherwise ("cuda" without an index: device 0).
Result<std::unique_ptr<kernels::Kernels>> kernelsOn(const ::torch::Device& device) {
  if (device.is_cpu()) return kernels::cpuKernels();
  if (device.is_cuda()) {
    auto k = kernels::cudaKernels({.device = device.has_index() ? device.index() : 0});
    if (!k.ok()) {
      Status s = k.status();
      s.addContext(fmt::format("DistributedDataParallel: parameters on {}", device.str()));
      return s;
    }
    return k;
  }
  return invalidArgument(fmt::format(
      "DistributedDataParallel: parameters on {} (expected CPU or CUDA tensors)", device.str()));
}

double msBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Runs after a parameter's AccumulateGrad node, i.e. once its .grad holds this pass's gradient.
struct AfterAccumulation final : ::torch::autograd::FunctionPostHook {
  explicit AfterAccumulation(std::function<void()> f) : f_(std::move(f)) {}
  ::torch::autograd::variable_list operator()(
      const ::torch::autograd::variable_list& outputs,
      const ::torch::autograd::variable_list& inputs) override {
    // Autograd also runs an accumulator that got no gradient (an undefined one: a custom function
    // that gave none for this input, as a recomputing one does while a backward inside it gives
    // the gradient): nothing was accumulated then.
    if (!inputs.empty() && inputs[0].defined()) f_();
    return outputs;
  }
  std::function<void()> f_;
};

}  // namespace

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<::torch::nn::Module> module,
                                                 collectives::Communicator& comm,
                                                 DdpOptions options)
    : module_(std::move(module)), comm_(&comm), options_(options) {
  // Parameters in reverse order of registration: the order backward roughly produces them.
  auto named = module_->named_parameters(/*recurse=*/true);
  for (auto it = named.end(); it != named.begin();) {
    --it;
    if (!it->value().requires_grad()) continue;
    params_.push_back({it->value(), it->key(), 0, 0});
  }
  // Buckets: consecutive parameters of one dtype, up to bucket_bytes each; each bucket's memory
  // is allocated once its members are known.
  std::vector<std::int64_t> numel;  // per bucket
  for (int i = 0; i < static_cast<int>(params_.size()); ++i) {
    Param& p = params_[i];
    const auto type = rallyType(p.tensor.scalar_type());
    if (!type.ok()) {
      status_ = type.status();
      continue;
    }
    const size_t bytes = static_cast<size_t>(p.tensor.numel()) * p.tensor.element_size();
    Bucket* b = buckets_.empty() ? nullptr : &buckets_.back();
    const size_t cap = buckets_.size() <= 1 ? options_.first_bucket_bytes : options_.bucket_bytes;
    if (b == nullptr || b->type != *type ||
        (numel.back() > 0 && static_cast<size_t>(numel.back()) * b->flat.element_size() + bytes >
                                 std::min(cap, options_.bucket_bytes))) {
      Bucket fresh;
      fresh.flat = ::torch::empty({0}, p.tensor.options().requires_grad(false));
      fresh.type = *type;
      buckets_.push_back(std::move(fresh));
      numel.push_back(0);
      b = &buckets_.back();
    }
    p.bucket = static_cast<int>(buckets_.size()) - 1;
    p.offset = numel.back();
    numel.back() += p.tensor.numel();
    b->params.push_back(i);
  }
  for (size_t i = 0; i < buckets_.size(); ++i) {
    Bucket& b = buckets_[i];
    b.flat = ::torch::empty({numel[i]}, b.flat.options());
    if (options_.compression == GradientCompression::kBf16 && b.type == DataType::kF32) {
      b.residual = ::torch::zeros_like(b.flat);
      b.bf16 = ::torch::empty({numel[i]}, b.flat.options().dtype(::torch::kBFloat16));
    }
  }
  // One device for every parameter (one device per process, as in PyTorch's DDP), and rally's
  // kernels for it. Without them (a CUDA device in a build without the CUDA toolkit) buckets are
  // averaged and checked with torch operations, and compression is refused.
  const ::torch::Device device =
      params_.empty() ? ::torch::Device(::torch::kCPU) : params_.front().tensor.device();
  for (const Param& p : params_) {
    if (p.tensor.device() != device && status_.ok()) {
      status_ = invalidArgument(fmt::format(
          "DistributedDataParallel: parameter {} is on {} and {} on {}; every parameter must be "
          "on one device (one device per process)",
          params_.front().name, device.str(), p.name, p.tensor.device().str()));
    }
  }
  // What is wrong so far is the model's, the same on every rank: then nothing is broadcast.
  const bool model_ok = status_.ok();
  auto k = kernelsOn(device);
  if (k.ok()) {
    kernels_ = std::move(*k);
  } else if (options_.compression != GradientCompression::kNone && status_.ok()) {
    status_ = k.status();
    status_.addContext("DistributedDataParallel: bf16 compression needs rally's kernels");
  }
  init_status_ = status_;
  ready_.assign(params_.size(), false);
  stats_.buckets = static_cast<int>(buckets_.size());
  for (int i = 0; i < static_cast<int>(params_.size()); ++i) {
    if (options_.gradient_as_bucket_view) {
      pointGradAtBucket(params_[i]);
      auto acc = ::torch::autograd::impl::grad_accumulator(params_[i].tensor);
      post_hooks_.push_back(
          acc->add_post_hook(std::make_unique<AfterAccumulation>([this, i] { onAccumulated(i); })));
      accumulators_.push_back(std::move(acc));
      continue;
    }
    hooks_.push_back(params_[i].tensor.register_hook([this, i](::torch::Tensor grad) {
      onGradient(i, grad);
      return grad;
    }));
  }
  // Broadcast even if this rank alone found something wrong (its kernels): every rank must run
  // the same collectives. A model that is wrong (dtypes, devices) is wrong on every rank.
  if (options_.broadcast_at_start && model_ok) {
    const Status s = broadcastParameters();
    if (status_.ok()) status_ = s;
  }
}

DistributedDataParallel::~DistributedDataParallel() {
  // The module outlives this object (a new one may be made after a recovery): its parameters
  // must not call into a dead one.
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].tensor.remove_hook(hooks_[i]);
  for (size_t i = 0; i < accumulators_.size(); ++i) accumulators_[i]->del_post_hook(post_hooks_[i]);
  // Reductions still in flight must not write into freed buckets.
  for (Bucket& b : buckets_) {
    if (b.work) (void)b.work->wait(options_.timeout);
  }
}

Status DistributedDataParallel::broadcastParameters() {
  broadcast_status_ = broadcastAll();
  return broadcast_status_;
}

Status DistributedDataParallel::broadcastAll() {
  ::torch::NoGradGuard no_grad;
  std::vector<::torch::Tensor> all;
  for (const auto& p : module_->parameters()) all.push_back(p);
  for (const auto& b : module_->buffers()) all.push_back(b);
  for (::torch::Tensor& t : all) {
    if (!t.is_contiguous()) {
      return invalidArgument("DistributedDataParallel: parameters must be contiguous");
    }
    RALLY_ASSIGN_OR_RETURN(const DataType type, rallyType(t.scalar_type()));
    RALLY_RETURN_IF_ERROR(internal::followTorchStream(*comm_, t))
        << "DistributedDataParallel: broadcasting the parameters from rank 0";
    RALLY_RETURN_IF_ERROR(comm_->broadcast(t.data_ptr(), static_cast<size_t>(t.numel()), type, 0)
                              ->wait(options_.timeout))
        << "DistributedDataParallel: broadcasting the parameters from rank 0";
  }
  return okStatus();
}

void DistributedDataParallel::beginBackward() {
  in_backward_ = true;
  backward_started_ = Clock::now();
  std::fill(ready_.begin(), ready_.end(), false);
  repeated_.clear();
  for (Bucket& b : buckets_) {
    b.pending = static_cast<int>(b.params.size());
    b.work.reset();
  }
  status_ = !init_status_.ok() ? init_status_ : broadcast_status_;
  finish_queued_ = false;
  nested_queued_ = nullptr;
}

// finishBackward runs once the backward is done (every gradient accumulated into .grad): a callback
// queued on the backward a hook runs in runs when that backward ends. A backward started inside
// a backward (reentrant activation checkpointing) ends before the outer one, which may still have
// gradients to give: so the finish is queued on the outermost backward that runs a hook, and a
// nested one, until the outermost has run one, gets a conditional finish, which finishes only if
// every parameter has its gradient by then (else a later hook queues another).
void DistributedDataParallel::queueFinish() {
  if (finish_queued_) return;
  const GraphTaskAt task = currentGraphTask();
  auto& engine = ::torch::autograd::Engine::get_default_engine();
  if (task.depth == 0) {
    finish_queued_ = true;
    engine.queue_callback([this] { finishBackward(); });
    return;
  }
  if (task.id == nested_queued_) return;
  nested_queued_ = task.id;
  engine.queue_callback([this] {
    nested_queued_ = nullptr;
    if (finish_queued_ || !in_backward_) return;  // the outermost will finish
    if (std::all_of(ready_.begin(), ready_.end(), [](bool r) { return r; })) {
      finishBackward();
      // A later gradient from a backward around this one is a second one (countGradient).
      ended_depth_ = currentGraphTask().depth;
    }
    // Else the pass stays open: a later hook queues another finish, or settle() ends it.
  });
}

void DistributedDataParallel::settle() {
  // Called from a hook or a custom function inside a backward: that backward is not over.
  if (::torch::autograd::get_current_graph_task_nodes_in_graph() != nullptr) return;
  // The training loop looks at the pass, so the backward that gave its gradients has returned.
  ended_depth_ = 0;
  // Open with no finish queued: only nested backward passes gave it gradients, the last of them
  // ended without every parameter's, and no backward is left to give more.
  if (in_backward_ && !finish_queued_ && nested_queued_ == nullptr) finishBackward();
}

bool DistributedDataParallel::countGradient(int index) {
  if (no_sync_ > 0) return false;  // accumulated locally
  const Param& p = params_[index];
  if (!in_backward_ && ended_depth_ > 0) {
    if (currentGraphTask().depth < ended_depth_) {
      // The pass ended inside a nested backward, once every parameter had its gradient: this
      // one comes from a backward around that one, still running. A second gradient of that
      // pass, which its buckets did not include.
      repeated_.push_back(p.name);
      status_ = repeatedGradients(repeated_);
      finite_ = false;
      return false;
    }
    ended_depth_ = 0;  // as deep: the next pass's (or a sibling's: see the header)
  }
  if (!in_backward_) beginBackward();
  queueFinish();
  if (ready_[index]) {  // its bucket may be in flight already: the pass fails (finishBackward)
    repeated_.push_back(p.name);
    return false;
  }
  ready_[index] = true;
  return true;
}

void DistributedDataParallel::onGradient(int index, const ::torch::Tensor& grad) {
  if (!countGradient(index)) return;
  Param& p = params_[index];
  Bucket& b = buckets_[p.bucket];
  // What .grad will hold once this gradient is accumulated (earlier no_sync passes included).
  ::torch::NoGradGuard no_grad;
  auto slot = b.flat.narrow(0, p.offset, p.tensor.numel()).view_as(p.tensor);
  if (p.tensor.grad().defined()) {
    ::torch::add_out(slot, p.tensor.grad(), grad);
  } else {
    slot.copy_(grad);
  }
  if (--b.pending == 0) launch(b);
}

::torch::Tensor DistributedDataParallel::slotOf(const Param& p) const {
  return buckets_[p.bucket].flat.narrow(0, p.offset, p.tensor.numel()).view_as(p.tensor);
}

void DistributedDataParallel::pointGradAtBucket(Param& p) {
  // An alias of the slot with storage of its own rather than a view of the bucket: libtorch's
  // Optimizer::zero_grad() calls detach_(), which autograd refuses on views. The deleter holds
  // the bucket, so the memory lives as long as the gradient does.
  const ::torch::Tensor& flat = buckets_[p.bucket].flat;
  auto* data = static_cast<char*>(flat.data_ptr()) + p.offset * flat.element_size();
  auto slot = ::torch::from_blob(
      data, p.tensor.sizes(), [keep = flat](void*) {}, flat.options());
  const ::torch::Tensor& grad = p.tensor.grad();
  if (grad.defined() && grad.numel() > 0 && grad.data_ptr() == slot.data_ptr()) return;
  ::torch::NoGradGuard no_grad;
  if (grad.defined()) {
    slot.copy_(grad);
  } else {
    slot.zero_();
  }
  p.tensor.mutable_grad() = slot;
}

void DistributedDataParallel::onAccumulated(int index) {
  Param& p = params_[index];
  pointGradAtBucket(p);               // normally .grad is the slot already
  if (!countGradient(index)) return;  // no_sync: accumulated locally, in the bucket
  Bucket& b = buckets_[p.bucket];
  if (--b.pending == 0) launch(b);
}

void DistributedDataParallel::launch(Bucket& b) {
  b.launched = Clock::now();
  const auto n = static_cast<size_t>(b.flat.numel());
  const auto failed = [&](const Status& s) {  // still reduce: every rank must, in step
    if (!s.ok() && status_.ok()) status_ = s;
  };
  if (!b.bf16.defined() || kernels_ == nullptr) {
    // On a GPU the bucket's gradients come from kernels autograd queued on torch's stream, which
    // the communicator's stream does not follow by itself. (A bf16 bucket without kernels, whose
    // construction failed and status_ says so, goes as it is: every rank runs the same
    // collectives.)
    failed(internal::followTorchStream(*comm_, b.flat));
    b.work = b.bf16.defined()
                 ? comm_->allreduce(b.bf16.data_ptr(), n, DataType::kBF16, ReduceOp::kSum)
                 : comm_->allreduce(b.flat.data_ptr(), n, b.type, ReduceOp::kSum);
    return;
  }
  // Compressed on every rank alike. On a GPU: torch's stream, then the kernels' (the compression
  // reads the gradients), then the communicator's (the allreduce reads the bf16 copy), each
  // following the one before on the device through one event, recorded on each in turn; the
  // host waits for none of them. On the CPU the compression is done when it returns.
  const auto compress = [&] {
    return kernels_->compressBf16(static_cast<const float*>(b.flat.data_ptr()),
                                  static_cast<float*>(b.residual.data_ptr()),
                                  static_cast<std::uint16_t*>(b.bf16.data_ptr()), n);
  };
  if (b.flat.is_cuda()) {
    failed(internal::afterTorchStream(b.flat, [&](void* event) -> Status {
      RALLY_RETURN_IF_ERROR(kernels_->waitForEvent(event));
      RALLY_RETURN_IF_ERROR(compress());
      RALLY_RETURN_IF_ERROR(kernels_->recordEvent(event));
      return comm_->waitForEvent(event);
    }));
  } else {
    failed(compress());
  }
  b.work = comm_->allreduce(b.bf16.data_ptr(), n, DataType::kBF16, ReduceOp::kSum);
}

Status DistributedDataParallel::setLossScale(float scale) {
  if (!(scale > 0.0f) || !std::isfinite(scale)) {
    return invalidArgument(fmt::format(
        "DistributedDataParallel::setLossScale({}): the scale must be positive and finite (1 for "
        "no loss scaling)",
        scale));
  }
  // The residuals are in the units of the scaled gradients: rescale them with the loss.
  ::torch::NoGradGuard no_grad;
  for (Bucket& b : buckets_) {
    if (b.residual.defined()) b.residual.mul_(static_cast<double>(scale) / loss_scale_);
  }
  loss_scale_ = scale;
  return okStatus();
}

Status DistributedDataParallel::average(Bucket& b, double divisor, bool* finite) {
  const auto n = static_cast<size_t>(b.flat.numel());
  const auto type = kernelType(b.type);
  if (kernels_ == nullptr || !type) {  // f64, or no kernels for this device: torch operations
    b.flat.div_(divisor);
    *finite = ::torch::isfinite(b.flat).all().item<bool>();
    return okStatus();
  }
  if (b.bf16.defined()) {
    RALLY_RETURN_IF_ERROR(
        kernels_->decompressBf16(static_cast<const std::uint16_t*>(b.bf16.data_ptr()),
                                 static_cast<float*>(b.flat.data_ptr()), n))
        << "DistributedDataParallel: decompressing a bucket";
  }
  // Queued: whether every result is finite is read once for all buckets (finishBackward).
  RALLY_RETURN_IF_ERROR(
      kernels_->scaleAndCheckAsync(b.flat.data_ptr(), n, *type, static_cast<float>(1.0 / divisor)))
      << "DistributedDataParallel: averaging a bucket";
  *finite = true;
  return okStatus();
}

void DistributedDataParallel::finishBackward() {
  in_backward_ = false;
  finite_ = false;  // until every bucket is averaged and checked
  const auto ended = Clock::now();
  // Parameters that got no gradient in this pass.
  std::vector<std::string> unused;
  for (int i = 0; i < static_cast<int>(params_.size()); ++i) {
    if (ready_[i]) continue;
    if (!options_.find_unused_parameters) {
      unused.push_back(params_[i].name);
      continue;
    }
    Param& p = params_[i];
    Bucket& b = buckets_[p.bucket];
    if (options_.gradient_as_bucket_view) {
      pointGradAtBucket(p);  // the slot holds what earlier no_sync passes accumulated
    } else {
      ::torch::NoGradGuard no_grad;
      auto slot = b.flat.narrow(0, p.offset, p.tensor.numel());
      if (p.tensor.grad().defined()) {
        slot.copy_(p.tensor.grad().reshape({-1}));  // what earlier no_sync passes accumulated
      } else {
        slot.zero_();
      }
    }
    ready_[i] = true;
    if (--b.pending == 0) launch(b);
  }
  if (!unused.empty()) {
    status_ = failedPrecondition(fmt::format(
        "DistributedDataParallel: parameter(s) {} received no gradient in this backward pass, "
        "so their buckets were never reduced; construct with find_unused_parameters = true if "
        "some parameters are not used in every step",
        fmt::join(unused, ", ")));
    // The other buckets' reductions were started on every rank: let them finish.
  }
  if (!repeated_.empty() && status_.ok()) status_ = repeatedGradients(repeated_);
  double comm = 0, hidden = 0;
  const int size = comm_->size();
  for (Bucket& b : buckets_) {
    if (!b.work) continue;
    const Status s = b.work->wait(options_.timeout);
    const auto done = Clock::now();
    comm += msBetween(b.launched, done);
    hidden += std::max(0.0, msBetween(b.launched, std::min(done, ended)));
    if (!s.ok() && status_.ok()) status_ = s;
    b.work.reset();
  }
  stats_.comm_ms = comm;
  stats_.overlap_fraction = comm > 0 ? hidden / comm : 0;
  if (!status_.ok()) return;
  ::torch::NoGradGuard no_grad;
  // One pass per bucket: decompressed if it travelled as bf16, then scaled by 1 / (world size x
  // loss scale) and checked for NaN and infinity.
  const double divisor = static_cast<double>(size) * loss_scale_;
  bool all_finite = true;
  for (Bucket& b : buckets_) {
    bool finite = true;
    status_ = average(b, divisor, &finite);
    if (!status_.ok()) {
      // Clear what the buckets already queued found, so that it does not carry into the next step.
      if (kernels_ != nullptr) (void)kernels_->readFinite();
      return;
    }
    all_finite = all_finite && finite;
  }
  if (kernels_ != nullptr) {  // the buckets the kernels checked: one wait for all of them
    auto read = kernels_->readFinite();
    if (!read.ok()) {
      status_ = read.status();
      return;
    }
    all_finite = all_finite && *read;
  }
  finite_ = all_finite;
  if (options_.gradient_as_bucket_view) return;  // .grad is the bucket
  for (Param& p : params_) {
    auto slot = slotOf(p);
    if (p.tensor.grad().defined()) {
      p.tensor.mutable_grad().copy_(slot);
    } else {
      p.tensor.mutable_grad() = slot.clone();
    }
  }
}

}  // namespace rally::parallel
