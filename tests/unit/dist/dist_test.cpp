// The distributed runtime on CPU with Gloo, real processes on loopback: launch environment,
// rendezvous, every collective on every mesh group, mesh validation, and the watchdog.
#include <gtest/gtest.h>

#include <chrono>
#include <map>

#include "support/test_support.h"
#include "titan/dist/device_mesh.h"
#include "titan/dist/launch.h"
#include "titan/util/error.h"

using namespace titan;

namespace {

dist::LaunchEnv env_of(const std::map<std::string, std::string>& vars) {
  return dist::read_launch_env([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

using titan::test::error_of;

void expect_all_ok(const std::vector<test::ProcessResult>& results, const char* what) {
  for (size_t r = 0; r < results.size(); ++r) {
    EXPECT_EQ(results[r].exit_code, 0) << what << " rank " << r << ":\n" << results[r].output;
    EXPECT_NE(results[r].output.find("collectives OK"), std::string::npos) << results[r].output;
  }
}

}  // namespace

TEST(LaunchEnv, TorchrunVariables) {
  auto e = env_of({{"RANK", "3"},
                   {"WORLD_SIZE", "8"},
                   {"LOCAL_RANK", "1"},
                   {"LOCAL_WORLD_SIZE", "2"},
                   {"MASTER_ADDR", "node7"},
                   {"MASTER_PORT", "1234"}});
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 2);
  EXPECT_EQ(e.master_addr, "node7");
  EXPECT_EQ(e.master_port, 1234);
  EXPECT_EQ(e.source, "torchrun-style");
}

TEST(LaunchEnv, SlurmFallbackAndNodelist) {
  auto e = env_of({{"SLURM_PROCID", "9"},
                   {"SLURM_NTASKS", "16"},
                   {"SLURM_LOCALID", "1"},
                   {"SLURM_NTASKS_PER_NODE", "8"},
                   {"SLURM_JOB_NODELIST", "gpu[03-04,09],login1"},
                   {"SLURM_JOB_ID", "123456"}});
  EXPECT_EQ(e.rank, 9);
  EXPECT_EQ(e.world_size, 16);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 8);
  EXPECT_EQ(e.master_addr, "gpu03");
  EXPECT_EQ(e.source, "slurm");
  EXPECT_EQ(dist::first_slurm_host("a1,b2"), "a1");
  EXPECT_EQ(dist::first_slurm_host("node[7]"), "node7");
  EXPECT_EQ(dist::first_slurm_host("r[10-12]n[1-2]"), "r10n[1-2]");
}

TEST(LaunchEnv, NoEnvironmentIsOneProcessAndBadValuesAreNamed) {
  auto e = env_of({});
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.rank, 0);
  auto msg = error_of([] { env_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}); });
  EXPECT_NE(msg.find("RANK=\"x\""), std::string::npos) << msg;
  msg = error_of([] {
    env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}});
  });
  EXPECT_NE(msg.find("rank 2 is outside the world of 2"), std::string::npos) << msg;
  msg = error_of([] { env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}}); });
  EXPECT_NE(msg.find("MASTER_ADDR"), std::string::npos) << msg;
}

TEST(ParallelDims, InfersShardDegreeAndExplainsBadProducts) {
  config::ParallelismSection p;
  p.data_parallel_replicate_degree = 2;
  auto d = dist::ParallelDims::from_config(p, 8);
  EXPECT_EQ(d.dp_shard, 4);
  EXPECT_TRUE(d.hsdp_enabled());
  EXPECT_EQ(d.dp(), 8);
  p.data_parallel_shard_degree = 3;
  auto msg = error_of([&] { dist::ParallelDims::from_config(p, 8); });
  EXPECT_NE(msg.find("= 6, but the world size is 8"), std::string::npos) << msg;
  p.data_parallel_shard_degree = -1;
  p.data_parallel_replicate_degree = 3;
  msg = error_of([&] { dist::ParallelDims::from_config(p, 8); });
  EXPECT_NE(msg.find("not divisible"), std::string::npos) << msg;
}

