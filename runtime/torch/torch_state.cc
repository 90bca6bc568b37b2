#include "runtime/torch/torch_state.h"

#include <fmt/format.h>

#include <map>

#include "runtime/torch/internal/tensor_comm.h"
#include "runtime/torch/tensor_parallel.h"

namespace rally::parallel {

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
  // Shards: the parameters of rally's tensor-parallel layers, by their layer's slice.
  std::map<const void*, Sharding> shards;
  std::vector<::torch::nn::Module*> all = {&module};  // itself need not live in a shared_ptr
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    all.push_back(item.value().get());
  }
  for (::torch::nn::Module* m : all) {
    if (auto* c = dynamic_cast<ColumnParallelLinearImpl*>(m)) {
      shards[c->weight.data_ptr()] = {{c->out_total, c->weight.size(1)}, {c->out_begin, 0}};
      if (c->bias.defined()) shards[c->bias.data_ptr()] = {{c->out_total}, {c->out_begin}};
    } else if (auto* r = dynamic_cast<RowParallelLinearImpl*>(m)) {
      shards[r->weight.data_ptr()] = {{r->weight.size(0), r->in_total}, {0, r->in_begin}};
    } else if (auto* e = dynamic_cast<VocabParallelEmbeddingImpl*>(m)) {
      shards[e->weight.data_ptr()] = {{e->vocab_total, e->weight.size(1)}, {e->vocab_begin, 0}};
    }
  }
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    auto it = shards.find(p.value().data_ptr());
    std::optional<Sharding> s;
    if (it != shards.end()) s = it->second;
    RALLY_RETURN_IF_ERROR(registerTensor(state, prefix + p.key(), p.value(), s));
  }
  for (const auto& b : module.named_buffers(/*recurse=*/true)) {
    RALLY_RETURN_IF_ERROR(registerTensor(state, prefix + b.key(), b.value()));
  }
  return okStatus();
}

}  // namespace rally::parallel
