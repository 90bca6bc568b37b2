// An agent's copy of the job scope: snapshots, changes, releases, the newer revision winning, the
// holders it is told of, and the messages it is sent back in.
#include "runtime/rendezvous/job_scope_replica.h"

#include <gtest/gtest.h>

#include <string>

namespace rally::rendezvous {
namespace {

namespace v1 = rally::v1;

// A one-message snapshot (`full`: first and last, so complete) or a change.
v1::JobScope message(std::uint64_t revision, bool full = false) {
  v1::JobScope m;
  m.set_revision(revision);
  m.set_full(full);
  m.set_complete(full);
  return m;
}

void entry(v1::JobScope* m, const std::string& key, const std::string& value,
           std::uint64_t revision, bool deleted = false) {
  v1::JobScopeEntry* e = m->add_entries();
  e->set_key(key);
  e->set_value(value);
  e->set_revision(revision);
  e->set_deleted(deleted);
}

TEST(JobScopeReplicaTest, SnapshotsChangesAndReleases) {
  JobScopeReplica r;
  EXPECT_TRUE(r.empty());
  v1::JobScope snap = message(4, /*full=*/true);
  entry(&snap, "a", "1", 1);
  entry(&snap, "b", "2", 4);
  entry(&snap, "gone", "", 3, /*deleted=*/true);
  EXPECT_EQ(r.apply(snap), 4u);
  EXPECT_EQ(r.get("a"), "1");
  EXPECT_EQ(r.get("gone"), std::nullopt) << "a deletion is kept, not a value";
  EXPECT_EQ(r.size(), 3u);

  v1::JobScope change = message(6);
  entry(&change, "a", "10", 5);
  entry(&change, "b", "", 6, /*deleted=*/true);
  EXPECT_EQ(r.apply(change), 6u);
  EXPECT_EQ(r.get("a"), "10");
  EXPECT_EQ(r.get("b"), std::nullopt);
  EXPECT_EQ(r.revision(), 6u);

  v1::JobScope stale = message(3);
  entry(&stale, "a", "old", 2);
  r.apply(stale);
  EXPECT_EQ(r.get("a"), "10") << "never an older value over a newer one";
  EXPECT_EQ(r.revision(), 6u);

  v1::JobScope snap2 = message(9, /*full=*/true);
  entry(&snap2, "c", "3", 9);
  r.apply(snap2);
  EXPECT_EQ(r.get("a"), std::nullopt) << "a snapshot replaces the copy";
  EXPECT_EQ(r.get("c"), "3");

  v1::JobScope release = message(9);
  release.set_release(true);
  EXPECT_EQ(r.apply(release), 9u);
  EXPECT_TRUE(r.empty());
  EXPECT_FALSE(r.held());
  EXPECT_EQ(r.revision(), 0u);
}

TEST(JobScopeReplicaTest, ASnapshotIsHeldOnlyOnceAllOfItCame) {
  JobScopeReplica r;
  v1::JobScope first;
  first.set_full(true);
  entry(&first, "a", "1", 1);
  r.apply(first);
  EXPECT_FALSE(r.held()) << "a holder cut off mid-snapshot holds nothing it could upload";
  EXPECT_TRUE(r.chunks().empty());
  v1::JobScope last = message(2);
  last.set_complete(true);
  entry(&last, "b", "2", 2);
  EXPECT_EQ(r.apply(last), 2u);
  EXPECT_TRUE(r.held());
  EXPECT_EQ(r.get("a"), "1");
  EXPECT_EQ(r.get("b"), "2");
}

TEST(JobScopeReplicaTest, ChunksCarryEveryEntryWithItsRevision) {
  JobScopeReplica r;
  EXPECT_TRUE(r.chunks().empty()) << "nothing held, nothing sent";
  v1::JobScope snap = message(30, /*full=*/true);
  for (int i = 0; i < 20; ++i) {
    entry(&snap, "key" + std::to_string(100 + i), std::string(50, 'x'), 10 + i, i == 7);
  }
  r.apply(snap);
  const auto chunks = r.chunks(/*max_bytes=*/200);
  ASSERT_GT(chunks.size(), 4u) << "about 3 entries of ~70 bytes each a chunk";
  JobScopeReplica copy;
  int entries = 0;
  for (const auto& c : chunks) {
    EXPECT_GE(c.entries_size(), 1);
    EXPECT_FALSE(c.full());
    EXPECT_EQ(c.complete(), &c == &chunks.back()) << "the last one says the copy is all there";
    EXPECT_EQ(c.revision(), 30u);
    entries += c.entries_size();
    copy.apply(c);
  }
  EXPECT_EQ(entries, 20);
  EXPECT_EQ(copy.size(), 20u);
  EXPECT_EQ(copy.get("key107"), std::nullopt);
  EXPECT_EQ(copy.get("key108"), std::string(50, 'x'));
  // One entry bigger than a chunk still goes, alone.
  JobScopeReplica big;
  v1::JobScope b = message(1, true);
  entry(&b, "big", std::string(1000, 'y'), 1);
  big.apply(b);
  ASSERT_EQ(big.chunks(100).size(), 1u);
  EXPECT_EQ(big.chunks(100)[0].entries(0).value().size(), 1000u);
  // A holder of an empty scope says so: one message, no entries, complete.
  JobScopeReplica none;
  none.apply(message(5, /*full=*/true));
  EXPECT_TRUE(none.held());
  ASSERT_EQ(none.chunks().size(), 1u);
  EXPECT_EQ(none.chunks()[0].entries_size(), 0);
  EXPECT_TRUE(none.chunks()[0].complete());
  none.clear();
  EXPECT_FALSE(none.held());
  EXPECT_TRUE(none.chunks().empty()) << "not a holder: nothing to send";
}

TEST(JobScopeReplicaTest, TheNamedHoldersAreKeptAndSentBackFirst) {
  JobScopeReplica r;
  v1::JobScope snap = message(4, /*full=*/true);
  entry(&snap, "a", "1", 4);
  r.apply(snap);
  EXPECT_TRUE(r.holders().empty()) << "none named yet";
  v1::JobScope named = message(4);
  named.add_holders("n1");
  named.add_holders("n2");
  EXPECT_EQ(r.apply(named), 4u) << "acknowledged like any message";
  EXPECT_EQ(r.holders(), (std::vector<std::string>{"n1", "n2"}));
  EXPECT_EQ(r.size(), 1u) << "a list changes no entry";
  v1::JobScope change = message(5);
  entry(&change, "b", "2", 5);
  r.apply(change);
  EXPECT_EQ(r.holders().size(), 2u) << "a change without a list keeps it";
  const auto chunks = r.chunks(/*max_bytes=*/20);
  ASSERT_GE(chunks.size(), 2u);
  EXPECT_EQ(chunks.front().holders_size(), 2) << "the upload names them, in its first message";
  for (size_t i = 1; i < chunks.size(); ++i) EXPECT_EQ(chunks[i].holders_size(), 0) << i;
  v1::JobScope renamed = message(6);
  renamed.add_holders("n3");
  r.apply(renamed);
  EXPECT_EQ(r.holders(), (std::vector<std::string>{"n3"})) << "a new list replaces the old";
  r.apply(message(7, /*full=*/true));
  EXPECT_TRUE(r.holders().empty()) << "a new snapshot starts afresh";
  r.apply(renamed);
  v1::JobScope release;
  release.set_release(true);
  r.apply(release);
  EXPECT_TRUE(r.holders().empty());
  r.apply(renamed);
  r.clear();
  EXPECT_TRUE(r.holders().empty());
}

}  // namespace
}  // namespace rally::rendezvous
