// ElasticState: commit and restore round trips (buffers of every dtype and scalars), bad
// registrations refused with clear messages, and sync() over a Gloo communicator (ranks as
// threads): the newest commit wins from the lowest rank holding it, a replacement with no commit
// receives it, nobody committed -> rank 0's values, mismatched registrations fail on every rank,
// a lost newest commit is reported as a fallback.
#include "runtime/elastic/elastic_state.h"

#include <gtest/gtest.h>

#include <functional>
#include <thread>

#include "collectives/gloo/gloo_communicator.h"
#include "tests/unit/collectives/collective_checks.h"
#include "tests/unit/collectives/gloo_ranks.h"

namespace rally {
namespace {

using collectives::Communicator;
using collectives::test_support::MemoryStore;

void runRanks(int n, const std::function<void(int, Communicator&)>& body) {
  collectives::test_support::runGlooRanks(n, body,
                                          {.generation = 1, .op_timeout = Milliseconds(20000)});
}

// A small model: weights (f32 matrix), a u8 RNG blob, a step and a loss scale.
struct Model {
  std::vector<float> w = std::vector<float>(12);
  std::vector<std::uint8_t> rng = std::vector<std::uint8_t>(5);
  std::int64_t step = 0;
  double scale = 1.0;
  void fill(float base) {
    for (size_t i = 0; i < w.size(); ++i) w[i] = base + static_cast<float>(i) * 0.5f;
    for (size_t i = 0; i < rng.size(); ++i) rng[i] = static_cast<std::uint8_t>(base + i);
    step = static_cast<std::int64_t>(base);
    scale = base / 4;
  }
  Status attach(ElasticState& s) {
    RALLY_RETURN_IF_ERROR(s.registerBuffer("w", w.data(), DataType::kF32, {3, 4}));
    RALLY_RETURN_IF_ERROR(s.registerBuffer("rng", rng.data(), DataType::kU8, {5}));
    RALLY_RETURN_IF_ERROR(s.registerScalar("step", &step));
    return s.registerScalar("scale", &scale);
  }
  bool operator==(const Model& o) const {
    return w == o.w && rng == o.rng && step == o.step && scale == o.scale;
  }
};

TEST(ElasticState, CommitThenRestoreRollsBack) {
  Model m;
  ElasticState s;
  ASSERT_TRUE(m.attach(s).ok());
  EXPECT_EQ(s.bytes(), 12u * 4 + 5);
  EXPECT_EQ(s.restore().code(), StatusCode::kFailedPrecondition);
  m.fill(3);
  ASSERT_TRUE(s.commit().ok());
  EXPECT_EQ(s.commitNumber(), 1u);
  const Model committed = m;
  m.fill(9);
  ASSERT_TRUE(s.restore().ok());
  EXPECT_TRUE(m == committed);
  EXPECT_EQ(s.layout(),
            "w f32 [3, 4] 48 B\nrng u8 [5] 5 B\nstep int64 scalar\nscale float64 scalar\n");
}

TEST(ElasticState, EveryDtypeRoundTripsBitForBit) {
  ElasticState s;
  std::vector<std::vector<unsigned char>> bufs;
  const DataType types[] = {DataType::kF32, DataType::kF64, DataType::kF16, DataType::kBF16,
                            DataType::kI32, DataType::kI64, DataType::kU8};
  for (DataType t : types) {
    bufs.emplace_back(7 * collectives::dataTypeSize(t));
    for (size_t i = 0; i < bufs.back().size(); ++i)
      bufs.back()[i] = static_cast<unsigned char>(i * 37 + 1);
    ASSERT_TRUE(
        s.registerBuffer(std::string(collectives::dataTypeName(t)), bufs.back().data(), t, {7})
            .ok());
  }
  const auto saved = bufs;
  ASSERT_TRUE(s.commit().ok());
  for (auto& b : bufs) std::fill(b.begin(), b.end(), 0xEE);
  ASSERT_TRUE(s.restore().ok());
  EXPECT_EQ(bufs, saved);
}

TEST(ElasticState, RefusesBadRegistrationsAndDropsTheSnapshotOnChange) {
  ElasticState s;
  float x[4] = {1, 2, 3, 4};
  ASSERT_TRUE(s.registerBuffer("x", x, DataType::kF32, {4}).ok());
  const Status dup = s.registerBuffer("x", x, DataType::kF32, {4});
  EXPECT_EQ(dup.code(), StatusCode::kAlreadyExists);
  EXPECT_NE(dup.message().find("'x' is already registered"), std::string::npos);
  EXPECT_EQ(s.registerBuffer("neg", x, DataType::kF32, {2, -1}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(s.registerBuffer("null", nullptr, DataType::kF32, {2}).code(),
            StatusCode::kInvalidArgument);
  const Status gpu = s.registerBuffer("gpu", x, DataType::kF32, {4}, Device::cuda(0));
  EXPECT_EQ(gpu.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(gpu.message().find("set a DeviceCopier first"), std::string::npos) << gpu.message();
  EXPECT_EQ(s.unregister("nope").code(), StatusCode::kNotFound);
  ASSERT_TRUE(s.commit().ok());
  std::int64_t y = 5;
  ASSERT_TRUE(s.registerScalar("y", &y).ok());
  EXPECT_FALSE(s.hasCommit());  // the old snapshot does not cover y
  ASSERT_TRUE(s.commit().ok());
  ASSERT_TRUE(s.unregister("x").ok());
  EXPECT_EQ(s.bytes(), 0u);
  y = 6;
  ASSERT_TRUE(s.commit().ok());
  y = 7;
  ASSERT_TRUE(s.restore().ok());
  EXPECT_EQ(y, 6);
}

// Rank 1 holds the newest commit (3), rank 0 an older one (2), rank 2 is a replacement with none:
// all end with rank 1's commit 3, restored into their memory.
TEST(ElasticStateSync, NewestCommitWinsAndReachesAReplacement) {
  std::vector<Model> finals(3);
  runRanks(3, [&](int rank, Communicator& comm) {
    Model m;
    ElasticState s;
    ASSERT_TRUE(m.attach(s).ok());
    if (rank == 0) {
      for (int c = 1; c <= 2; ++c) {
        m.fill(static_cast<float>(c));
        ASSERT_TRUE(s.commit().ok());
      }
    } else if (rank == 1) {
      for (int c = 1; c <= 3; ++c) {
        m.fill(static_cast<float>(10 + c));
        ASSERT_TRUE(s.commit().ok());
      }
    }
    m.fill(99);  // uncommitted progress: rolled back
    auto r = s.sync(comm);
    ASSERT_TRUE(r.ok()) << r.status().toString();
    EXPECT_EQ(r->commit, 3u);
    EXPECT_EQ(r->source_rank, 1);
    EXPECT_EQ(r->received, rank != 1);
    EXPECT_EQ(s.commitNumber(), 3u);
    finals[rank] = m;
  });
  Model want;
  want.fill(13);
  for (const Model& m : finals) EXPECT_TRUE(m == want);
}

TEST(ElasticStateSync, NobodyCommittedStartsFromRankZero) {
  std::vector<Model> finals(2);
  runRanks(2, [&](int rank, Communicator& comm) {
    Model m;
    m.fill(static_cast<float>(rank * 50 + 1));
    ElasticState s;
    ASSERT_TRUE(m.attach(s).ok());
    auto r = s.sync(comm);
    ASSERT_TRUE(r.ok()) << r.status().toString();
    EXPECT_EQ(r->commit, 1u);
    EXPECT_EQ(r->source_rank, 0);
    finals[rank] = m;
  });
  EXPECT_TRUE(finals[0] == finals[1]);
  Model want;
  want.fill(1);
  EXPECT_TRUE(finals[1] == want);
}

TEST(ElasticStateSync, EveryoneHoldingTheNewestRollsBackWithoutABroadcast) {
  runRanks(2, [&](int rank, Communicator& comm) {
    Model m;
    ElasticState s;
    ASSERT_TRUE(m.attach(s).ok());
    m.fill(4);
    ASSERT_TRUE(s.commit().ok());
    m.fill(static_cast<float>(20 + rank));
    auto r = s.sync(comm, {.known_newest = 2});
    ASSERT_TRUE(r.ok()) << r.status().toString();
    EXPECT_EQ(r->source_rank, -1);
    EXPECT_FALSE(r->received);
    EXPECT_EQ(r->fell_back_from, 2u);  // commit 2 was known but nobody here holds it
    Model want;
    want.fill(4);
    EXPECT_TRUE(m == want);
  });
}

TEST(ElasticStateSync, MismatchedRegistrationsFailOnEveryRankNamingTheEntries) {
  runRanks(3, [&](int rank, Communicator& comm) {
    std::vector<float> w(rank == 2 ? 5 : 4);
    ElasticState s;
    ASSERT_TRUE(
        s.registerBuffer("w", w.data(), DataType::kF32, {static_cast<std::int64_t>(w.size())})
            .ok());
    auto r = s.sync(comm);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    if (rank == 2) {
      EXPECT_NE(r.status().message().find("w f32 [5] 20 B"), std::string::npos)
          << r.status().message();
      EXPECT_NE(r.status().message().find("w f32 [4] 16 B"), std::string::npos);
    } else {
      EXPECT_NE(r.status().message().find("another rank's registered entries differ"),
                std::string::npos);
    }
  });
}

}  // namespace
}  // namespace rally
