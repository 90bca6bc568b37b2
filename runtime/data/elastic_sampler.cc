#include "runtime/data/elastic_sampler.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <stdexcept>

#include "runtime/elastic/elastic_state.h"

namespace rally {
namespace {

// SplitMix64's finaliser: a fast, well-mixed 64-bit hash (the same on every platform, unlike the
// standard library's distributions).
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

EpochPermutation::EpochPermutation(std::uint64_t n, std::uint64_t seed, std::uint64_t epoch)
    : n_(n) {
  // An even number of bits covering n, so the domain 2^bits is less than 4n: cycle-walking then
  // takes fewer than 4 rounds of the network on average.
  int bits = n <= 1 ? 2 : std::bit_width(n - 1);
  bits = std::max(2, bits + (bits & 1));
  half_bits_ = bits / 2;
  half_mask_ = (std::uint64_t{1} << half_bits_) - 1;
  std::uint64_t k = mix(seed ^ mix(epoch ^ 0x72616c6c79ull));
  for (auto& key : keys_) key = k = mix(k);
}

std::uint64_t EpochPermutation::encrypt(std::uint64_t x) const {
  std::uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (std::uint64_t key : keys_) {
    const std::uint64_t next = left ^ (mix(right ^ key) & half_mask_);
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

std::uint64_t EpochPermutation::operator()(std::uint64_t position) const {
  if (position >= n_) {
    throw std::out_of_range(fmt::format(
        "EpochPermutation: position {} is outside the epoch of {} samples", position, n_));
  }
  // A bijection of [0, 2^bits) restricted to [0, n) by walking the cycle until it lands inside:
  // still a bijection, and every position's walk ends because its cycle contains it.
  std::uint64_t x = encrypt(position);
  while (x >= n_) x = encrypt(x);
  return x;
}

ElasticSampler::ElasticSampler(ElasticSamplerOptions options)
    : options_(options), permutation_(options.dataset_size, options.seed, 0) {}

Result<ElasticSampler> ElasticSampler::create(ElasticSamplerOptions options) {
  if (options.dataset_size == 0) {
    return invalidArgument(
        "ElasticSampler: dataset_size is 0; a dataset needs at least one sample");
  }
  if (options.dataset_size > (std::uint64_t{1} << 62)) {
    return invalidArgument(fmt::format(
        "ElasticSampler: dataset_size {} is too large (at most 2^62)", options.dataset_size));
  }
  return ElasticSampler(options);
}

void ElasticSampler::refreshPermutation() const {
  if (permutation_epoch_ != epoch_) {
    permutation_ = EpochPermutation(options_.dataset_size, options_.seed, epoch());
    permutation_epoch_ = epoch_;
  }
}

std::uint64_t ElasticSampler::sampleAt(std::uint64_t position) const {
  if (!options_.shuffle) return position;
  refreshPermutation();
  return permutation_(position);
}

std::uint64_t ElasticSampler::remaining() const {
  const auto used = std::min<std::uint64_t>(consumed(), options_.dataset_size);
  return options_.dataset_size - used;
}

ElasticSampler::Batch ElasticSampler::next(int rank, int world_size, std::uint64_t batch_per_rank) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw std::invalid_argument(fmt::format(
        "ElasticSampler::next: rank {} is not in a world of {} (need 0 <= rank < world_size)", rank,
        world_size));
  }
  if (batch_per_rank == 0) {
    throw std::invalid_argument("ElasticSampler::next: batch_per_rank is 0 (need at least 1)");
  }
  Batch b;
  b.first_position = consumed();
  const std::uint64_t global =
      std::min(remaining(), batch_per_rank * static_cast<std::uint64_t>(world_size));
  // Split as evenly as it goes: the first `extra` ranks take one more.
  const auto ws = static_cast<std::uint64_t>(world_size), r = static_cast<std::uint64_t>(rank);
  const std::uint64_t base = global / ws, extra = global % ws;
  const std::uint64_t begin = b.first_position + r * base + std::min(r, extra);
  const std::uint64_t count = base + (r < extra ? 1 : 0);
  b.indices.reserve(count);
  for (std::uint64_t p = begin; p < begin + count; ++p) b.indices.push_back(sampleAt(p));
  consumed_ += static_cast<std::int64_t>(global);
  b.epoch_finished = remaining() == 0;
  return b;
}

void ElasticSampler::startEpoch(std::uint64_t epoch) {
  epoch_ = static_cast<std::int64_t>(epoch);
  consumed_ = 0;
}

Status ElasticSampler::attach(ElasticState& state, const std::string& prefix) {
  RALLY_RETURN_IF_ERROR(state.registerScalar(prefix + ".epoch", &epoch_));
  RALLY_RETURN_IF_ERROR(state.registerScalar(prefix + ".consumed", &consumed_));
  return okStatus();
}

}  // namespace rally
