// The checksum of checkpoint data: xxHash's XXH3 64-bit (Debian's libxxhash-dev), seed 0. It runs
// at memory speed, so verifying costs little beside reading; a device implementation (kernels/)
// computes the same value from GPU memory.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rally::checkpoint {

std::uint64_t checksum(const void* data, size_t bytes);

// A checksum over pieces fed in order (equal to checksum() of their concatenation).
class StreamingChecksum {
 public:
  StreamingChecksum();
  ~StreamingChecksum();
  StreamingChecksum(const StreamingChecksum&) = delete;
  StreamingChecksum& operator=(const StreamingChecksum&) = delete;
  void update(const void* data, size_t bytes);
  std::uint64_t value() const;

 private:
  void* state_;
};

}  // namespace rally::checkpoint
