// The store as pure logic: every operation, generation scoping, waiters, limits, paging.
#include "launcher/coordinator/kv_store.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

namespace rally::coordinator {
namespace {

TEST(KvStoreTest, SetGetDeleteInJobScope) {
  KvStore s(KvLimits{});
  ASSERT_TRUE(s.set(0, "a", "1").ok());
  auto v = s.get(0, "a");
  ASSERT_TRUE(v.ok());
  ASSERT_TRUE(v->has_value());
  EXPECT_EQ(**v, "1");
  ASSERT_TRUE(s.set(0, "a", std::string("\0bin\xff", 5)).ok());
  EXPECT_EQ(**s.get(0, "a"), std::string("\0bin\xff", 5)) << "values are bytes";
  EXPECT_FALSE(s.get(0, "missing")->has_value());
  EXPECT_TRUE(*s.remove(0, "a"));
  EXPECT_FALSE(*s.remove(0, "a"));
  EXPECT_EQ(s.keyCount(), 0);
}

TEST(KvStoreTest, EveryChangeOfTheJobScopeIsObservedAndNothingElse) {
  KvStore s(KvLimits{});
  std::vector<std::string> seen;
  s.observeJobScope([&](const std::string& key, const std::string* value) {
    seen.push_back(key + "=" + (value ? *value : std::string("<deleted>")));
  });
  s.startGeneration(3);
  ASSERT_TRUE(s.set(0, "a", "1").ok());
  ASSERT_TRUE(s.add(0, "n", 5).ok());
  ASSERT_TRUE(s.compareAndSet(0, "a", true, "1", "2").ok());
  ASSERT_TRUE(s.compareAndSet(0, "a", true, "1", "3").ok());  // no swap: no change
  ASSERT_TRUE(s.remove(0, "a").ok());
  ASSERT_TRUE(s.remove(0, "a").ok());         // nothing to delete
  ASSERT_TRUE(s.set(3, "scoped", "x").ok());  // a generation's key: not the job scope
  ASSERT_FALSE(s.set(0, "", "x").ok());       // refused: no change
  EXPECT_EQ(seen, (std::vector<std::string>{"a=1", "n=5", "a=2", "a=<deleted>"}));
  ASSERT_TRUE(s.set(0, "b", "y").ok());
  const auto all = s.jobScope();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0], (std::pair<std::string, std::string>{"b", "y"}));
  EXPECT_EQ(all[1], (std::pair<std::string, std::string>{"n", "5"}));
}

TEST(KvStoreTest, AddCreatesAtZeroAndRejectsNonIntegers) {
  KvStore s(KvLimits{});
  EXPECT_EQ(*s.add(0, "n", 5), 5);
  EXPECT_EQ(*s.add(0, "n", -7), -2);
  EXPECT_EQ(**s.get(0, "n"), "-2");
  ASSERT_TRUE(s.set(0, "t", "text").ok());
  auto r = s.add(0, "t", 1);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("'t'"), std::string::npos);
  ASSERT_TRUE(s.set(0, "big", std::to_string(std::numeric_limits<std::int64_t>::max())).ok());
  EXPECT_EQ(s.add(0, "big", 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(**s.get(0, "big"), std::to_string(std::numeric_limits<std::int64_t>::max()))
      << "an overflowing add changes nothing";
}

TEST(KvStoreTest, CompareAndSet) {
  KvStore s(KvLimits{});
  auto r = s.compareAndSet(0, "k", /*expect_present=*/false, "", "v1");
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->swapped);
  r = s.compareAndSet(0, "k", false, "", "v2");
  EXPECT_FALSE(r->swapped);
  EXPECT_TRUE(r->present);
  EXPECT_EQ(r->value, "v1");
  r = s.compareAndSet(0, "k", true, "wrong", "v3");
  EXPECT_FALSE(r->swapped);
  EXPECT_EQ(r->value, "v1");
  r = s.compareAndSet(0, "k", true, "v1", "v3");
  EXPECT_TRUE(r->swapped);
  EXPECT_EQ(r->value, "v3");
  r = s.compareAndSet(0, "absent", true, "", "x");
  EXPECT_FALSE(r->swapped);
  EXPECT_FALSE(r->present);
}

