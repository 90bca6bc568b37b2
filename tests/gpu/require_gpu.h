// How the GPU tests leave when there is no GPU: skipped, saying why, so that CI (which never has
// one) reports them as skipped. Where RALLY_REQUIRE_GPU=1 (scripts/gpu-check sets it when
// nvidia-smi lists a GPU) they fail instead: there a skip would mean the run never reached the
// device (a driver and runtime mismatch, a sandbox refusing it) and would read as a pass.
//
//   if (!why.empty()) RALLY_SKIP_WITHOUT_GPU("no CUDA device (" << why << ")");
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <string_view>

namespace rally::test_support {

inline bool gpuRequired() {
  const char* v = std::getenv("RALLY_REQUIRE_GPU");
  return v != nullptr && std::string_view(v) == "1";
}

}  // namespace rally::test_support

#define RALLY_SKIP_WITHOUT_GPU(message)                                              \
  do {                                                                               \
    if (::rally::test_support::gpuRequired()) {                                      \
      GTEST_FAIL() << "RALLY_REQUIRE_GPU=1 but there is no usable GPU: " << message; \
    }                                                                                \
    GTEST_SKIP() << message;                                                         \
  } while (0)
