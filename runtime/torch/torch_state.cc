#include "runtime/torch/torch_state.h"

#include <fmt/format.h>
#include <torch/optim.h>

#include <map>
#include <memory>
#include <vector>

#include "runtime/torch/internal/tensor_comm.h"
#include "runtime/torch/tensor_parallel.h"

namespace rally::parallel {
namespace {

// How registerModule and registerOptimizer name and shard a module's parameters, by TensorImpl
// (not data pointer: empty parameters, e.g. a TP rank's empty slice, all have a null one).
struct ParamInfo {
  std::string name;
  std::optional<Sharding> sharding;
};

std::map<const void*, ParamInfo> parameterInfo(::torch::nn::Module& module) {
  auto key = [](const ::torch::Tensor& t) -> const void* { return t.unsafeGetTensorImpl(); };
  // Shards: the parameters of rally's tensor-parallel layers, by their layer's slice.
  std::map<const void*, Sharding> shards;
  std::vector<::torch::nn::Module*> all = {&module};  // itself need not live in a shared_ptr
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    all.push_back(item.value().get());
  }
  for (::torch::nn::Module* m : all) {
    if (auto* c = dynamic_cast<ColumnParallelLinearImpl*>(m)) {
      shards[key(c->weight)] = {{c->out_total, c->weight.size(1)}, {c->out_begin, 0}};
      if (c->bias.defined()) shards[key(c->bias)] = {{c->out_total}, {c->out_begin}};
    } else if (auto* r = dynamic_cast<RowParallelLinearImpl*>(m)) {
      shards[key(r->weight)] = {{r->weight.size(0), r->in_total}, {0, r->in_begin}};
    } else if (auto* e = dynamic_cast<VocabParallelEmbeddingImpl*>(m)) {
      shards[key(e->weight)] = {{e->vocab_total, e->weight.size(1)}, {e->vocab_begin, 0}};
    }
  }
  std::map<const void*, ParamInfo> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    ParamInfo& info = out[key(p.value())];
    info.name = p.key();
    if (auto it = shards.find(key(p.value())); it != shards.end()) info.sharding = it->second;
  }
  return out;
}

// The parameter's state in Optimizer::state() (under the key libtorch's optimizers use), created
// empty if it has none yet.
std::string stateKey(const ::torch::Tensor& p) {
  return c10::guts::to_string(p.unsafeGetTensorImpl());
}

template <typename S>
S& stateOf(::torch::optim::Optimizer& opt, const ::torch::Tensor& p) {
  auto& slot = opt.state()[stateKey(p)];
  if (!slot) slot = std::make_unique<S>();
  return static_cast<S&>(*slot);
}

// Zeros like `p` where the optimizer's first step() would make zeros itself.
void zerosUnlessDefined(::torch::Tensor& t, const ::torch::Tensor& p) {
  if (!t.defined()) t = ::torch::zeros_like(p, ::torch::MemoryFormat::Contiguous);
}

}  // namespace

Status registerTensor(ElasticState& state, const std::string& name, const ::torch::Tensor& t,
                      std::optional<Sharding> sharding) {
  if (!t.defined()) return invalidArgument(fmt::format("registerTensor: '{}' is undefined", name));
  if (!t.is_contiguous()) {
    return invalidArgument(fmt::format(
        "registerTensor: '{}' is not contiguous; register a contiguous tensor (its memory is used "
        "in place)",
        name));
  }
  collectives::DataType type;
  try {
    type = internal::rallyType(t.scalar_type());
  } catch (const std::exception& e) {
    return invalidArgument(fmt::format("registerTensor: '{}': {}", name, e.what()));
  }
  const Device device = t.is_cuda() ? Device::cuda(t.get_device()) : Device::host();
  std::vector<std::int64_t> shape(t.sizes().begin(), t.sizes().end());
  if (sharding) {
    return state.registerShard(name, t.data_ptr(), type, std::move(shape), std::move(*sharding),
                               device);
  }
  return state.registerBuffer(name, t.data_ptr(), type, std::move(shape), device);
}

Status registerModule(ElasticState& state, ::torch::nn::Module& module, const std::string& prefix) {
  const auto info = parameterInfo(module);
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    RALLY_RETURN_IF_ERROR(registerTensor(state, prefix + p.key(), p.value(),
                                         info.at(p.value().unsafeGetTensorImpl()).sharding));
  }
  for (const auto& b : module.named_buffers(/*recurse=*/true)) {
    RALLY_RETURN_IF_ERROR(registerTensor(state, prefix + b.key(), b.value()));
  }
  return okStatus();
}

std::map<std::string, std::optional<Sharding>> parameterShardings(::torch::nn::Module& module) {
  std::map<std::string, std::optional<Sharding>> out;
  for (auto& [impl, info] : parameterInfo(module)) {
    (void)impl;
    out.emplace(info.name, info.sharding);
  }
  return out;
}

