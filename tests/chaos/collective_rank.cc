// One rank of a Gloo job for chaos tests: bootstraps through a coordinator's store, then allreduces
// a large buffer in a loop, printing each iteration; on an error it prints the error's code and
// message with the time (ms since the epoch) and exits 3.
//   collective_rank ENDPOINT TOKEN RANK SIZE [ELEMENTS]
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include "collectives/gloo/gloo_communicator.h"
#include "runtime/rendezvous/coordinator_bootstrap_store.h"

int main(int argc, char** argv) {
  using namespace rally;
  if (argc < 5) {
    std::cerr << "usage: collective_rank ENDPOINT TOKEN RANK SIZE [ELEMENTS [tcp|shm]]\n";
    return 2;
  }
  rendezvous::ClientOptions o;
  o.endpoint = argv[1];
  o.token = argv[2];
  const int rank = std::atoi(argv[3]), size = std::atoi(argv[4]);
  const size_t elements = argc > 5 ? std::strtoull(argv[5], nullptr, 10) : (4u << 20);
  const bool shared_memory = argc <= 6 || std::string(argv[6]) != "tcp";
  auto conn = rendezvous::CoordinatorConnection::open(o);
  if (!conn.ok()) return 2;
  rendezvous::CoordinatorBootstrapStore boot(rendezvous::StoreClient(*conn).scoped("chaos/", 0));
  auto comm = collectives::createGlooCommunicator(boot, {.rank = rank,
                                                         .size = size,
                                                         .generation = 1,
                                                         .op_timeout = Milliseconds(60'000),
                                                         .shared_memory = shared_memory});
  if (!comm.ok()) {
    std::cout << "bootstrap failed " << comm.status().toString() << std::endl;
    return 1;
  }
  std::cout << "transport " << (collectives::usesSharedMemory(**comm) ? "shm" : "tcp") << std::endl;
  std::vector<float> data(elements, 1.0f);
  for (int i = 0; i < 1'000'000; ++i) {
    const Status s = (*comm)
                         ->allreduce(data.data(), data.size(), collectives::DataType::kF32,
                                     collectives::ReduceOp::kAvg)
                         ->wait(Milliseconds(120'000));
    if (!s.ok()) {
      const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
      std::cout << "error at " << now << " " << statusCodeName(s.code()) << ": " << s.message()
                << std::endl;
      return 3;
    }
    std::cout << "iteration " << i << std::endl;
  }
  return 0;
}
