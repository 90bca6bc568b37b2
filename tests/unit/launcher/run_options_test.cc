// `rally run` options: both spellings, PET_* variables, torchrun's defaults, and one clear line for
// each bad value.
#include "launcher/cli/run_options.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>

namespace rally::cli {
namespace {

Result<RunOptions> parse(std::vector<std::string> args, Environment env = {}) {
  return parseRunOptions(args, env);
}

std::string error(std::vector<std::string> args, Environment env = {}) {
  auto r = parse(std::move(args), std::move(env));
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message().find('\n'), std::string::npos) << "one line";
  return r.status().message();
}

TEST(RunOptionsTest, TorchrunDefaults) {
  auto o = parse({"train.py"});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_EQ(o->min_nodes, 1u);
  EXPECT_EQ(o->max_nodes, 1u);
  EXPECT_EQ(o->local_world_size, 1);
  EXPECT_EQ(o->rdzv_id, "none");
  EXPECT_EQ(o->role, "default");
  EXPECT_EQ(o->max_restarts, 0);
  EXPECT_TRUE(o->standalone) << "one node and no endpoint: a local rendezvous";
  EXPECT_EQ(o->signals_to_handle, (std::vector<int>{SIGTERM, SIGINT, SIGHUP, SIGQUIT}));
  EXPECT_EQ(o->command(), (std::vector<std::string>{"python3", "-u", "train.py"}));
}

TEST(RunOptionsTest, BothSpellingsAreAccepted) {
  for (const auto& flag : {"--nproc-per-node", "--nproc_per_node"}) {
    auto o = parse({flag, "4", "train.py"});
    ASSERT_TRUE(o.ok()) << flag;
    EXPECT_EQ(o->local_world_size, 4) << flag;
  }
  auto o = parse({"--nproc_per_node=3", "--max_restarts=2", "--rdzv_id=abc", "--rdzv-endpoint",
                  "10.0.0.1", "--nnodes=2:4", "--rdzv_backend=c10d", "--log_dir", "/tmp/x",
                  "--local-ranks-filter", "0,2", "train.py"});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_EQ(o->local_world_size, 3);
  EXPECT_EQ(o->max_restarts, 2);
  EXPECT_EQ(o->rdzv_id, "abc");
  EXPECT_EQ(o->rdzv_endpoint, "10.0.0.1:29400") << "torchrun's default rendezvous port";
  EXPECT_EQ(o->min_nodes, 2u);
  EXPECT_EQ(o->max_nodes, 4u);
  EXPECT_EQ(o->rdzv_backend, "rally") << "c10d is an alias for rally's coordinator";
  EXPECT_EQ(o->log_dir, "/tmp/x");
  EXPECT_EQ(*o->local_ranks_filter, (std::set<int>{0, 2}));
  EXPECT_FALSE(o->standalone);
}

TEST(RunOptionsTest, PetVariablesSetWhatTheCommandLineDoesNot) {
  Environment env = {
      {"PET_NPROC_PER_NODE", "2"}, {"PET_NNODES", "1:3"},   {"PET_RDZV_ENDPOINT", "host:1234"},
      {"PET_MAX_RESTARTS", "5"},   {"PET_STANDALONE", "0"}, {"PET_NO_PYTHON", "1"}};
  auto o = parse({"--max-restarts", "1", "./prog", "--flag"}, env);
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_EQ(o->local_world_size, 2);
  EXPECT_EQ(o->max_nodes, 3u);
  EXPECT_EQ(o->rdzv_endpoint, "host:1234");
  EXPECT_EQ(o->max_restarts, 1) << "the command line wins over PET_*";
  EXPECT_TRUE(o->no_python);
  EXPECT_EQ(o->command(), (std::vector<std::string>{"./prog", "--flag"}));
}

TEST(RunOptionsTest, ProgramArgumentsBelongToTheProgram) {
  auto o = parse({"--nproc-per-node", "2", "train.py", "--nproc-per-node", "9", "--lr=0.1"});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->local_world_size, 2);
  EXPECT_EQ(o->script_args, (std::vector<std::string>{"--nproc-per-node", "9", "--lr=0.1"}));
}

