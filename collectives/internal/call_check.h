// What a rank is about to do, exchanged before each collective when
// CommunicatorOptions::check_calls is on, so that ranks that disagree fail with a message naming
// every rank's call instead of corrupting data or hanging. Shared by the backends.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives::internal {

enum CallKind : std::uint32_t {
  kAllreduce,
  kReduceScatter,
  kAllgather,
  kBroadcast,
  kAlltoall,
  kBarrier,
  kSplit
};
inline constexpr const char* kCallKindNames[] = {
    "allreduce", "reduce_scatter", "allgather", "broadcast", "alltoall", "barrier", "split"};

struct CallDesc {
  std::uint32_t kind = 0;  // a CallKind
  std::uint32_t type = 0;
  std::uint64_t count = 0;
  std::int32_t root = -1;
  std::int32_t op = -1;
  bool operator==(const CallDesc&) const = default;
};
static_assert(sizeof(CallDesc) == 24, "CallDesc travels as bytes: no padding");

// "allreduce(12 x f32, sum)", "broadcast(3 x u8, root 1)", "barrier".
inline std::string describe(const CallDesc& d) {
  const char* kind = d.kind < std::size(kCallKindNames) ? kCallKindNames[d.kind] : "unknown";
  if (d.kind == kBarrier || d.kind == kSplit) return kind;
  std::string s =
      fmt::format("{}({} x {}", kind, d.count, dataTypeName(static_cast<DataType>(d.type)));
  if (d.op >= 0) s += fmt::format(", {}", reduceOpName(static_cast<ReduceOp>(d.op)));
  if (d.root >= 0) s += fmt::format(", root {}", d.root);
  return s + ")";
}

// "" when every rank's call equals `mine`; otherwise the message naming every rank's call.
inline std::string mismatch(const CallDesc& mine, const std::vector<CallDesc>& all) {
  bool same = true;
  for (const auto& d : all) same = same && d == mine;
  if (same) return "";
  std::string calls;
  for (size_t r = 0; r < all.size(); ++r) {
    calls += fmt::format("{}rank {}: {}", r == 0 ? "" : ", ", r, describe(all[r]));
  }
  return fmt::format(
      "the ranks disagree about this call ({}); every rank must make the same calls in the same "
      "order",
      calls);
}

}  // namespace rally::collectives::internal
