// glibc malloc settings for a training process, applied by rally::init()
// (InitOptions::tune_malloc).
//
// A training step allocates and frees the same few hundred activation and gradient tensors every
// step. glibc's defaults return the freed top of the heap to the kernel (its trim threshold is
// twice the largest block freed so far) and serve big blocks with mmap until a free raises the
// threshold, so every step faults the same pages in again and the kernel zeroes them: about 2,000
// page faults (8 MiB) per step in examples/gpt, 5-10% of the step on CPU (bench/README.md, DDP).
// With a fixed mmap threshold of 32 MiB (glibc's largest) and a trim threshold of 256 MiB the
// process keeps its working set; what it holds beyond it is at most 256 MiB of free heap top.
//
// Left alone when the user chose: RALLY_MALLOC_TUNING=0 (or "off"), or malloc tunables in
// GLIBC_TUNABLES. Has no effect without glibc or under a sanitizer's allocator.
#pragma once

#include <map>
#include <string>

namespace rally::internal {

struct MallocTuning {
  bool applied = false;
  bool bad_value = false;  // RALLY_MALLOC_TUNING is not one of on/off/1/0/true/false/yes/no
  std::string reason;      // why not, when not applied; what was set, when applied
};

// `env`: the process environment (rally::init() passes its copy). Process-wide and idempotent.
MallocTuning tuneMallocForTraining(const std::map<std::string, std::string>& env);

}  // namespace rally::internal