TEST(DeviceMesh, CoordinatesAndGroupsWithoutCommunication) {
  dist::ParallelDims d;
  d.world = 8;
  d.dp_replicate = 2;
  d.dp_shard = 2;
  d.tp = 2;
  dist::DeviceMesh mesh(d, 5, nullptr);  // 5 = (r 1, s 0, t 1)
  EXPECT_EQ(mesh.coordinate("dp_replicate"), 1);
  EXPECT_EQ(mesh.coordinate("dp_shard"), 0);
  EXPECT_EQ(mesh.coordinate("tp"), 1);
  EXPECT_EQ(mesh.group_members("tp"), (std::vector<int>{4, 5}));
  EXPECT_EQ(mesh.group_members("dp_shard"), (std::vector<int>{5, 7}));
  EXPECT_EQ(mesh.group_members("dp_replicate"), (std::vector<int>{1, 5}));
  EXPECT_EQ(mesh.group_members("dp"), (std::vector<int>{1, 3, 5, 7}));
  EXPECT_EQ(mesh.group_rank("dp"), 2);
  EXPECT_EQ(mesh.size("dp_shard_cp"), 2);
}

class Collectives : public ::testing::TestWithParam<std::tuple<int, std::vector<std::string>>> {};

TEST_P(Collectives, EveryCollectiveOnEveryGroupGivesExactResults) {
  TITAN_REQUIRE_GLOO();
  const auto& [world, degrees] = GetParam();
  std::vector<std::string> argv = {TITAN_DIST_WORKER, "collectives"};
  argv.insert(argv.end(), degrees.begin(), degrees.end());
  auto results = test::run_ranks(argv, world, {}, 240);
  expect_all_ok(results, "collectives");
}

INSTANTIATE_TEST_SUITE_P(
    Meshes, Collectives,
    ::testing::Values(
        std::make_tuple(2, std::vector<std::string>{}),
        std::make_tuple(4, std::vector<std::string>{"--parallelism.data_parallel_replicate_degree",
                                                    "2"}),
        std::make_tuple(4, std::vector<std::string>{"--parallelism.tensor_parallel_degree", "2"}),
        // 2 x 2 x 2 meshes: replicate x shard x tp, and pp x cp x tp.
        std::make_tuple(8,
                        std::vector<std::string>{"--parallelism.data_parallel_replicate_degree",
                                                 "2", "--parallelism.tensor_parallel_degree", "2"}),
        std::make_tuple(8, std::vector<std::string>{"--parallelism.pipeline_parallel_degree", "2",
                                                    "--parallelism.context_parallel_degree", "2",
                                                    "--parallelism.tensor_parallel_degree", "2"})));

TEST(Watchdog, SkippedCollectiveBecomesAClearErrorWithinTheTimeout) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const auto t0 = std::chrono::steady_clock::now();
  auto results = test::run_ranks({TITAN_DIST_WORKER, "hang", "--comm.train_timeout_seconds", "3",
                                  "--job.dump_folder", dir.path()},
                                 3, {}, 60);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Ranks 0 and 2 wait in the all_reduce that rank 1 skipped: both must fail with the name of
  // the collective and of rank 1, well before the test's own deadline.
  for (int r : {0, 2}) {
    const auto& out = results[static_cast<size_t>(r)].output;
    EXPECT_EQ(results[static_cast<size_t>(r)].exit_code, 4) << out;
    // #1 is the mesh's barrier after connecting its groups, #2 the worker's first all_reduce.
    EXPECT_NE(out.find("collective all_reduce #3 on group world"), std::string::npos) << out;
    EXPECT_NE(out.find("ranks that never reached it: 1 (last at #2)"), std::string::npos) << out;
  }
  EXPECT_LT(seconds, 45.0);
  EXPECT_FALSE(test::read_file(dir.path() + "/comm_traces/rank_0.json").empty());
}

TEST(FsdpInit, ShardedInitializationGathersToTheOneProcessWeights) {
  TITAN_REQUIRE_GLOO();
  for (int world : {2, 3, 4}) {
    auto results =
        test::run_ranks({TITAN_DIST_WORKER, "init", "--debug.seed", "5"}, world, {}, 240);
    for (const auto& r : results) {
      EXPECT_EQ(r.exit_code, 0) << "world " << world << ":\n" << r.output;
      EXPECT_NE(r.output.find("initialization OK"), std::string::npos) << r.output;
    }
  }
}

TEST(Rendezvous, MissingPeerIsNamed) {
  TITAN_REQUIRE_GLOO();
  auto results = test::run_ranks({TITAN_DIST_WORKER, "idle", "--comm.init_timeout_seconds", "3"}, 3,
                                 {}, 60, {0, 1});
  ASSERT_EQ(results.size(), 2u);
  EXPECT_NE(results[0].exit_code, 0);
  EXPECT_NE(results[0].output.find("rank 2 of 3 did not arrive"), std::string::npos)
      << results[0].output;
  EXPECT_NE(results[1].exit_code, 0);
  EXPECT_NE(results[1].output.find("rank 2 of 3 did not arrive"), std::string::npos)
      << results[1].output;
}
