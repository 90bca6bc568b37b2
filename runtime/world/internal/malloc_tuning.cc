#include "runtime/world/internal/malloc_tuning.h"

#include <fmt/format.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace rally::internal {
namespace {

constexpr int kMmapThreshold = 32 << 20;  // glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
constexpr int kTrimThreshold = 256 << 20;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitizerAllocator = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kSanitizerAllocator = true;
#else
constexpr bool kSanitizerAllocator = false;
#endif
#else
constexpr bool kSanitizerAllocator = false;
#endif

}  // namespace

MallocTuning tuneMallocForTraining(const std::map<std::string, std::string>& env) {
  if (auto it = env.find("RALLY_MALLOC_TUNING"); it != env.end() && !it->second.empty()) {
    const std::string& v = it->second;
    if (v == "0" || v == "off" || v == "false" || v == "no") {
      return {false, false, "RALLY_MALLOC_TUNING=" + v};
    }
    if (v != "1" && v != "on" && v != "true" && v != "yes") {
      return {
          false, true,
          fmt::format("RALLY_MALLOC_TUNING={} is not a setting: use on or off (1/0, true/false, "
                      "yes/no)",
                      v)};
    }
  }
  if (auto it = env.find("GLIBC_TUNABLES");
      it != env.end() && it->second.find("glibc.malloc.") != std::string::npos) {
    return {false, false, "GLIBC_TUNABLES sets malloc tunables"};
  }
  if (kSanitizerAllocator) return {false, false, "a sanitizer's allocator is in use"};
#if defined(__GLIBC__)
  if (mallopt(M_MMAP_THRESHOLD, kMmapThreshold) != 1 ||
      mallopt(M_TRIM_THRESHOLD, kTrimThreshold) != 1) {
    return {false, false, "mallopt refused the settings"};
  }
  return {true, false,
          fmt::format("mmap threshold {} MiB, trim threshold {} MiB", kMmapThreshold >> 20,
                      kTrimThreshold >> 20)};
#else
  return {false, false, "not glibc"};
#endif
}

}  // namespace rally::internal
