// The coordinator's key-value store, as pure logic: set, get, add, compare-and-set, delete, list by
// prefix, and waits for keys. Keys live in a scope: generation 0 is the job's scope (kept until the
// job ends); any other generation must be the current one, and its keys are dropped when it ends.
//
//   KvStore store(KvLimits{});
//   store.startGeneration(1);
//   RALLY_RETURN_IF_ERROR(store.set(1, "nccl/id", bytes));
//   store.addWaiter(1, {"a", "b"}, [](Status s) { ... });  // called once: OK, or Aborted if gen
//   ends
//
// Limits (key count, key and value sizes) are enforced on every write, with errors that name them.
//
// Thread-safety: none; the owner serialises calls. Waiter callbacks run inside the call that
// satisfied or cancelled them, so they must not call back into the store.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels/base/status.h"

namespace rally::coordinator {

struct KvLimits {
  std::int64_t max_keys = 1'000'000;
  std::int64_t max_key_bytes = 1024;
  std::int64_t max_value_bytes = 1 << 20;
};

struct CasResult {
  bool swapped = false;
  bool present = false;
  std::string value;
};

struct ListResult {
  std::vector<std::string> keys;
  bool more = false;
};

class KvStore {
 public:
  using WaiterId = std::uint64_t;
  using WaiterCallback = std::function<void(Status)>;

  explicit KvStore(KvLimits limits) : limits_(limits) {}

  // Ends every generation below `generation` (their keys dropped, their waiters Aborted) and makes
  // `generation` current.
  void startGeneration(std::uint64_t generation);
  std::uint64_t currentGeneration() const { return current_; }

  Status set(std::uint64_t generation, const std::string& key, std::string value);
  Result<std::optional<std::string>> get(std::uint64_t generation, const std::string& key) const;
  Result<std::int64_t> add(std::uint64_t generation, const std::string& key, std::int64_t delta);
  Result<CasResult> compareAndSet(std::uint64_t generation, const std::string& key,
                                  bool expect_present, const std::string& expected,
                                  std::string desired);
  Result<bool> remove(std::uint64_t generation, const std::string& key);
  Result<ListResult> list(std::uint64_t generation, const std::string& prefix,
                          const std::string& start_after, std::uint32_t limit) const;

  // Calls `done(OK)` once every key exists (at once if they already do), or `done(Aborted)` when
  // the generation ends, or never if cancelled first. Returns 0 if `done` was already called.
  Result<WaiterId> addWaiter(std::uint64_t generation, std::vector<std::string> keys,
                             WaiterCallback done);
  // Removes a waiter and calls its callback with `status`; false if it was already done.
  bool cancelWaiter(WaiterId id, const Status& status);
  // Cancels every waiter (coordinator shutdown).
  void cancelAllWaiters(const Status& status);

  // Called after every change to the job scope (generation 0), inside the call that made it: the
  // key and its new value, or nullptr when it was deleted. One observer; it must not call back
  // into the store.
  using JobScopeObserver = std::function<void(const std::string& key, const std::string* value)>;
  void observeJobScope(JobScopeObserver observer) { job_observer_ = std::move(observer); }
  // Every key and value of the job scope, in key order.
  std::vector<std::pair<std::string, std::string>> jobScope() const;

  std::int64_t keyCount() const { return key_count_; }
  size_t waiterCount() const { return waiters_.size(); }

 private:
  using Scope = std::map<std::string, std::string, std::less<>>;
  struct Waiter {
    std::uint64_t generation;
    std::vector<std::string> missing;
    WaiterCallback done;
  };

  Status checkGeneration(std::uint64_t generation) const;
  Status checkKey(const std::string& key) const;
  Status checkValue(const std::string& key, const std::string& value) const;
  Status checkRoomForNewKey(const std::string& key) const;
  const Scope* scope(std::uint64_t generation) const;
  void written(std::uint64_t generation, const std::string& key);

  KvLimits limits_;
  std::uint64_t current_ = 0;
  std::unordered_map<std::uint64_t, Scope> scopes_;
  std::int64_t key_count_ = 0;
  WaiterId next_waiter_ = 1;
  std::unordered_map<WaiterId, Waiter> waiters_;
  // (generation, key) -> waiters that still miss it.
  std::map<std::pair<std::uint64_t, std::string>, std::vector<WaiterId>> waiting_on_;
  JobScopeObserver job_observer_;
};

}  // namespace rally::coordinator
