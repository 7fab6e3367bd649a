// Data parallelism on CPU (Gloo, real processes): DDP, FSDP and HSDP runs produce the same
// losses as one process with the same global batch, and FSDP holds 1/N of the state per rank.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <regex>

#include "support/test_support.h"

using namespace titan;

namespace {

const std::string kDebugConfig = std::string(TITAN_SOURCE_DIR) + "/configs/debug_model.toml";

struct RunResult {
  std::vector<double> losses, grad_norms;
  std::vector<std::string> outputs;
};

RunResult train_ranks(const test::TempDir& dir, const std::string& name, int world,
                      int64_t local_batch, std::vector<std::string> extra) {
  std::vector<std::string> argv = {TITAN_TRAIN_BINARY,
                                   "--job.config_file",
                                   kDebugConfig,
                                   "--job.dump_folder",
                                   dir.file(name),
                                   "--training.steps",
                                   "10",
                                   "--metrics.log_freq",
                                   "1",
                                   "--training.seq_len",
                                   "64",
                                   "--training.local_batch_size",
                                   std::to_string(local_batch),
                                   "--metrics.disable_color_printing"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  RunResult r;
  auto results = test::run_ranks(argv, world, {"LOG_RANK=all"}, 600);
  for (const auto& p : results) {
    EXPECT_EQ(p.exit_code, 0) << p.output;
    r.outputs.push_back(p.output);
  }
  std::ifstream in(dir.file(name) + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    r.losses.push_back(j["loss"].get<double>());
    r.grad_norms.push_back(j["grad_norm"].get<double>());
  }
  return r;
}

void expect_same(const RunResult& a, const RunResult& b, const char* what) {
  ASSERT_EQ(a.losses.size(), 10u) << what;
  ASSERT_EQ(b.losses.size(), 10u) << what;
  for (size_t i = 0; i < a.losses.size(); ++i) {
    EXPECT_NEAR(a.losses[i], b.losses[i], 1e-5 * b.losses[i]) << what << " step " << i + 1;
    EXPECT_NEAR(a.grad_norms[i], b.grad_norms[i], 1e-4 * b.grad_norms[i])
        << what << " step " << i + 1;
  }
}

// "parameter state: 12.34 MiB per rank" from the log of each rank.
std::vector<double> state_mib(const RunResult& r) {
  std::vector<double> out;
  std::regex re("parameter state: ([0-9.]+) MiB per rank");
  for (const auto& o : r.outputs) {
    std::smatch m;
    if (std::regex_search(o, m, re)) out.push_back(std::stod(m[1]));
  }
  return out;
}

}  // namespace

TEST(DataParallel, DdpFsdpHsdpMatchOneProcess) {
  test::TempDir dir;
  RunResult single = train_ranks(dir, "single", 1, 8, {});
  RunResult ddp = train_ranks(dir, "ddp", 2, 4,
                              {"--parallelism.data_parallel_replicate_degree", "2",
                               "--parallelism.data_parallel_shard_degree", "1"});
  expect_same(ddp, single, "DDP 2");
  RunResult fsdp2 = train_ranks(dir, "fsdp2", 2, 4, {});
  expect_same(fsdp2, single, "FSDP 2");
  RunResult fsdp4 = train_ranks(dir, "fsdp4", 4, 2, {});
  expect_same(fsdp4, single, "FSDP 4");
  RunResult hsdp =
      train_ranks(dir, "hsdp", 4, 2, {"--parallelism.data_parallel_replicate_degree", "2"});
  expect_same(hsdp, single, "HSDP 2x2");
  // Per-rank parameter + gradient + optimizer memory is about 1/N of the unsharded total.
  const auto one = state_mib(single);
  const auto four = state_mib(fsdp4);
  const auto two_by_two = state_mib(hsdp);
  ASSERT_EQ(one.size(), 1u);
  ASSERT_EQ(four.size(), 4u);
  for (double m : four) EXPECT_NEAR(m, one[0] / 4, 0.02 * one[0] / 4);
  for (double m : two_by_two) EXPECT_NEAR(m, one[0] / 2, 0.02 * one[0] / 2);
}

TEST(DataParallel, UnevenShardsOverThreeRanksMatchOneProcess) {
  // 3 ranks: unit sizes are not multiples of 3 (padding), norm weights split mid-parameter.
  test::TempDir dir;
  RunResult single = train_ranks(dir, "single", 1, 6, {});
  RunResult fsdp3 = train_ranks(dir, "fsdp3", 3, 2, {});
  expect_same(fsdp3, single, "FSDP 3");
}

TEST(DataParallel, ShardingWithGradientAccumulationAndResharding) {
  test::TempDir dir;
  RunResult single = train_ranks(dir, "single", 1, 8, {});
  RunResult accum = train_ranks(
      dir, "accum", 2, 2,
      {"--training.global_batch_size", "8", "--parallelism.fsdp_reshard_after_forward", "always"});
  expect_same(accum, single, "FSDP 2 with 2 micro-batches, always reshard");
  RunResult never =
      train_ranks(dir, "never", 2, 4, {"--parallelism.fsdp_reshard_after_forward", "never"});
  expect_same(never, single, "FSDP 2, never reshard");
}
