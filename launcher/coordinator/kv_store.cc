#include "launcher/coordinator/kv_store.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <limits>

namespace rally::coordinator {
namespace {

constexpr std::uint32_t kDefaultListLimit = 1000;
constexpr std::uint32_t kMaxListLimit = 10'000;

}  // namespace

void KvStore::startGeneration(std::uint64_t generation) {
  if (generation <= current_) return;
  for (auto it = scopes_.begin(); it != scopes_.end();) {
    if (it->first != 0 && it->first < generation) {
      key_count_ -= static_cast<std::int64_t>(it->second.size());
      it = scopes_.erase(it);
    } else {
      ++it;
    }
  }
  const std::uint64_t ended = current_;
  current_ = generation;
  std::vector<WaiterId> doomed;
  for (const auto& [id, w] : waiters_) {
    if (w.generation != 0 && w.generation < generation) doomed.push_back(id);
  }
  for (WaiterId id : doomed) {
    cancelWaiter(id, aborted(fmt::format("generation {} ended while waiting for keys (current is "
                                         "{}): the membership changed",
                                         ended, generation)));
  }
}

Status KvStore::checkGeneration(std::uint64_t generation) const {
  if (generation == 0 || generation == current_) return okStatus();
  if (generation < current_) {
    return aborted(fmt::format("generation {} has ended (current is {}): its keys were dropped",
                               generation, current_));
  }
  return failedPrecondition(
      fmt::format("generation {} has not started (current is {})", generation, current_));
}

Status KvStore::checkKey(const std::string& key) const {
  if (key.empty()) return invalidArgument("empty key: keys must have at least one byte");
  if (static_cast<std::int64_t>(key.size()) > limits_.max_key_bytes) {
    return resourceExhausted(fmt::format(
        "key of {} bytes exceeds the key size limit (max_key_bytes = {}, RALLY_MAX_KEY_BYTES)",
        key.size(), limits_.max_key_bytes));
  }
  return okStatus();
}

Status KvStore::checkValue(const std::string& key, const std::string& value) const {
  if (static_cast<std::int64_t>(value.size()) > limits_.max_value_bytes) {
    return resourceExhausted(fmt::format(
        "value of {} bytes for key '{}' exceeds the value size limit (max_value_bytes = {}, "
        "RALLY_MAX_VALUE_BYTES)",
        value.size(), key, limits_.max_value_bytes));
  }
  return okStatus();
}

Status KvStore::checkRoomForNewKey(const std::string& key) const {
  if (key_count_ >= limits_.max_keys) {
    return resourceExhausted(fmt::format(
        "cannot add key '{}': the store holds {} keys, the key count limit (max_keys = {}, "
        "RALLY_MAX_KEYS)",
        key, key_count_, limits_.max_keys));
  }
  return okStatus();
}

const KvStore::Scope* KvStore::scope(std::uint64_t generation) const {
  const auto it = scopes_.find(generation);
  return it == scopes_.end() ? nullptr : &it->second;
}

Status KvStore::set(std::uint64_t generation, const std::string& key, std::string value) {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  RALLY_RETURN_IF_ERROR(checkKey(key));
  RALLY_RETURN_IF_ERROR(checkValue(key, value));
  Scope& s = scopes_[generation];
  auto it = s.find(key);
  if (it == s.end()) {
    RALLY_RETURN_IF_ERROR(checkRoomForNewKey(key));
    s.emplace(key, std::move(value));
    ++key_count_;
  } else {
    it->second = std::move(value);
  }
  written(generation, key);
  return okStatus();
}

Result<std::optional<std::string>> KvStore::get(std::uint64_t generation,
                                                const std::string& key) const {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  RALLY_RETURN_IF_ERROR(checkKey(key));
  const Scope* s = scope(generation);
  if (s == nullptr) return std::optional<std::string>();
  const auto it = s->find(key);
  if (it == s->end()) return std::optional<std::string>();
  return std::optional<std::string>(it->second);
}

Result<std::int64_t> KvStore::add(std::uint64_t generation, const std::string& key,
                                  std::int64_t delta) {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  RALLY_RETURN_IF_ERROR(checkKey(key));
  Scope& s = scopes_[generation];
  auto it = s.find(key);
  std::int64_t current = 0;
  if (it != s.end()) {
    const std::string& v = it->second;
    auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), current);
    if (v.empty() || ec != std::errc() || ptr != v.data() + v.size()) {
      return invalidArgument(fmt::format(
          "add on key '{}' whose value is not a decimal integer: add only keys that add created "
          "or that hold an integer",
          key));
    }
  } else {
    RALLY_RETURN_IF_ERROR(checkRoomForNewKey(key));
  }
  if ((delta > 0 && current > std::numeric_limits<std::int64_t>::max() - delta) ||
      (delta < 0 && current < std::numeric_limits<std::int64_t>::min() - delta)) {
    return invalidArgument(
        fmt::format("add of {} to key '{}' (value {}) overflows int64", delta, key, current));
  }
  current += delta;
  if (it == s.end()) {
    s.emplace(key, std::to_string(current));
    ++key_count_;
  } else {
    it->second = std::to_string(current);
  }
  written(generation, key);
  return current;
}

