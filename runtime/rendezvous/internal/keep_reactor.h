// Keeps a finished client reactor (with its grpc::ClientContext) for the process's life instead of
// destroying it. Destroying such a context after OnDone has, rarely, ended the process with "pure
// virtual method called" inside grpc_call_unref (gRPC 1.51: ~AgentSession -> ~ClientContext ->
// grpc_call_unref -> std::terminate, at an agent's exit after its job succeeded). The cause is not
// found. A process finishes few streams (a session per coordinator it joins, a watch per time it
// watches again), so keeping them costs a few KiB each. Reachable from here: not leaks to LSan.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

namespace rally::rendezvous::internal {

template <typename Reactor>
void keepReactor(std::unique_ptr<Reactor> reactor) {
  static std::mutex mu;
  static auto* kept = new std::vector<std::unique_ptr<Reactor>>();  // never destroyed
  std::lock_guard lock(mu);
  kept->push_back(std::move(reactor));
}

}  // namespace rally::rendezvous::internal
