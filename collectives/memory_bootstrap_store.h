// A BootstrapStore held in this process's memory: for a world of one (no launcher), and for ranks
// as threads of one process (tests, embedding).
//
//   collectives::MemoryBootstrapStore store;
//   auto comm = collectives::createGlooCommunicator(store, {.rank = 0, .size = 1});
//
// Thread-safety: all methods are thread-safe; wait() wakes when another thread sets the keys.
#pragma once

#include <fmt/format.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "collectives/communicator.h"

namespace rally::collectives {

class MemoryBootstrapStore final : public BootstrapStore {
 public:
  Status set(const std::string& key, const std::string& value) override {
    {
      std::lock_guard lock(mu_);
      data_[key] = value;
    }
    cv_.notify_all();
    return okStatus();
  }
  Result<std::string> get(const std::string& key) override {
    std::lock_guard lock(mu_);
    auto it = data_.find(key);
    if (it == data_.end()) return notFound(fmt::format("bootstrap key '{}' is not set", key));
    return it->second;
  }
  Status wait(const std::vector<std::string>& keys, Milliseconds timeout) override {
    std::unique_lock lock(mu_);
    const bool ok = cv_.wait_for(lock, timeout, [&] {
      for (const auto& k : keys) {
        if (data_.count(k) == 0) return false;
      }
      return true;
    });
    return ok ? okStatus()
              : timeoutError(fmt::format("bootstrap keys not set within {} (in this process's "
                                         "memory store)",
                                         formatDuration(timeout)));
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> data_;
};

}  // namespace rally::collectives