TEST(RunOptionsTest, CommandForModulesProgramsAndPythonExec) {
  auto o = parse({"-m", "pkg.train", "--x"}, {{"PYTHON_EXEC", "/usr/bin/python3"}});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->command(),
            (std::vector<std::string>{"/usr/bin/python3", "-u", "-m", "pkg.train", "--x"}));
  o = parse({"./a.out", "1"});
  EXPECT_EQ(o->command(), (std::vector<std::string>{"./a.out", "1"})) << "not .py: run directly";
  o = parse({"--no-python", "train.py"});
  EXPECT_EQ(o->command(), (std::vector<std::string>{"train.py"}));
}

TEST(RunOptionsTest, RedirectsAndTee) {
  auto o = parse({"--redirects", "3", "--tee", "0:1,1:2", "train.py"});
  ASSERT_TRUE(o.ok());
  EXPECT_TRUE(o->redirects.forRank(5).out);
  EXPECT_TRUE(o->redirects.forRank(5).err);
  EXPECT_TRUE(o->tee.forRank(0).out);
  EXPECT_FALSE(o->tee.forRank(0).err);
  EXPECT_TRUE(o->tee.forRank(1).err);
  EXPECT_FALSE(o->tee.forRank(2).out);
}

TEST(RunOptionsTest, NprocPerNodeCpuAndAuto) {
  auto o = parse({"--nproc-per-node", "cpu", "t.py"});
  ASSERT_TRUE(o.ok());
  EXPECT_GE(o->local_world_size, 1);
  o = parse({"--nproc-per-node", "auto", "t.py"}, {{"CUDA_VISIBLE_DEVICES", ""}});
  ASSERT_TRUE(o.ok());
  EXPECT_GE(o->local_world_size, 1);
}

TEST(RunOptionsTest, StaticBackend) {
  auto o = parse({"--rdzv-backend", "static", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                  "10.1.1.1", "--master-port", "29600", "t.py"});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_TRUE(o->staticBackend());
  EXPECT_EQ(o->node_rank, 1);
  EXPECT_EQ(o->master_port, 29600);
  EXPECT_NE(error({"--rdzv-backend", "static", "--nnodes", "2", "--node-rank", "2", "t.py"})
                .find("--node-rank 2"),
            std::string::npos);
  EXPECT_NE(error({"--rdzv-backend", "static", "--nnodes", "1:2", "t.py"}).find("fixed"),
            std::string::npos);
}

TEST(RunOptionsTest, TunablesFromFlagsAndEnvironment) {
  auto o = parse({"--grace-period", "5s", "t.py"}, {{"RALLY_EXIT_BARRIER_TIMEOUT", "10s"}});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_EQ(*o->tunables.duration("grace_period"), Milliseconds(5000));
  EXPECT_EQ(*o->tunables.duration("exit_barrier_timeout"), Milliseconds(10000));
  EXPECT_NE(error({"--grace-period", "soon", "t.py"}).find("--grace-period"), std::string::npos);
}

