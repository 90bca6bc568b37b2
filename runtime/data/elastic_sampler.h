// Exactly-once data sharding that survives resizes. Every epoch has one global order of the
// dataset's sample indices, fixed by (seed, epoch) and the same on every rank; the job walks it in
// global batches, and `consumed` (how far the job has got) is the only state. A step's global
// batch is split among the ranks of the world as it is at that step, so when the world grows or
// shrinks the remaining samples are simply re-partitioned: every sample of an epoch is used once,
// whatever fails, as long as `consumed` is committed and restored with the model (attach()).
//
//   ElasticSampler sampler({.dataset_size = 50'000, .seed = 7});
//   RALLY_RETURN_IF_ERROR(sampler.attach(state));           // epoch and consumed are committed
//   while (sampler.epoch() < epochs) {
//     Batch b = sampler.next(world.rank(), world.size(), 32);  // this rank's share of 32 x size
//     if (b.indices.empty() && b.epoch_finished) { sampler.startEpoch(sampler.epoch() + 1);
//     continue; } train(b.indices);
//   }
//
// The order needs no memory: a keyed Feistel permutation of [0, dataset_size) maps position i of
// the epoch to its sample in constant time, so datasets of billions of samples cost nothing.
//
// Contract: every rank of a world calls next() with the same (world_size, batch_per_rank), once
// per step, in the same order; then all advance `consumed` identically. Not thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/base/status.h"

namespace rally {

class ElasticState;

struct ElasticSamplerOptions {
  std::uint64_t dataset_size = 0;
  std::uint64_t seed = 0;
  bool shuffle = true;  // false: the order is 0, 1, 2, ... every epoch
};

// A bijection of [0, n) keyed by (seed, epoch), computed per index (cycle-walking Feistel network).
// A position outside [0, n) throws std::out_of_range.
class EpochPermutation {
 public:
  EpochPermutation(std::uint64_t n, std::uint64_t seed, std::uint64_t epoch);
  std::uint64_t operator()(std::uint64_t position) const;
  std::uint64_t size() const { return n_; }

 private:
  std::uint64_t encrypt(std::uint64_t x) const;
  std::uint64_t n_;
  int half_bits_ = 0;
  std::uint64_t half_mask_ = 0;
  std::uint64_t keys_[4] = {};
};

class ElasticSampler {
 public:
  struct Batch {
    std::vector<std::uint64_t> indices;  // this rank's sample indices, in order
    std::uint64_t first_position = 0;    // position in the epoch's order of the global batch
    bool epoch_finished = false;         // this was the epoch's last batch (or it had none left)
  };

  // Prefer create(), which checks the options; a dataset_size of 0 gives an empty epoch.
  explicit ElasticSampler(ElasticSamplerOptions options);
  // Checks the options: a dataset must have at least one sample.
  static Result<ElasticSampler> create(ElasticSamplerOptions options);

  // This rank's share of the next global batch of `batch_per_rank * world_size` samples (fewer at
  // the end of the epoch: the remainder is split as evenly as it goes, rank 0 first), and advances
  // `consumed` past the whole global batch. Bad arguments are a programming error: rank outside
  // [0, world_size) or batch_per_rank 0 throws std::invalid_argument.
  Batch next(int rank, int world_size, std::uint64_t batch_per_rank);
  // Starts `epoch` from its beginning.
  void startEpoch(std::uint64_t epoch);

  std::uint64_t epoch() const { return static_cast<std::uint64_t>(epoch_); }
  std::uint64_t consumed() const { return static_cast<std::uint64_t>(consumed_); }
  std::uint64_t remaining() const;
  std::uint64_t datasetSize() const { return options_.dataset_size; }
  // The sample at `position` of the current epoch's order.
  std::uint64_t sampleAt(std::uint64_t position) const;

  // Registers the epoch and the consumed count as scalars "<prefix>.epoch" and
  // "<prefix>.consumed" of `state`, so commit() saves them and restore()/sync() bring them back.
  // The state holds pointers into this object: it must neither move nor die while registered
  // (copies are not registered; assigning to it keeps the registration).
  Status attach(ElasticState& state, const std::string& prefix = "sampler");

 private:
  void refreshPermutation() const;

  ElasticSamplerOptions options_;
  std::int64_t epoch_ = 0;  // int64: registered as ElasticState scalars
  std::int64_t consumed_ = 0;
  mutable EpochPermutation permutation_;
  mutable std::int64_t permutation_epoch_ = 0;
};

}  // namespace rally
