// Communicators bootstrap through the job's coordinator: this adapts a StoreClient (usually scoped
// to the communicator's generation, so that a dead generation's addresses vanish with it and a
// bootstrap blocked on it ends at once) to collectives::BootstrapStore.
//
//   CoordinatorBootstrapStore boot(StoreClient(conn).scoped("comm/", generation));
//   RALLY_ASSIGN_OR_RETURN(auto comm, collectives::createGlooCommunicator(boot, options));
#pragma once

#include <fmt/format.h>

#include "collectives/communicator.h"
#include "runtime/rendezvous/coordinator_client.h"

namespace rally::rendezvous {

class CoordinatorBootstrapStore final : public collectives::BootstrapStore {
 public:
  explicit CoordinatorBootstrapStore(StoreClient store) : store_(std::move(store)) {}

  Status set(const std::string& key, const std::string& value) override {
    return store_.set(key, value);
  }
  Result<std::string> get(const std::string& key) override {
    RALLY_ASSIGN_OR_RETURN(auto value, store_.get(key));
    if (!value) return notFound(fmt::format("bootstrap key '{}' is not set", key));
    return *value;
  }
  Status wait(const std::vector<std::string>& keys, Milliseconds timeout) override {
    return store_.wait(keys, timeout);
  }

 private:
  StoreClient store_;
};

}  // namespace rally::rendezvous