TEST(KvStoreTest, GenerationScopesAreDroppedWhenTheGenerationEnds) {
  KvStore s(KvLimits{});
  s.startGeneration(1);
  ASSERT_TRUE(s.set(1, "nccl_id", "abc").ok());
  ASSERT_TRUE(s.set(0, "job_key", "kept").ok());
  EXPECT_EQ(s.keyCount(), 2);
  s.startGeneration(2);
  EXPECT_EQ(s.keyCount(), 1);
  auto old = s.get(1, "nccl_id");
  EXPECT_EQ(old.status().code(), StatusCode::kAborted);
  EXPECT_NE(old.status().message().find("generation 1 has ended"), std::string::npos);
  EXPECT_EQ(**s.get(0, "job_key"), "kept");
  EXPECT_FALSE(s.get(2, "nccl_id")->has_value()) << "a new generation starts empty";
  EXPECT_EQ(s.set(5, "x", "y").code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.set(1, "x", "y").code(), StatusCode::kAborted);
}

TEST(KvStoreTest, WaiterFiresWhenAllKeysExist) {
  KvStore s(KvLimits{});
  std::vector<Status> done;
  auto id = s.addWaiter(0, {"a", "b", "a"}, [&](Status st) { done.push_back(st); });
  ASSERT_TRUE(id.ok());
  EXPECT_NE(*id, 0u);
  ASSERT_TRUE(s.set(0, "a", "1").ok());
  EXPECT_TRUE(done.empty());
  ASSERT_TRUE(s.add(0, "b", 1).ok());
  ASSERT_EQ(done.size(), 1u);
  EXPECT_TRUE(done[0].ok());
  EXPECT_EQ(s.waiterCount(), 0u);
  // Already present: done at once, id 0.
  auto again = s.addWaiter(0, {"a", "b"}, [&](Status st) { done.push_back(st); });
  EXPECT_EQ(*again, 0u);
  EXPECT_EQ(done.size(), 2u);
}

TEST(KvStoreTest, WaiterIsAbortedWhenItsGenerationEnds) {
  KvStore s(KvLimits{});
  s.startGeneration(3);
  std::vector<Status> done;
  ASSERT_TRUE(s.addWaiter(3, {"x"}, [&](Status st) { done.push_back(st); }).ok());
  ASSERT_TRUE(s.addWaiter(0, {"y"}, [&](Status st) { done.push_back(st); }).ok());
  s.startGeneration(4);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].code(), StatusCode::kAborted);
  EXPECT_EQ(s.waiterCount(), 1u) << "the job-scope waiter survives";
}

TEST(KvStoreTest, CancelledWaiterIsCalledOnceAndForgotten) {
  KvStore s(KvLimits{});
  int calls = 0;
  auto id = s.addWaiter(0, {"k"}, [&](Status st) {
    ++calls;
    EXPECT_EQ(st.code(), StatusCode::kTimeout);
  });
  EXPECT_TRUE(s.cancelWaiter(*id, timeoutError("t")));
  EXPECT_FALSE(s.cancelWaiter(*id, timeoutError("t")));
  ASSERT_TRUE(s.set(0, "k", "v").ok());
  EXPECT_EQ(calls, 1);
}

TEST(KvStoreTest, LimitsNameThemselves) {
  KvStore s(KvLimits{.max_keys = 2, .max_key_bytes = 8, .max_value_bytes = 4});
  auto st = s.set(0, "123456789", "v");
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("max_key_bytes"), std::string::npos);
  st = s.set(0, "k", "12345");
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("max_value_bytes"), std::string::npos);
  ASSERT_TRUE(s.set(0, "a", "1").ok());
  ASSERT_TRUE(s.set(0, "b", "1").ok());
  st = s.set(0, "c", "1");
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("max_keys"), std::string::npos);
  EXPECT_TRUE(s.set(0, "a", "2").ok()) << "overwriting needs no room";
  EXPECT_EQ(s.add(0, "c", 1).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.compareAndSet(0, "c", false, "", "x").status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(s.set(0, "", "x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.keyCount(), 2);
}

TEST(KvStoreTest, ListByPrefixWithPaging) {
  KvStore s(KvLimits{});
  for (int i = 0; i < 25; ++i) ASSERT_TRUE(s.set(0, "p/" + std::to_string(100 + i), "v").ok());
  ASSERT_TRUE(s.set(0, "q/1", "v").ok());
  ASSERT_TRUE(s.set(0, "o/1", "v").ok());
  std::vector<std::string> all;
  std::string after;
  for (int page = 0; page < 10; ++page) {
    auto r = s.list(0, "p/", after, 10);
    ASSERT_TRUE(r.ok());
    all.insert(all.end(), r->keys.begin(), r->keys.end());
    if (!r->more) break;
    after = r->keys.back();
  }
  ASSERT_EQ(all.size(), 25u);
  EXPECT_EQ(all.front(), "p/100");
  EXPECT_EQ(all.back(), "p/124");
  EXPECT_EQ(s.list(0, "", "", 0)->keys.size(), 27u);
  EXPECT_EQ(s.list(0, "p/", "", 100000).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace rally::coordinator
