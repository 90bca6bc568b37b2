// The CUDA DeviceCopier: copies between registered device buffers and host memory on a dedicated
// non-blocking stream per device, ordered after the work already queued on the training stream
// (an event recorded there, waited for on the copy stream), into page-locked host memory. Built
// where the CUDA toolkit is found (RALLY_HAVE_CUDA); it needs a device at run time.
//
//   RALLY_ASSIGN_OR_RETURN(auto copier, rally::cuda::createCudaCopier({.device = local_rank}));
//   state.setDeviceCopier(copier.get());
#pragma once

#include <memory>

#include "runtime/elastic/device_copier.h"

namespace rally::cuda {

struct CudaCopierOptions {
  int device = 0;
  // The training stream (a cudaStream_t) whose queued work a copy must follow; nullptr: the legacy
  // default stream (which every blocking stream synchronises with).
  void* training_stream = nullptr;
};

// FailedPrecondition, naming the reason, when there is no usable device.
Result<std::unique_ptr<DeviceCopier>> createCudaCopier(const CudaCopierOptions& options = {});

}  // namespace rally::cuda
