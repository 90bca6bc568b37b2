#include "runtime/checkpoint/checksum.h"

#define XXH_INLINE_ALL  // header-only: no library to link, and the hash inlines
#include <xxhash.h>

#include <new>

namespace rally::checkpoint {

std::uint64_t checksum(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

StreamingChecksum::StreamingChecksum() : state_(XXH3_createState()) {
  if (state_ == nullptr) throw std::bad_alloc();
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_));
}

StreamingChecksum::~StreamingChecksum() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void StreamingChecksum::update(const void* data, size_t bytes) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data, bytes);
}

std::uint64_t StreamingChecksum::value() const {
  return XXH3_64bits_digest(static_cast<XXH3_state_t*>(state_));
}

}  // namespace rally::checkpoint
