// Collectives on torch tensors (contiguous, in place), for librally_torch's layers.
#pragma once

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include <stdexcept>
#include <vector>

#include "collectives/communicator.h"

namespace rally::parallel::internal {

inline collectives::DataType rallyType(::torch::ScalarType t) {
  switch (t) {
    case ::torch::kFloat32:
      return collectives::DataType::kF32;
    case ::torch::kFloat64:
      return collectives::DataType::kF64;
    case ::torch::kFloat16:
      return collectives::DataType::kF16;
    case ::torch::kBFloat16:
      return collectives::DataType::kBF16;
    case ::torch::kInt32:
      return collectives::DataType::kI32;
    case ::torch::kInt64:
      return collectives::DataType::kI64;
    case ::torch::kUInt8:
      return collectives::DataType::kU8;
    default:
      throw std::invalid_argument(
          fmt::format("rally: no collective for dtype {}", c10::toString(t)));
  }
}

// Inside autograd, a peer's failure surfaces as an exception (the public API's error model for
// training loops), carrying the Status: ElasticRun::run recovers from it.
inline void check(const Status& s, const char* what) {
  if (!s.ok()) {
    Status with = s;
    with.addContext(fmt::format("in a tensor-parallel {}", what));
    throw collectives::CollectiveError(std::move(with));
  }
}

inline constexpr Milliseconds kTimeout{600'000};

// Work on another CUDA stream than torch's (a collective on NCCL's own, DDP's kernels on theirs)
// must follow the kernels torch queued on its current stream of the tensor's device (autograd's,
// a layer's), on the GPU, with no host wait: an event recorded there, which `wait` makes that
// stream wait for (waitForEvent of a Communicator or of Kernels). Through c10's device interface,
// so that this needs no CUDA build of torch to compile. Nothing for CPU tensors.
template <class Wait>
Status afterTorchStream(const ::torch::Tensor& t, Wait&& wait) {
  if (!t.is_cuda()) return okStatus();
  const c10::Device device = t.device();
  try {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    struct Event {  // destroyed on every way out (a wait may still be pending: CUDA allows it)
      const c10::impl::DeviceGuardImplInterface* impl;
      c10::DeviceIndex index;
      void* event = nullptr;
      ~Event() {
        if (event != nullptr) impl->destroyEvent(event, index);
      }
    } e{impl, device.index()};
    impl->record(&e.event, impl->getStream(device), device.index(),
                 c10::EventFlag::PYTORCH_DEFAULT);
    return wait(e.event);
  } catch (const std::exception& e) {
    return internalError(
        fmt::format("ordering work after torch's stream on {}: {}", device.str(), e.what()));
  }
}

inline Status followTorchStream(collectives::Communicator& comm, const ::torch::Tensor& t) {
  return afterTorchStream(t, [&](void* event) { return comm.waitForEvent(event); });
}

inline void allreduceInPlace(collectives::Communicator& comm, ::torch::Tensor& t,
                             collectives::ReduceOp op = collectives::ReduceOp::kSum) {
  if (!t.is_contiguous()) t = t.contiguous();
  check(followTorchStream(comm, t), "allreduce");
  check(comm.allreduce(t.data_ptr(), static_cast<size_t>(t.numel()), rallyType(t.scalar_type()), op)
            ->wait(kTimeout),
        "allreduce");
}

// Every rank's slice of the last dimension, concatenated: rank r holds partition(total, size, r)
// (uneven splits allowed; slices are padded to the longest for the allgather).
inline ::torch::Tensor allgatherLastDim(collectives::Communicator& comm, const ::torch::Tensor& x,
                                        std::int64_t total) {
  const int n = comm.size();
  if (total == 0) return x.new_empty(x.sizes());  // nothing to gather (every slice is empty)
  const std::int64_t chunk = (total + n - 1) / n;
  auto in = x.size(-1) == chunk ? x.contiguous()
                                : ::torch::constant_pad_nd(x, {0, chunk - x.size(-1)}).contiguous();
  auto out = ::torch::empty({n * in.numel()}, in.options());
  check(followTorchStream(comm, out), "allgather");
  check(comm.allgather(in.data_ptr(), out.data_ptr(), static_cast<size_t>(in.numel()),
                       rallyType(in.scalar_type()))
            ->wait(kTimeout),
        "allgather");
  const std::int64_t rows = in.numel() / chunk;
  auto parts = out.view({n, rows, chunk});
  std::vector<::torch::Tensor> pieces;
  for (int r = 0; r < n; ++r) {
    const std::int64_t len = total / n + (r < total % n ? 1 : 0);  // as partition() splits
    pieces.push_back(parts[r].narrow(-1, 0, len));
  }
  auto sizes = x.sizes().vec();
  sizes.back() = total;
  return ::torch::cat(pieces, -1).reshape(sizes);
}

}  // namespace rally::parallel::internal