Status registerOptimizer(ElasticState& state, ::torch::optim::Optimizer& optimizer,
                         ::torch::nn::Module& module, const std::string& prefix) {
  namespace optim = ::torch::optim;
  const auto info = parameterInfo(module);
  auto& groups = optimizer.param_groups();
  auto isAdam = [](optim::OptimizerOptions& o) {
    return dynamic_cast<optim::AdamOptions*>(&o) != nullptr ||
           dynamic_cast<optim::AdamWOptions*>(&o) != nullptr;
  };
  // Every check first, so that a refusal leaves the state and the optimizer as they were.
  for (size_t g = 0; g < groups.size(); ++g) {
    auto& options = groups[g].options();
    if (!isAdam(options) && dynamic_cast<optim::SGDOptions*>(&options) == nullptr &&
        dynamic_cast<optim::RMSpropOptions*>(&options) == nullptr &&
        dynamic_cast<optim::AdagradOptions*>(&options) == nullptr) {
      return invalidArgument(
          "registerOptimizer: supported optimizers are torch::optim::Adam, AdamW, SGD, RMSprop "
          "and Adagrad (LBFGS keeps no per-parameter state that can be split); register other "
          "state with registerTensor");
    }
    for (size_t i = 0; i < groups[g].params().size(); ++i) {
      const ::torch::Tensor& p = groups[g].params()[i];
      auto it = info.find(p.unsafeGetTensorImpl());
      if (it == info.end()) {
        return invalidArgument(fmt::format(
            "registerOptimizer: parameter {} of param group {} (shape {}) is not a parameter of "
            "the module given; pass the module whose parameters the optimizer updates",
            i, g, fmt::join(p.sizes(), "x")));
      }
      auto* sgd = dynamic_cast<optim::SGDOptions*>(&options);
      if (sgd == nullptr || sgd->momentum() == 0 || sgd->dampening() == 0) continue;
      const auto found = optimizer.state().find(stateKey(p));
      if (found == optimizer.state().end() ||
          !static_cast<optim::SGDParamState&>(*found->second).momentum_buffer().defined()) {
        return failedPrecondition(fmt::format(
            "registerOptimizer: SGD with dampening {} makes its momentum buffer from the first "
            "gradient, so '{}' has no state to register before the first step(); register "
            "after it, or use dampening 0",
            sgd->dampening(), it->second.name));
      }
    }
  }
  for (auto& group : groups) {
    auto& options = group.options();
    for (const ::torch::Tensor& p : group.params()) {
      const ParamInfo& param = info.at(p.unsafeGetTensorImpl());
      const std::string name = prefix + param.name + ".";
      auto reg = [&](const char* field, const ::torch::Tensor& t) {
        return registerTensor(state, name + field, t, param.sharding);
      };
      if (isAdam(options)) {
        const bool adamw = dynamic_cast<optim::AdamWOptions*>(&options) != nullptr;
        const bool amsgrad = adamw ? static_cast<optim::AdamWOptions&>(options).amsgrad()
                                   : static_cast<optim::AdamOptions&>(options).amsgrad();
        auto fill = [&](auto& s) -> Status {
          zerosUnlessDefined(s.exp_avg(), p);
          zerosUnlessDefined(s.exp_avg_sq(), p);
          if (amsgrad) zerosUnlessDefined(s.max_exp_avg_sq(), p);
          RALLY_RETURN_IF_ERROR(state.registerScalar(name + "step", &s.step()));
          RALLY_RETURN_IF_ERROR(reg("exp_avg", s.exp_avg()));
          RALLY_RETURN_IF_ERROR(reg("exp_avg_sq", s.exp_avg_sq()));
          if (amsgrad) {
            RALLY_RETURN_IF_ERROR(reg("max_exp_avg_sq", s.max_exp_avg_sq()));
          }
          return okStatus();
        };
        RALLY_RETURN_IF_ERROR(adamw ? fill(stateOf<optim::AdamWParamState>(optimizer, p))
                                    : fill(stateOf<optim::AdamParamState>(optimizer, p)));
      } else if (auto* sgd = dynamic_cast<optim::SGDOptions*>(&options)) {
        if (sgd->momentum() == 0) continue;  // SGD without momentum keeps no state
        // With dampening 0 the first step() on a zero buffer gives the gradient, as libtorch's
        // own first step (a copy of the gradient) does; with another dampening the buffer exists
        // (checked above).
        auto& s = stateOf<optim::SGDParamState>(optimizer, p);
        zerosUnlessDefined(s.momentum_buffer(), p);
        RALLY_RETURN_IF_ERROR(reg("momentum_buffer", s.momentum_buffer()));
      } else if (auto* rms = dynamic_cast<optim::RMSpropOptions*>(&options)) {
        auto& s = stateOf<optim::RMSpropParamState>(optimizer, p);
        zerosUnlessDefined(s.square_avg(), p);
        if (rms->momentum() > 0) zerosUnlessDefined(s.momentum_buffer(), p);
        if (rms->centered()) zerosUnlessDefined(s.grad_avg(), p);
        RALLY_RETURN_IF_ERROR(state.registerScalar(name + "step", &s.step()));
        RALLY_RETURN_IF_ERROR(reg("square_avg", s.square_avg()));
        if (rms->momentum() > 0) {
          RALLY_RETURN_IF_ERROR(reg("momentum_buffer", s.momentum_buffer()));
        }
        if (rms->centered()) {
          RALLY_RETURN_IF_ERROR(reg("grad_avg", s.grad_avg()));
        }
      } else {
        auto& ada = static_cast<optim::AdagradOptions&>(options);
        // Adagrad's constructor makes the accumulator; add_param_group does not: make it as the
        // constructor would.
        auto& s = stateOf<optim::AdagradParamState>(optimizer, p);
        if (!s.sum().defined()) {
          s.sum(::torch::full_like(p, ada.initial_accumulator_value(),
                                   ::torch::MemoryFormat::Contiguous));
        }
        RALLY_RETURN_IF_ERROR(state.registerScalar(name + "step", &s.step()));
        RALLY_RETURN_IF_ERROR(reg("sum", s.sum()));
      }
    }
  }
  return okStatus();
}

}  // namespace rally::parallel