Result<CasResult> KvStore::compareAndSet(std::uint64_t generation, const std::string& key,
                                         bool expect_present, const std::string& expected,
                                         std::string desired) {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  RALLY_RETURN_IF_ERROR(checkKey(key));
  RALLY_RETURN_IF_ERROR(checkValue(key, desired));
  Scope& s = scopes_[generation];
  auto it = s.find(key);
  const bool present = it != s.end();
  const bool match = expect_present ? (present && it->second == expected) : !present;
  if (!match) {
    return CasResult{false, present, present ? it->second : std::string()};
  }
  if (!present) {
    RALLY_RETURN_IF_ERROR(checkRoomForNewKey(key));
    it = s.emplace(key, std::move(desired)).first;
    ++key_count_;
  } else {
    it->second = std::move(desired);
  }
  written(generation, key);
  return CasResult{true, true, it->second};
}

Result<bool> KvStore::remove(std::uint64_t generation, const std::string& key) {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  RALLY_RETURN_IF_ERROR(checkKey(key));
  auto sit = scopes_.find(generation);
  if (sit == scopes_.end()) return false;
  const bool existed = sit->second.erase(key) != 0;
  if (existed) --key_count_;
  if (existed && generation == 0 && job_observer_) job_observer_(key, nullptr);
  return existed;
}

std::vector<std::pair<std::string, std::string>> KvStore::jobScope() const {
  std::vector<std::pair<std::string, std::string>> out;
  if (const Scope* s = scope(0)) out.assign(s->begin(), s->end());
  return out;
}

Result<ListResult> KvStore::list(std::uint64_t generation, const std::string& prefix,
                                 const std::string& start_after, std::uint32_t limit) const {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  if (limit == 0) limit = kDefaultListLimit;
  if (limit > kMaxListLimit) {
    return invalidArgument(fmt::format("list limit {} is too large: ask for at most {} keys a page",
                                       limit, kMaxListLimit));
  }
  ListResult out;
  const Scope* s = scope(generation);
  if (s == nullptr) return out;
  auto it = start_after.empty() || start_after < prefix ? s->lower_bound(prefix)
                                                        : s->upper_bound(start_after);
  for (; it != s->end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (out.keys.size() == limit) {
      out.more = true;
      break;
    }
    out.keys.push_back(it->first);
  }
  return out;
}

Result<KvStore::WaiterId> KvStore::addWaiter(std::uint64_t generation,
                                             std::vector<std::string> keys, WaiterCallback done) {
  RALLY_RETURN_IF_ERROR(checkGeneration(generation));
  for (const auto& k : keys) RALLY_RETURN_IF_ERROR(checkKey(k));
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  const Scope* s = scope(generation);
  std::vector<std::string> missing;
  for (auto& k : keys) {
    if (s == nullptr || s->find(k) == s->end()) missing.push_back(std::move(k));
  }
  if (missing.empty()) {
    done(okStatus());
    return WaiterId{0};
  }
  const WaiterId id = next_waiter_++;
  for (const auto& k : missing) waiting_on_[{generation, k}].push_back(id);
  waiters_.emplace(id, Waiter{generation, std::move(missing), std::move(done)});
  return id;
}

bool KvStore::cancelWaiter(WaiterId id, const Status& status) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return false;
  Waiter w = std::move(it->second);
  waiters_.erase(it);
  for (const auto& k : w.missing) {
    auto wit = waiting_on_.find({w.generation, k});
    if (wit == waiting_on_.end()) continue;
    auto& ids = wit->second;
    ids.erase(std::remove(ids.begin(), ids.end(), id), ids.end());
    if (ids.empty()) waiting_on_.erase(wit);
  }
  w.done(status);
  return true;
}

void KvStore::cancelAllWaiters(const Status& status) {
  std::vector<WaiterId> ids;
  ids.reserve(waiters_.size());
  for (const auto& [id, w] : waiters_) ids.push_back(id);
  for (WaiterId id : ids) cancelWaiter(id, status);
}

void KvStore::written(std::uint64_t generation, const std::string& key) {
  if (generation == 0 && job_observer_) job_observer_(key, &scopes_[0].find(key)->second);
  auto wit = waiting_on_.find({generation, key});
  if (wit == waiting_on_.end()) return;
  const std::vector<WaiterId> ids = std::move(wit->second);
  waiting_on_.erase(wit);
  for (WaiterId id : ids) {
    auto it = waiters_.find(id);
    if (it == waiters_.end()) continue;
    auto& missing = it->second.missing;
    missing.erase(std::remove(missing.begin(), missing.end(), key), missing.end());
    if (missing.empty()) {
      WaiterCallback done = std::move(it->second.done);
      waiters_.erase(it);
      done(okStatus());
    }
  }
}

}  // namespace rally::coordinator
