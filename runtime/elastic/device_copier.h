// How librally moves registered device memory (CUDA buffers) to and from host memory: for
// ElasticState's commits and restores and for checkpoints. ElasticState and the Checkpointer call
// it for buffers registered with Device::cuda(i); host buffers never go through it.
//
//   RALLY_ASSIGN_OR_RETURN(auto copier, rally::cuda::createCudaCopier({.device = 0}));
//   rally::ElasticState state;
//   state.setDeviceCopier(copier.get());
//   RALLY_RETURN_IF_ERROR(state.registerBuffer("w", d_w, DataType::kBF16, {4096, 4096},
//                                              rally::Device::cuda(0)));
//
// The CUDA implementation (runtime/cuda/cuda_copier.h) copies on its own stream, after the work
// already queued on the training stream (an event), into page-locked host memory; tests use a
// host-memory fake.
//
// Thread-safety: one thread at a time (the training thread).
#pragma once

#include <cstddef>

#include "kernels/base/status.h"

namespace rally {

struct Device;

class DeviceCopier {
 public:
  virtual ~DeviceCopier() = default;
  // Host memory that device copies are fast from and to (page-locked for CUDA); `bytes` > 0.
  virtual Result<void*> allocateHost(size_t bytes) = 0;
  virtual void freeHost(void* p) = 0;
  // Queue a copy; it may still be running on return. synchronize() waits for every queued copy
  // and reports the first error.
  virtual Status toHost(void* host, const void* device_ptr, size_t bytes, const Device& device) = 0;
  virtual Status toDevice(void* device_ptr, const void* host, size_t bytes,
                          const Device& device) = 0;
  virtual Status synchronize() = 0;
};

}  // namespace rally
