// A coordinator served over loopback inside the test process, with helpers to reach it.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "launcher/coordinator/coordinator_server.h"
#include "runtime/rendezvous/agent_session.h"
#include "runtime/rendezvous/coordinator_client.h"
#include "runtime/rendezvous/generation_watcher.h"

namespace rally::testing {

inline constexpr char kToken[] = "test-token-0123456789";

class CoordinatorFixture : public ::testing::Test {
 protected:
  // Short intervals so that tests run fast; the defaults are in the tunables registry.
  static coordinator::CoordinatorOptions defaultOptions() {
    coordinator::CoordinatorOptions o;
    o.token = kToken;
    o.rendezvous.job_id = "job";
    o.rendezvous.min_nodes = 1;
    o.rendezvous.max_nodes = 4;
    o.rendezvous.last_call = Milliseconds(200);
    o.heartbeat_interval = Milliseconds(200);
    // Store calls are answered before any node joins (a real coordinator holds job-scope calls
    // until the first Join shows whether it resumes a job: tested on its own).
    o.job_scope_grace = Milliseconds(0);
    return o;
  }

  void startServer(coordinator::CoordinatorOptions options = defaultOptions(),
                   std::int64_t max_message_bytes = 4 << 20) {
    options_ = options;
    auto s = coordinator::CoordinatorServer::start(
        std::move(options),
        {.host = "127.0.0.1", .port = 0, .max_message_bytes = max_message_bytes});
    ASSERT_TRUE(s.ok()) << s.status().toString();
    server_ = std::move(*s);
    endpoint_ = "127.0.0.1:" + std::to_string(server_->port());
  }

  void SetUp() override { startServer(); }
  void TearDown() override {
    if (server_) server_->shutdown("test over", Milliseconds(500));
  }

  std::shared_ptr<rendezvous::CoordinatorConnection> connect(
      const std::string& token = kToken, bool dedicated = false,
      std::int64_t max_message_bytes = 4 << 20) {
    rendezvous::ClientOptions o;
    o.endpoint = endpoint_;
    o.token = token;
    o.rpc_timeout = Milliseconds(5000);
    o.connect_timeout = Milliseconds(5000);
    o.dedicated_connection = dedicated;
    o.max_message_bytes = max_message_bytes;
    auto c = rendezvous::CoordinatorConnection::open(o);
    EXPECT_TRUE(c.ok()) << c.status().toString();
    return *c;
  }

  std::unique_ptr<rendezvous::AgentSession> join(const std::string& node_id, std::uint32_t lws = 1,
                                                 rendezvous::AgentSessionOptions opts = {}) {
    auto s = rendezvous::AgentSession::open(connect(kToken, /*dedicated=*/true),
                                            {.node_id = node_id,
                                             .job_id = "job",
                                             .local_world_size = lws,
                                             .address = node_id + ".local"},
                                            std::move(opts));
    EXPECT_TRUE(s.ok()) << s.status().toString();
    return std::move(*s);
  }

  static bool isRoundFormed(const rally::v1::CoordinatorMessage& m) { return m.has_round_formed(); }

  // Polls `done` every 25 ms for at most `limit`; returns its last answer.
  static bool eventually(const std::function<bool()>& done,
                         Milliseconds limit = Milliseconds(5000)) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (!done()) {
      if (std::chrono::steady_clock::now() >= until) return done();
      std::this_thread::sleep_for(Milliseconds(25));
    }
    return true;
  }

  // A session from a plain gRPC stream: writes `messages`, half-closes, reads to the end.
  static grpc::Status rawSession(rendezvous::CoordinatorConnection& conn,
                                 const std::vector<rally::v1::AgentMessage>& messages) {
    grpc::ClientContext ctx;
    conn.prepareContext(&ctx, Milliseconds(5000));
    auto stream = conn.stub()->Session(&ctx);
    for (const auto& m : messages) stream->Write(m);
    stream->WritesDone();
    rally::v1::CoordinatorMessage in;
    while (stream->Read(&in)) {
    }
    return stream->Finish();
  }

  coordinator::CoordinatorOptions options_;
  std::unique_ptr<coordinator::CoordinatorServer> server_;
  std::string endpoint_;
};

}  // namespace rally::testing
