// A libtorch module's parameters and buffers in an ElasticState, so that commits, in-place
// recovery and checkpoints cover them: each tensor is registered in place (zero-copy: its own
// memory), under its module path ("fc1.weight"). Parameters of rally's tensor-parallel layers are
// registered as shards of the full tensor (global shape and offset), so a checkpoint saved with
// one TP degree loads with another. CUDA tensors need the state's DeviceCopier.
//
//   rally::ElasticState state;
//   RALLY_RETURN_IF_ERROR(rally::parallel::registerModule(state, *model));
//   RALLY_RETURN_IF_ERROR(rally::parallel::registerTensor(state, "adam.m.fc1", m_tensor));
//
// The tensors must stay allocated (and contiguous) while registered: an optimizer that replaces
// a parameter's storage needs the registration made again.
//
// An optimizer's state goes in with registerOptimizer (torch::optim::Adam, AdamW, SGD, RMSprop,
// Adagrad), named by the module's parameter paths:
//
//   torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(3e-4));
//   RALLY_RETURN_IF_ERROR(rally::parallel::registerOptimizer(state, opt, *model));
//   // "optim.fc1.weight.exp_avg", "optim.fc1.weight.exp_avg_sq", "optim.fc1.weight.step", ...
#pragma once

#include <torch/torch.h>

#include <map>
#include <optional>
#include <string>

#include "runtime/elastic/elastic_state.h"

namespace rally::parallel {

Status registerTensor(ElasticState& state, const std::string& name, const ::torch::Tensor& t,
                      std::optional<Sharding> sharding = std::nullopt);
// Every parameter and buffer of `module` (recursively), named "prefix" + its path.
Status registerModule(ElasticState& state, ::torch::nn::Module& module,
                      const std::string& prefix = "");
// Each parameter's sharding by its module path (nullopt: not a TP shard), as registerModule
// registers it: for registering state sliced like a parameter (an optimizer's own moments).
std::map<std::string, std::optional<Sharding>> parameterShardings(::torch::nn::Module& module);
// Each parameter's optimizer state: its tensors in place, with the parameter's sharding (a TP
// layer's moments are shards like its weight), and its step count as a scalar. State that the
// optimizer makes lazily in its first step() is made now, as that step would make it (zeros), so
// it is registered before the first commit and a replacement process can receive it. Every
// parameter of `optimizer` must be one of `module`'s. Errors (checked before anything is
// registered): an unsupported optimizer; a parameter not the module's; SGD with dampening != 0
// before its first step (its momentum buffer starts as the first gradient). Loading the optimizer
// (torch::load) replaces its state objects: unregister and register again after it.
Status registerOptimizer(ElasticState& state, ::torch::optim::Optimizer& optimizer,
                         ::torch::nn::Module& module, const std::string& prefix = "optim.");

}  // namespace rally::parallel
