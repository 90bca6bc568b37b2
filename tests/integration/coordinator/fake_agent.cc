// A minimal agent process for tests: joins the coordinator, heartbeats, prints what it learns, and
// runs until it is killed or dismissed.
//   fake_agent ENDPOINT TOKEN NODE_ID [JOB_ID]
#include <iostream>

#include "runtime/rendezvous/agent_session.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: fake_agent ENDPOINT TOKEN NODE_ID [JOB_ID]\n";
    return 2;
  }
  rally::rendezvous::ClientOptions o;
  o.endpoint = argv[1];
  o.token = argv[2];
  auto conn = rally::rendezvous::CoordinatorConnection::open(o);
  if (!conn.ok()) {
    std::cerr << conn.status().toString() << "\n";
    return 1;
  }
  auto session = rally::rendezvous::AgentSession::open(
      *conn, {.node_id = argv[3], .job_id = argc > 4 ? argv[4] : "job", .local_world_size = 1,
              .address = "127.0.0.1"});
  if (!session.ok()) {
    std::cerr << session.status().toString() << "\n";
    return 1;
  }
  for (;;) {
    auto m = (*session)->next(rally::Milliseconds(3'600'000));
    if (!m.ok()) {
      std::cout << "ended " << m.status().toString() << std::endl;
      return 0;
    }
    if (m->has_welcome()) std::cout << "welcome" << std::endl;
    if (m->has_round_formed()) {
      std::cout << "round " << m->round_formed().generation() << " rank "
                << m->round_formed().node_rank() << std::endl;
    }
    if (m->has_shutdown()) std::cout << "shutdown " << m->shutdown().reason() << std::endl;
  }
}