TEST(RunOptionsTest, BadValuesGetOneClearLine) {
  EXPECT_NE(error({"--nnodes", "3:2", "t.py"}).find("MIN is larger than MAX"), std::string::npos);
  EXPECT_NE(error({"--nnodes", "0", "t.py"}).find("--nnodes '0'"), std::string::npos);
  EXPECT_NE(error({"--nproc-per-node", "-1", "t.py"}).find("--nproc-per-node '-1'"),
            std::string::npos);
  EXPECT_NE(error({"--nproc-per-node", "many", "t.py"}).find("auto, cpu or gpu"),
            std::string::npos);
  EXPECT_NE(error({"--rdzv-backend", "zookeeper", "t.py"}).find("'zookeeper' is not known"),
            std::string::npos);
  EXPECT_NE(error({"--nproc-per-node", "2"}).find("no program to run"), std::string::npos);
  EXPECT_NE(error({}).find("no program to run"), std::string::npos);
  EXPECT_NE(error({"--max-restarts", "-3", "t.py"}).find("--max-restarts"), std::string::npos);
  EXPECT_NE(error({"--redirects", "7", "t.py"}).find("--redirects '7'"), std::string::npos);
  EXPECT_NE(error({"--signals-to-handle", "SIGNOPE", "t.py"}).find("SIGNOPE"), std::string::npos);
  EXPECT_NE(error({"--nnodes", "2", "t.py"}).find("--rdzv-endpoint"), std::string::npos);
  EXPECT_NE(error({"--standalone", "--nnodes", "2", "t.py"}).find("--standalone"),
            std::string::npos);
  EXPECT_NE(error({"-m", "--no-python", "t.py"}).find("contradict"), std::string::npos);
  EXPECT_NE(error({"--rdzv-conf", "join_timeout", "t.py"}).find("KEY=VALUE"), std::string::npos);
  EXPECT_NE(error({"--start-method", "thread", "t.py"}).find("--start-method"), std::string::npos);
  EXPECT_FALSE(error({"--bogus-flag", "t.py"}).empty());
}

TEST(RunOptionsTest, RdzvEndpointTakesAListOfStandbyAddresses) {
  auto o = parse({"--nnodes", "2:4", "--rdzv-endpoint",
                  "node0, node1:29401,[fd00::2],[::1]:7,10.0.0.4", "t.py"});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  ASSERT_EQ(o->rdzv_endpoints.size(), 5u);
  EXPECT_EQ(o->rdzv_endpoints[0], (HostPort{"node0", 29400})) << "torchrun's default port";
  EXPECT_EQ(o->rdzv_endpoints[1], (HostPort{"node1", 29401}));
  EXPECT_EQ(o->rdzv_endpoints[2], (HostPort{"fd00::2", 29400})) << "brackets taken off";
  EXPECT_EQ(o->rdzv_endpoints[3], (HostPort{"::1", 7}));
  EXPECT_EQ(o->rdzv_endpoints[4], (HostPort{"10.0.0.4", 29400}));
  EXPECT_EQ(o->rdzv_endpoints[2].toString(), "[fd00::2]:29400");
  EXPECT_EQ(o->rdzv_endpoint, "node0:29400") << "the first: where the coordinator starts";

  auto one = parse({"--nnodes", "2", "--rdzv-endpoint", "[::1]:1234", "t.py"});
  ASSERT_TRUE(one.ok()) << one.status().toString();
  EXPECT_EQ(one->rdzv_endpoints, (std::vector<HostPort>{{"::1", 1234}}));
  EXPECT_EQ(one->rdzv_endpoint, "[::1]:1234");
}

TEST(RunOptionsTest, BadRdzvEndpointsAreNamed) {
  auto bad = [](const std::string& endpoint) {
    return error({"--nnodes", "2", "--rdzv-endpoint", endpoint, "t.py"});
  };
  EXPECT_NE(bad("a:1,b:0").find("'b:0' has port '0'"), std::string::npos) << bad("a:1,b:0");
  EXPECT_NE(bad("a:99999").find("1 to 65535"), std::string::npos);
  EXPECT_NE(bad("a:http").find("'http'"), std::string::npos);
  EXPECT_NE(bad("a:+80").find("'+80'"), std::string::npos) << "digits only";
  EXPECT_NE(bad("a: 80").find("' 80'"), std::string::npos);
  EXPECT_NE(bad("a:").find("no port"), std::string::npos);
  EXPECT_NE(bad(":29400").find("no host"), std::string::npos);
  EXPECT_NE(bad("fd00::1").find("brackets"), std::string::npos);
  EXPECT_NE(bad("[fd00::1").find("bracket"), std::string::npos);
  EXPECT_NE(bad("[fd00::1]x").find("'x'"), std::string::npos);
  EXPECT_NE(bad("a,a:29400").find("names a:29400 twice"), std::string::npos) << bad("a,a:29400");
  EXPECT_NE(bad(",").find("names no address"), std::string::npos);
  EXPECT_NE(bad(" , ").find("names no address"), std::string::npos) << bad(" , ");
  EXPECT_NE(bad("a,b:0").find("--rdzv-endpoint 'a,b:0'"), std::string::npos) << "the flag's text";
}

