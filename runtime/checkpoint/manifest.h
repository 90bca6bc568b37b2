// A checkpoint's manifest: what a checkpoint directory holds, written last (its presence is what
// makes the checkpoint complete). It lists every tensor (name, dtype, global shape) with the
// shards that cover it: each shard is a box of the global tensor (start and shape per dimension),
// stored row-major as one contiguous byte range of a shard file, with an xxHash3-64 checksum of the
// whole range and one per fixed-size block (so a reader that needs only part of a shard verifies
// only the blocks it reads). Scalars (step, sampler position, loss scale, ...) are stored
// exactly. docs/checkpoint-format.md specifies the JSON so other tools can read it.
//
//   RALLY_ASSIGN_OR_RETURN(Manifest m, readManifest("/ckpt/step-000000000100"));
//   for (const TensorRecord& t : m.tensors) ...
//
// Thread-safety: values.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "kernels/base/status.h"

namespace rally::checkpoint {

using collectives::DataType;

inline constexpr int kFormatVersion = 1;
inline constexpr const char* kManifestName = "manifest.json";

// A box within a tensor: start and shape per dimension (both empty for a 0-d tensor).
struct Box {
  std::vector<std::int64_t> start;
  std::vector<std::int64_t> shape;
  std::int64_t elements() const;
  bool empty() const { return elements() == 0; }
  friend bool operator==(const Box&, const Box&) = default;
};
// The overlap of two boxes of the same rank (dimension count); empty shape entries when none.
Box intersect(const Box& a, const Box& b);
std::string describe(const Box& b);  // "[0:2, 0:4]"

struct ShardRecord {
  int rank = 0;                       // the rank that wrote it
  std::string file;                   // relative to the checkpoint directory
  std::uint64_t offset = 0;           // of the box's first byte in the file
  std::uint64_t bytes = 0;            // box elements x dtype size
  Box box;                            // within the tensor
  std::uint64_t checksum = 0;         // xxh3-64 of the bytes
  std::vector<std::uint64_t> blocks;  // xxh3-64 of each block_bytes piece, the last one shorter
};

struct TensorRecord {
  std::string name;
  DataType type = DataType::kF32;
  std::vector<std::int64_t> shape;  // global
  std::vector<ShardRecord> shards;
};

struct ScalarRecord {
  bool is_double = false;
  std::int64_t bits = 0;  // the int64, or the double's bits: exact
  double asDouble() const;
};

struct FileRecord {
  std::string name;
  std::uint64_t bytes = 0;
  int rank = 0;
};

struct Manifest {
  int version = kFormatVersion;
  std::uint64_t step = 0;
  std::uint64_t commit = 0;  // ElasticState's commit number when saved
  std::string created;       // ISO 8601, UTC
  std::uint64_t block_bytes = 64 << 10;
  int world_size = 1;  // ranks that saved it
  std::string layout;  // the saver's description of its parallel layout ("dp=2 tp=2"), if any
  std::map<std::string, ScalarRecord> scalars;
  std::vector<TensorRecord> tensors;
  std::vector<FileRecord> files;

  const TensorRecord* find(const std::string& name) const;
  std::uint64_t totalBytes() const;  // of tensor data
};

std::string toJson(const Manifest& m);
// Validates as it parses: every field present with the right type, shards inside their tensor,
// sizes consistent, block counts right. The error names the field.
Result<Manifest> parseManifest(const std::string& json);
// Reads DIR/manifest.json. NotFound when it is missing (an incomplete checkpoint).
Result<Manifest> readManifest(const std::string& dir);

Result<DataType> parseDataType(std::string_view name);
std::string checksumHex(std::uint64_t v);

}  // namespace rally::checkpoint
