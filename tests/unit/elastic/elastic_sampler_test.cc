// ElasticSampler: the epoch's order is a permutation (every sample once), deterministic per (seed,
// epoch) and different across epochs and seeds; the global batch is split among the ranks of the
// world as it is at each step; after resizes in the middle of an epoch (and a rollback to a commit)
// the samples of the epoch's committed steps are the dataset, each exactly once.
#include "runtime/data/elastic_sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <stdexcept>

#include "runtime/elastic/elastic_state.h"

namespace rally {
namespace {

TEST(EpochPermutation, IsABijectionForManySizes) {
  for (std::uint64_t n :
       {1ull, 2ull, 3ull, 4ull, 5ull, 7ull, 64ull, 1000ull, 1023ull, 1025ull, 100'003ull}) {
    EpochPermutation p(n, 42, 3);
    std::vector<char> seen(n, 0);
    for (std::uint64_t i = 0; i < n; ++i) {
      const std::uint64_t s = p(i);
      ASSERT_LT(s, n) << "n=" << n;
      ASSERT_FALSE(seen[s]) << "n=" << n << ": sample " << s << " twice";
      seen[s] = 1;
    }
  }
}

TEST(EpochPermutation, RefusesPositionsOutsideTheEpoch) {
  EpochPermutation p(10, 1, 0);
  EXPECT_THROW(p(10), std::out_of_range);
  EXPECT_THROW(EpochPermutation(0, 1, 0)(0), std::out_of_range);
}

TEST(EpochPermutation, DependsOnSeedAndEpochAndIsReproducible) {
  const std::uint64_t n = 10'000;
  auto order = [&](std::uint64_t seed, std::uint64_t epoch) {
    EpochPermutation p(n, seed, epoch);
    std::vector<std::uint64_t> v(n);
    for (std::uint64_t i = 0; i < n; ++i) v[i] = p(i);
    return v;
  };
  EXPECT_EQ(order(1, 0), order(1, 0));
  EXPECT_NE(order(1, 0), order(1, 1));
  EXPECT_NE(order(1, 0), order(2, 0));
  // Shuffled, not near the identity: few fixed points (about 1 expected).
  const auto v = order(1, 0);
  size_t fixed = 0;
  for (std::uint64_t i = 0; i < n; ++i) fixed += v[i] == i;
  EXPECT_LT(fixed, 20u);
}

TEST(ElasticSampler, SplitsEachGlobalBatchAmongTheRanks) {
  ElasticSampler a({.dataset_size = 10, .seed = 5, .shuffle = false});
  // Every rank holds its own sampler (same state): rank r takes its share of 3 x 3 = 9.
  std::vector<std::uint64_t> all;
  for (int r = 0; r < 3; ++r) {
    ElasticSampler s({.dataset_size = 10, .seed = 5, .shuffle = false});
    auto b = s.next(r, 3, 3);
    EXPECT_EQ(b.indices.size(), 3u);
    EXPECT_FALSE(b.epoch_finished);
    EXPECT_EQ(s.consumed(), 9u);
    all.insert(all.end(), b.indices.begin(), b.indices.end());
  }
  EXPECT_EQ(all, (std::vector<std::uint64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8}));
  // The last sample: rank 0 takes it, the others get none, and the epoch is over.
  a.next(0, 3, 3);
  auto last0 = a;
  auto last2 = a;
  EXPECT_EQ(last0.next(0, 3, 3).indices, std::vector<std::uint64_t>{9});
  const auto b2 = last2.next(2, 3, 3);
  EXPECT_TRUE(b2.indices.empty());
  EXPECT_TRUE(b2.epoch_finished);
  EXPECT_EQ(last2.remaining(), 0u);
}

TEST(ElasticSampler, RejectsBadArgumentsWithClearMessages) {
  EXPECT_FALSE(ElasticSampler::create({.dataset_size = 0}).ok());
  ElasticSampler s({.dataset_size = 10});
  EXPECT_THROW(s.next(3, 3, 1), std::invalid_argument);
  EXPECT_THROW(s.next(-1, 3, 1), std::invalid_argument);
  EXPECT_THROW(s.next(0, 3, 0), std::invalid_argument);
  try {
    s.next(4, 2, 1);
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("rank 4 is not in a world of 2"), std::string::npos);
  }
}

// A whole epoch with the world resized twice and one failure rolled back to the last commit: the
// samples of the steps that count (those not rolled back) are the dataset, each exactly once.
TEST(ElasticSampler, ExactlyOncePerEpochAcrossResizesAndRollbacks) {
  const std::uint64_t n = 1009;  // prime: no world size divides it
  ElasticSampler sampler({.dataset_size = n, .seed = 11});
  ElasticState state;
  ASSERT_TRUE(sampler.attach(state).ok());
  ASSERT_TRUE(state.commit().ok());
  std::multiset<std::uint64_t> used;        // committed steps' samples
  std::vector<std::uint64_t> since_commit;  // samples of steps after the last commit
  int world = 4, step = 0;
  while (sampler.remaining() > 0) {
    // Every rank's share of this step (ranks as loop iterations over copies of one state).
    const ElasticSampler before = sampler;
    for (int r = 0; r < world; ++r) {
      ElasticSampler rank_view = before;
      const auto b = rank_view.next(r, world, 7);
      since_commit.insert(since_commit.end(), b.indices.begin(), b.indices.end());
      if (r == 0) sampler = rank_view;
    }
    ++step;
    if (step % 5 == 0) {  // commit
      used.insert(since_commit.begin(), since_commit.end());
      since_commit.clear();
      ASSERT_TRUE(state.commit().ok());
    }
    if (step == 12) {  // a failure: roll back to the commit, continue with 3 ranks
      ASSERT_TRUE(state.restore().ok());
      since_commit.clear();
      world = 3;
    }
    if (step == 30) world = 5;  // a node joins
  }
  used.insert(since_commit.begin(), since_commit.end());  // the epoch's end counts
  ASSERT_EQ(used.size(), n);
  std::uint64_t expect = 0;
  for (std::uint64_t s : used) ASSERT_EQ(s, expect++) << "a sample missing or used twice";
}

TEST(ElasticSampler, StartEpochResetsAndChangesTheOrder) {
  ElasticSampler s({.dataset_size = 100, .seed = 3});
  const auto first = s.next(0, 1, 10).indices;
  s.startEpoch(1);
  EXPECT_EQ(s.epoch(), 1u);
  EXPECT_EQ(s.consumed(), 0u);
  EXPECT_NE(s.next(0, 1, 10).indices, first);
  s.startEpoch(0);
  EXPECT_EQ(s.next(0, 1, 10).indices, first);
}

}  // namespace
}  // namespace rally