TEST(RunOptionsTest, PrintConfigNeedsNoProgram) {
  auto o = parse({"--print-config", "--nproc-per-node", "2"});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_TRUE(o->print_config);
  EXPECT_TRUE(o->script.empty());
  EXPECT_EQ(o->local_world_size, 2);
  auto with = parse({"--print-config", "train.py", "--lr", "1"});
  ASSERT_TRUE(with.ok()) << with.status().toString();
  EXPECT_EQ(with->script, "train.py");
  EXPECT_NE(error({"--print-config", "--bogus-flag"}).find("--bogus-flag"), std::string::npos);
}

TEST(RunOptionsTest, EtcdV2IsAnAliasOfTheCoordinator) {
  auto o = parse({"--rdzv-backend", "etcd-v2", "--rdzv-endpoint", "127.0.0.1:29400", "t.py"});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_FALSE(o->staticBackend());
  EXPECT_NE(error({"--rdzv-backend", "zookeeper", "t.py"}).find("etcd-v2"), std::string::npos);
}

TEST(RunOptionsTest, HelpIsReportedAsText) {
  auto r = parse({"--help"});
  ASSERT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("--nproc-per-node,--nproc_per_node"), std::string::npos);
}

TEST(RunOptionsTest, Signals) {
  auto s = parseSignals("SIGTERM, INT,9x");
  EXPECT_FALSE(s.ok());
  s = parseSignals("SIGTERM,INT,10");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, (std::vector<int>{SIGTERM, SIGINT, 10}));
  EXPECT_FALSE(parseSignals("SIGKILL").ok()) << "SIGKILL cannot be handled";
  EXPECT_STREQ(signalName(SIGTERM), "SIGTERM");
}

}  // namespace
}  // namespace rally::cli

namespace rally::cli {
namespace {

TEST(RunOptionsTest, RecoveryModeAndFaultPlanAreChecked) {
  auto o = parseRunOptions({"train.py"}, {});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->recovery, "restart");
  EXPECT_FALSE(o->inPlace());
  o = parseRunOptions({"--recovery", "in-place", "train.py"}, {});
  ASSERT_TRUE(o.ok());
  EXPECT_TRUE(o->inPlace());
  auto bad = parseRunOptions({"--recovery", "sideways", "train.py"}, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "--recovery 'sideways' is not restart or in-place");

  const std::string plan = ::testing::TempDir() + "run_options_plan.txt";
  { std::ofstream(plan) << "kill rank=1 step=5\nkil rank=2 step=3\n"; }
  bad = parseRunOptions({"--fault-plan", plan, "train.py"}, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("line 2: 'kil rank=2 step=3': unknown action 'kil'"),
            std::string::npos)
      << bad.status().message();
  { std::ofstream(plan) << "kill rank=1 step=5\n"; }
  o = parseRunOptions({"--fault-plan", plan, "train.py"}, {});
  ASSERT_TRUE(o.ok()) << o.status().toString();
  EXPECT_EQ(o->fault_plan, plan);
  bad = parseRunOptions({"--fault-plan", "/nonexistent/plan.txt", "train.py"}, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("/nonexistent/plan.txt"), std::string::npos);
}

}  // namespace
}  // namespace rally::cli
