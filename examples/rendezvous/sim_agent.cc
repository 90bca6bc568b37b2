// A simulated node agent: joins a rally coordinator, heartbeats, and prints what the coordinator
// tells it, until it is killed, dismissed, or the coordinator shuts down. The node of rank 0 admits
// waiting nodes at once (as a restart-level launcher would). Used by scripts/demo and the tests; it
// is also the shortest complete use of the rendezvous client API.
//
//   sim_agent ENDPOINT TOKEN_FILE NODE_ID [JOB_ID]
#include <fmt/format.h>

#include <chrono>
#include <iostream>

#include "runtime/rendezvous/agent_session.h"
#include "runtime/rendezvous/grpc_status.h"

namespace {

std::string stamp() {
  using namespace std::chrono;
  const auto ms = duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
  return fmt::format("{:02}:{:02}.{:03}", (ms / 60000) % 60, (ms / 1000) % 60, ms % 1000);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: sim_agent ENDPOINT TOKEN_FILE NODE_ID [JOB_ID]\n";
    return 2;
  }
  rally::rendezvous::routeGrpcLogs();
  const std::string node = argv[3];
  auto token = rally::rendezvous::readTokenFile(argv[2]);
  if (!token.ok()) {
    std::cerr << "sim_agent: " << token.status().message() << "\n";
    return 2;
  }
  rally::rendezvous::ClientOptions options;
  options.endpoint = argv[1];
  options.token = *token;
  auto conn = rally::rendezvous::CoordinatorConnection::open(options);
  if (!conn.ok()) {
    std::cerr << "sim_agent: " << conn.status().message() << "\n";
    return 2;
  }
  auto session =
      rally::rendezvous::AgentSession::open(*conn, {.node_id = node,
                                                    .job_id = argc > 4 ? argv[4] : "demo",
                                                    .local_world_size = 2,
                                                    .address = "127.0.0.1"});
  if (!session.ok()) {
    std::cerr << "sim_agent: " << session.status().message() << "\n";
    return 1;
  }
  std::uint32_t rank = 0;
  bool member = false;
  for (;;) {
    auto m = (*session)->next(rally::Milliseconds(3'600'000));
    if (!m.ok()) {
      std::cout << fmt::format("{} [{}] session ended: {}", stamp(), node, m.status().toString())
                << std::endl;
      return 0;
    }
    if (m->has_welcome()) {
      std::cout << fmt::format("{} [{}] joined{}", stamp(), node,
                               m->welcome().waiting() ? " (held for the next round)" : "")
                << std::endl;
    } else if (m->has_round_formed()) {
      const auto& r = m->round_formed();
      rank = r.node_rank();
      member = true;
      std::cout << fmt::format(
                       "{} [{}] generation {}: node rank {} of {}, workers {}..{} of {} ({})",
                       stamp(), node, r.generation(), r.node_rank(), r.num_nodes(), r.rank_offset(),
                       r.rank_offset() + 1, r.world_size(), r.cause())
                << std::endl;
    } else if (m->has_generation()) {
      std::cout << fmt::format("{} [{}] generation {}: {}", stamp(), node,
                               m->generation().generation(), m->generation().cause())
                << std::endl;
    } else if (m->has_nodes_waiting()) {
      if (member && rank == 0 && m->nodes_waiting().count() > 0) {
        std::cout << fmt::format("{} [{}] {} node(s) waiting: asking for a new round", stamp(),
                                 node, m->nodes_waiting().count())
                  << std::endl;
        (*session)->requestReform("admit waiting nodes");
      }
    } else if (m->has_shutdown()) {
      std::cout << fmt::format("{} [{}] coordinator says: {}", stamp(), node,
                               m->shutdown().reason())
                << std::endl;
    }
  }
}
