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
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>

#include "runtime/elastic/elastic_state.h"

namespace rally::parallel {

Status registerTensor(ElasticState& state, const std::string& name, const ::torch::Tensor& t,
                      std::optional<Sharding> sharding = std::nullopt);
// Every parameter and buffer of `module` (recursively), named "prefix" + its path.
Status registerModule(ElasticState& state, ::torch::nn::Module& module,
                      const std::string& prefix = "");

}  // namespace rally::parallel
