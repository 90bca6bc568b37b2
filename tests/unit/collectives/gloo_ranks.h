// N ranks as threads of this test process, each with a Gloo communicator bootstrapped through one
// in-memory store (the unit tests' way to run collective code without processes).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <thread>
#include <vector>

#include "collectives/gloo/gloo_communicator.h"
#include "collectives/memory_bootstrap_store.h"

namespace rally::collectives::test_support {

// Runs body(rank, comm) on n threads; `base` gives the options other than rank and size.
inline void runGlooRanks(int n, const std::function<void(int, Communicator&)>& body,
                         CommunicatorOptions base = {.generation = 1,
                                                     .op_timeout = Milliseconds(30000)}) {
  MemoryBootstrapStore store;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      CommunicatorOptions o = base;
      o.rank = r;
      o.size = n;
      auto comm = createGlooCommunicator(store, o);
      ASSERT_TRUE(comm.ok()) << comm.status().toString();
      body(r, **comm);
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace rally::collectives::test_support
