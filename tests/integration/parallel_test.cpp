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
                      int64_t local_batch, std::vector<std::string> extra,
                      std::vector<std::string> env = {}) {
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
  env.push_back("LOG_RANK=all");
  auto results = test::run_ranks(argv, world, env, 600);
  for (const auto& p : results) {
    EXPECT_EQ(p.exit_code, 0) << p.output;
    r.outputs.push_back(p.output);
  }
  std::ifstream in(dir.file(name) + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;  // the run's start event
    r.losses.push_back(j["loss"].get<double>());
    r.grad_norms.push_back(j["grad_norm"].get<double>());
  }
  return r;
}

void expect_same(const RunResult& a, const RunResult& b, const char* what,
                 double loss_tolerance = 1e-5, double norm_tolerance = 1e-4) {
  ASSERT_EQ(a.losses.size(), 10u) << what;
  ASSERT_EQ(b.losses.size(), 10u) << what;
  for (size_t i = 0; i < a.losses.size(); ++i) {
    EXPECT_NEAR(a.losses[i], b.losses[i], loss_tolerance * b.losses[i])
        << what << " step " << i + 1;
    EXPECT_NEAR(a.grad_norms[i], b.grad_norms[i], norm_tolerance * b.grad_norms[i])
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
  TITAN_REQUIRE_GLOO();
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

// debug.seed = None (torchtitan's unseeded run): rank 0 draws the seed and every rank uses it,
// so DDP replicas start equal; the logged seed repeats the run.
TEST(DataParallel, UnseededRunSharesOneDrawnSeedOverRanks) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  RunResult ddp =
      train_ranks(dir, "ddp", 2, 4,
                  {"--parallelism.data_parallel_replicate_degree", "2",
                   "--parallelism.data_parallel_shard_degree", "1", "--debug.seed", "None"});
  std::vector<std::string> seeds;
  const std::regex re("debug.seed = None: drew seed ([0-9]+)");
  for (const auto& o : ddp.outputs) {
    std::smatch m;
    if (std::regex_search(o, m, re)) seeds.push_back(m[1]);
  }
  ASSERT_EQ(seeds.size(), 2u);
  EXPECT_EQ(seeds[0], seeds[1]);
  RunResult single = train_ranks(dir, "single", 1, 8, {"--debug.seed", seeds[0]});
  expect_same(ddp, single, "DDP 2 unseeded against one process with the drawn seed");
}

TEST(DataParallel, UnevenShardsOverThreeRanksMatchOneProcess) {
  TITAN_REQUIRE_GLOO();
  // 3 ranks: unit sizes are not multiples of 3 (padding), norm weights split mid-parameter.
  test::TempDir dir;
  RunResult single = train_ranks(dir, "single", 1, 6, {});
  RunResult fsdp3 = train_ranks(dir, "fsdp3", 3, 2, {});
  expect_same(fsdp3, single, "FSDP 3");
}

TEST(DataParallel, ShardingWithGradientAccumulationAndResharding) {
  TITAN_REQUIRE_GLOO();
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

// Pipeline parallelism on CPU (Gloo): every schedule at pipeline degree 2 and 4 computes what
// one process computes on the same global batch (losses each step and the final weights
// within 1e-5 in fp32), composed with FSDP, DDP and gradient accumulation.
namespace {

// Largest ||a - b|| / ||b|| over the weights of two checkpoint step folders.
double weights_difference(const std::string& a, const std::string& b) {
  const auto wa = test::read_checkpoint_weights(a), wb = test::read_checkpoint_weights(b);
  EXPECT_EQ(wa.size(), wb.size());
  double worst = 0;
  for (const auto& [name, t] : wb) {
    if (!wa.count(name)) {
      ADD_FAILURE() << name << " missing";
      continue;
    }
    worst = std::max(worst, test::relative_error(wa.at(name), t));
  }
  return worst;
}

std::vector<std::string> pp_args(int pp, const std::string& schedule, int64_t microbatch) {
  return {"--parallelism.pipeline_parallel_degree",          std::to_string(pp),
          "--parallelism.pipeline_parallel_schedule",        schedule,
          "--parallelism.pipeline_parallel_microbatch_size", std::to_string(microbatch)};
}

// The final weights of a run are saved at its last step (fp32, weights only).
const std::vector<std::string> kFinalSave = {"--checkpoint.enable", "--checkpoint.interval",
                                             "1000"};

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

struct LayoutCase {
  const char* name;
  int world;
  int64_t local_batch;
  std::vector<std::string> extra;
};

// Runs one process (local batch 8) and each case for 10 steps: the same losses every step and
// final weights within 1e-5. Returns the one-process run.
RunResult expect_layouts_match_one_process(const test::TempDir& dir,
                                           const std::vector<LayoutCase>& cases) {
  const RunResult single = train_ranks(dir, "single", 1, 8, kFinalSave);
  const std::string final_single = dir.file("single") + "/checkpoint/step-10";
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const RunResult r = train_ranks(dir, c.name, c.world, c.local_batch, kFinalSave + c.extra);
    expect_same(r, single, c.name);
    EXPECT_LT(weights_difference(dir.file(c.name) + "/checkpoint/step-10", final_single), 1e-5);
  }
  return single;
}

// A one-step job (seq_len 32, local batch 8, then `extra`) on `world` ranks: every rank must
// exit with code 2 and print `message`.
void expect_config_error(const std::string& dump, int world, const std::vector<std::string>& extra,
                         const std::string& message) {
  std::vector<std::string> argv = {TITAN_TRAIN_BINARY,
                                   "--job.config_file",
                                   kDebugConfig,
                                   "--job.dump_folder",
                                   dump,
                                   "--training.steps",
                                   "1",
                                   "--training.seq_len",
                                   "32",
                                   "--training.local_batch_size",
                                   "8"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  for (const auto& r : test::run_ranks(argv, world, {}, 120)) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << "want \"" << message << "\" in:\n"
                                                         << r.output;
  }
}

}  // namespace

TEST(Pipeline, EveryScheduleAtDegreeTwoAndFourMatchesOneProcess) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const RunResult single = train_ranks(dir, "single", 1, 8, kFinalSave);
  const std::string final_single = dir.file("single") + "/checkpoint/step-10";
  for (int pp : {2, 4}) {
    for (const char* schedule : {"GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS",
                                 "InterleavedZeroBubble", "ZBVZeroBubble"}) {
      const std::string name = "pp" + std::to_string(pp) + "_" + schedule;
      SCOPED_TRACE(name);
      const RunResult r = train_ranks(dir, name, pp, 8, kFinalSave + pp_args(pp, schedule, 2));
      expect_same(r, single, name.c_str());
      EXPECT_LT(weights_difference(dir.file(name) + "/checkpoint/step-10", final_single), 1e-5);
    }
  }
}

TEST(Pipeline, ComposesWithFsdpDdpAccumulationAndCheckpointing) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  expect_layouts_match_one_process(
      dir,
      {
          {"pp2_fsdp2", 4, 4, pp_args(2, "Interleaved1F1B", 1)},
          {"pp2_ddp2", 4, 4,
           pp_args(2, "ZBVZeroBubble", 2) +
               std::vector<std::string>{"--parallelism.data_parallel_replicate_degree", "2",
                                        "--parallelism.data_parallel_shard_degree", "1"}},
          {"pp2_accumulation", 2, 4,
           pp_args(2, "1F1B", 1) + std::vector<std::string>{"--training.global_batch_size", "8"}},
          {"pp2_full_ac_always_reshard", 4, 4,
           pp_args(2, "InterleavedZeroBubble", 1) +
               std::vector<std::string>{"--activation_checkpoint.mode", "full",
                                        "--parallelism.fsdp_reshard_after_forward", "always"}},
      });
}

TEST(Pipeline, BadPipelineConfigurationsAreClearErrors) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  struct Case {
    std::vector<std::string> extra;
    std::string message;
  };
  const std::vector<Case> cases = {
      {pp_args(2, "1F1B", 3),
       "training.local_batch_size (8) must be a multiple of "
       "parallelism.pipeline_parallel_microbatch_size (3)"},
      {pp_args(2, "Interleaved1F2B", 1), "unknown pipeline schedule \"Interleaved1F2B\""},
      {pp_args(2, "Interleaved1F1B", 8),
       "must be a multiple of parallelism.pipeline_parallel_degree"},
      {pp_args(2, "1F1B", 1) +
           std::vector<std::string>{"--parallelism.pipeline_parallel_layers_per_stage", "1"},
       "runs one stage per rank"},
      {pp_args(2, "ZBVZeroBubble", 1) +
           std::vector<std::string>{"--parallelism.pipeline_parallel_layers_per_stage", "1"},
       "exactly two stages on each rank"},
  };
  int i = 0;
  for (const auto& c : cases) {
    expect_config_error(dir.file("bad" + std::to_string(i++)), 2, c.extra, c.message);
  }
  // Fewer microbatches than pipeline ranks is allowed, with the bubble it costs stated.
  const RunResult few = train_ranks(dir, "few", 2, 8, pp_args(2, "1F1B", 8));
  EXPECT_NE(few.outputs[0].find("1 microbatches for 2 pipeline ranks leave ranks idle"),
            std::string::npos)
      << few.outputs[0];
}

// Tensor, sequence and loss parallelism on CPU (Gloo): tp 2 and 4, synchronous and async TP,
// loss parallel or gathered logits, with activation checkpointing, FSDP (2D) and pipelines (3D),
// compute what one process computes on the same global batch (losses every step and the final
// weights within 1e-5 in fp32).
namespace {

std::vector<std::string> tp_args(int tp, std::vector<std::string> more = {}) {
  std::vector<std::string> a = {"--parallelism.tensor_parallel_degree", std::to_string(tp)};
  return a + more;
}

}  // namespace

TEST(TensorParallel, EveryLayoutMatchesOneProcess) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> no_fsdp = {"--parallelism.data_parallel_shard_degree", "1"};
  const RunResult single = expect_layouts_match_one_process(
      dir,
      {
          {"tp2", 2, 8, tp_args(2, no_fsdp)},
          {"tp2_async", 2, 8,
           tp_args(2, no_fsdp +
                          std::vector<std::string>{"--parallelism.enable_async_tensor_parallel"})},
          {"tp2_gathered_logits", 2, 8,
           tp_args(2, no_fsdp + std::vector<std::string>{"--parallelism.disable_loss_parallel"})},
          {"tp4_async_full_ac", 4, 8,
           tp_args(4,
                   no_fsdp + std::vector<std::string>{"--parallelism.enable_async_tensor_parallel",
                                                      "--activation_checkpoint.mode", "full"})},
          {"tp2_selective_ac_accumulation", 2, 4,
           tp_args(2,
                   no_fsdp + std::vector<std::string>{"--activation_checkpoint.mode", "selective",
                                                      "--training.global_batch_size", "8"})},
          {"fsdp2_tp2", 4, 4, tp_args(2)},
          {"hsdp_ddp2_tp2_async", 4, 4,
           tp_args(2, std::vector<std::string>{"--parallelism.data_parallel_replicate_degree", "2",
                                               "--parallelism.data_parallel_shard_degree", "1",
                                               "--parallelism.enable_async_tensor_parallel"})},
          {"pp2_tp2", 4, 8, tp_args(2, no_fsdp + pp_args(2, "1F1B", 2))},
          {"pp2_tp2_zbv_async", 4, 8,
           tp_args(2, no_fsdp + pp_args(2, "ZBVZeroBubble", 2) +
                          std::vector<std::string>{"--parallelism.enable_async_tensor_parallel"})},
      });
  // Each tensor-parallel rank holds 1/tp of the split parameters (all but the norms).
  const auto one = state_mib(single);
  const RunResult tp4 = train_ranks(dir, "tp4", 4, 8, tp_args(4, no_fsdp));
  expect_same(tp4, single, "tp4");
  const auto four = state_mib(tp4);
  ASSERT_EQ(one.size(), 1u);
  ASSERT_EQ(four.size(), 4u);
  for (double m : four) EXPECT_NEAR(m, one[0] / 4, 0.01 * one[0]);
}

TEST(TensorParallel, GroupedQueryAttentionWithOneKvHeadPerRank) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> gqa = {"--model.flavor", "debugmodel_gqa"};
  const RunResult single = train_ranks(dir, "single", 1, 8, kFinalSave + gqa);
  const RunResult tp4 =
      train_ranks(dir, "tp4", 4, 8,
                  kFinalSave + gqa + tp_args(4, {"--parallelism.data_parallel_shard_degree", "1"}));
  expect_same(tp4, single, "GQA tp4");
  EXPECT_LT(weights_difference(dir.file("tp4") + "/checkpoint/step-10",
                               dir.file("single") + "/checkpoint/step-10"),
            1e-5);
}

TEST(TensorParallel, BadTensorParallelConfigurationsAreClearErrors) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  struct Case {
    int world;
    std::vector<std::string> extra;
    std::string message;
  };
  const std::vector<Case> cases = {
      {3, tp_args(3, {"--parallelism.data_parallel_shard_degree", "1"}),
       "parallelism.tensor_parallel_degree (3) must divide the number of attention heads (16)"},
      {2, tp_args(2, {"--training.seq_len", "33"}),
       "training.seq_len (33) must be divisible by parallelism.tensor_parallel_degree (2)"},
  };
  int i = 0;
  for (const auto& c : cases) {
    expect_config_error(dir.file("bad" + std::to_string(i++)), c.world, c.extra, c.message);
  }
}

// Context parallelism on CPU (Gloo): cp 2 and 4, both rotate methods, with and without head-tail
// balancing and activation checkpointing, composed with FSDP, tensor and pipeline parallelism,
// computes what one process computes on the same global batch.
namespace {

std::vector<std::string> cp_args(int cp, std::vector<std::string> more = {}) {
  std::vector<std::string> a = {"--parallelism.context_parallel_degree", std::to_string(cp)};
  return a + more;
}

}  // namespace

TEST(ContextParallel, EveryLayoutMatchesOneProcess) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> no_fsdp = {"--parallelism.data_parallel_shard_degree", "1"};
  const std::vector<std::string> ring = {"--parallelism.context_parallel_rotate_method",
                                         "alltoall"};
  expect_layouts_match_one_process(
      dir, {
               {"cp2_allgather", 2, 8, cp_args(2, no_fsdp)},
               {"cp2_ring_full_ac", 2, 8,
                cp_args(2, no_fsdp + ring +
                               std::vector<std::string>{"--activation_checkpoint.mode", "full"})},
               {"cp4_ring", 4, 8, cp_args(4, no_fsdp + ring)},
               {"cp4_unbalanced_selective_ac", 4, 8,
                cp_args(4, no_fsdp +
                               std::vector<std::string>{
                                   "--parallelism.context_parallel_load_balancer", "none",
                                   "--activation_checkpoint.mode", "selective"})},
               {"cp2_fsdp2", 4, 4, cp_args(2)},
               {"cp2_tp2", 4, 8, cp_args(2, tp_args(2, no_fsdp))},
               {"cp2_pp2_ring", 4, 8, cp_args(2, no_fsdp + ring + pp_args(2, "1F1B", 2))},
           });
}

TEST(ContextParallel, BadContextParallelConfigurationsAreClearErrors) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  expect_config_error(dir.file("seq"), 2, cp_args(2, {"--training.seq_len", "34"}),
                      "training.seq_len (34) must be divisible by 2 x "
                      "parallelism.context_parallel_degree (2) = 4");
  expect_config_error(dir.file("ptrr"), 2,
                      cp_args(2, {"--parallelism.context_parallel_load_balancer", "ptrr"}),
                      "parallelism.context_parallel_load_balancer = \"ptrr\"");
}

// TeraPipe on CPU (Gloo): sequences cut into token slices that run through the pipeline one
// after another (each attending to the keys/values its stage kept from the earlier slices, the
// backward in reverse) compute what one process computes on whole sequences: pp 2 and 4, given
// and automatic slicing, with FSDP and full activation checkpointing, and with tensor parallel.
namespace {

std::vector<std::string> slices_args(const std::string& slices) {
  return {"--parallelism.pipeline_parallel_token_slices", slices};
}

}  // namespace

TEST(TeraPipe, SlicedPipelinesMatchOneProcess) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> no_fsdp = {"--parallelism.data_parallel_shard_degree", "1"};
  expect_layouts_match_one_process(
      dir, {
               {"pp2_three_slices", 2, 8, pp_args(2, "TeraPipe", 2) + slices_args("16,16,32")},
               {"pp4_three_slices", 4, 8, pp_args(4, "TeraPipe", 4) + slices_args("32,16,16")},
               {"pp2_one_slice", 2, 8, pp_args(2, "TeraPipe", 4) + slices_args("64")},
               {"pp2_fsdp2_full_ac", 4, 4,
                pp_args(2, "TeraPipe", 2) + slices_args("16,16,16,16") +
                    std::vector<std::string>{"--activation_checkpoint.mode", "full"}},
               {"pp2_tp2_selective_ac", 4, 8,
                pp_args(2, "TeraPipe", 4) + tp_args(2, no_fsdp) + slices_args("48,16") +
                    std::vector<std::string>{"--activation_checkpoint.mode", "selective"}},
           });
}

TEST(TeraPipe, AutomaticSlicingIsMeasuredCachedAndMatchesOneProcess) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> env = {"XDG_CACHE_HOME=" + dir.file("cache")};
  const RunResult single = train_ranks(dir, "single", 1, 8, {});
  const RunResult first = train_ranks(dir, "auto", 4, 8, pp_args(4, "TeraPipe", 8), env);
  expect_same(first, single, "pp4 TeraPipe auto, one microbatch");
  const std::regex chosen("TeraPipe: token slices \\[[0-9, ]+\\] \\(([0-9]+) per sequence\\)");
  for (const auto& out : first.outputs) {
    EXPECT_TRUE(std::regex_search(out, chosen)) << out;
    EXPECT_NE(out.find("timed slices of one block"), std::string::npos) << out;
  }
  // The second run reads the slice times the first one cached.
  const RunResult second = train_ranks(dir, "auto_cached", 4, 8, pp_args(4, "TeraPipe", 8), env);
  expect_same(second, single, "pp4 TeraPipe auto, cached slice times");
  for (const auto& out : second.outputs) {
    EXPECT_NE(out.find("cached in " + dir.file("cache") + "/titan/terapipe/"), std::string::npos)
        << out;
  }
}

TEST(TeraPipe, BadTeraPipeConfigurationsAreClearErrors) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  expect_config_error(dir.file("sum"), 2, pp_args(2, "TeraPipe", 1) + slices_args("16,32"),
                      "parallelism.pipeline_parallel_token_slices: the slices [16, 32] sum to 48 "
                      "tokens, but training.seq_len is 32");
  expect_config_error(dir.file("short"), 2, pp_args(2, "TeraPipe", 1) + slices_args("8,24"),
                      "slice of 8 tokens is shorter than 16");
  expect_config_error(dir.file("pp1"), 2, {"--parallelism.pipeline_parallel_schedule", "TeraPipe"},
                      "it needs parallelism.pipeline_parallel_degree > 1");
  expect_config_error(dir.file("1f1b"), 2, pp_args(2, "1F1B", 1) + slices_args("16,16"),
                      "parallelism.pipeline_parallel_token_slices applies to the TeraPipe "
                      "pipeline schedule only");
  expect_config_error(dir.file("cp"), 4, pp_args(2, "TeraPipe", 1) + cp_args(2),
                      "context_parallel_degree > 1 both split the sequence dimension");
  expect_config_error(
      dir.file("auto_seq"), 2,
      pp_args(2, "TeraPipe", 1) + std::vector<std::string>{"--training.seq_len", "40"},
      "training.seq_len (40) cannot be cut into slices");
}

TEST(TeraPipe, ScheduleCommandShowsTheSlicingAndItsBubble) {
  auto idle = [](const std::string& out) {
    std::smatch m;
    const std::regex re("idle ([0-9.]+)% of the step");
    EXPECT_TRUE(std::regex_search(out, m, re)) << out;
    return m.empty() ? 100.0 : std::stod(m[1]);
  };
  const std::vector<std::string> common = {"schedule", "--pp",      "4",   "--microbatches",
                                           "1",        "--seq-len", "8192"};
  const auto one_f_one_b =
      test::run_titan_train(common + std::vector<std::string>{"--schedule", "1F1B"});
  ASSERT_EQ(one_f_one_b.exit_code, 0) << one_f_one_b.output;
  const auto terapipe =
      test::run_titan_train(common + std::vector<std::string>{"--schedule", "TeraPipe"});
  ASSERT_EQ(terapipe.exit_code, 0) << terapipe.output;
  EXPECT_NE(terapipe.output.find("token slices [128, 128,"), std::string::npos) << terapipe.output;
  EXPECT_NEAR(idle(one_f_one_b.output), 75.0, 1e-9);
  EXPECT_LT(idle(terapipe.output), 15.0);
  // Given slices are simulated as given; a bad list is a clear error.
  const auto given = test::run_titan_train(
      common + std::vector<std::string>{"--schedule", "TeraPipe", "--token-slices", "4096,4096"});
  ASSERT_EQ(given.exit_code, 0) << given.output;
  EXPECT_NE(given.output.find("token slices [4096, 4096]"), std::string::npos) << given.output;
  const auto bad = test::run_titan_train(
      common + std::vector<std::string>{"--schedule", "TeraPipe", "--token-slices", "4096,100"});
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  // The command's messages name its own flags, not the job config's keys.
  EXPECT_NE(bad.output.find("--token-slices: the slices [4096, 100] sum to 4196 tokens, but "
                            "--seq-len is 8192"),
            std::string::npos)
      << bad.output;
  const auto uneven = test::run_titan_train(
      {"schedule", "--pp", "4", "--microbatches", "6", "--schedule", "Interleaved1F1B"});
  EXPECT_EQ(uneven.exit_code, 2) << uneven.output;
  EXPECT_NE(uneven.output.find("must be a multiple of --pp (4); adjust --microbatches"),
            std::string::npos)
      << uneven.output;
}

// Float8 training on CPU (emulated float8 rounding, fp32 products): every recipe trains within
// 1% of the unquantized losses; rowwise_with_gw_hp, whose scales do not depend on the batch
// (per token, per output channel), gives the losses and weights of one process under FSDP 2
// with full checkpointing and under 2-stage pipelines (1F1B, and ZBV whose deferred weight
// gradients keep the packed float8 operands). Not to 1e-5: fp32 sums in another
// order move a few values across a float8 rounding boundary (one float8 step is 6-12%), which
// shows as ~3e-5 in the loss; a wrong scale or a missed cast would show at 1e-2.
namespace {

std::vector<std::string> float8_args(const std::string& recipe) {
  return {"--model.converters", "float8", "--quantize.linear.float8.emulate",
          "--quantize.linear.float8.recipe_name", recipe};
}

}  // namespace

TEST(Float8, EveryRecipeTrainsCloseToUnquantized) {
  test::TempDir dir;
  const RunResult plain = train_ranks(dir, "plain", 1, 8, {});
  for (const char* recipe : {"tensorwise", "rowwise", "rowwise_with_gw_hp"}) {
    SCOPED_TRACE(recipe);
    const bool tensorwise = std::string(recipe) == "tensorwise";
    const RunResult r =
        train_ranks(dir, recipe, 1, 8,
                    float8_args(recipe) +
                        (tensorwise ? std::vector<std::string>{"--model.print_after_conversion"}
                                    : std::vector<std::string>{}));
    ASSERT_EQ(r.losses.size(), plain.losses.size());
    for (size_t i = 0; i < r.losses.size(); ++i) {
      EXPECT_NEAR(r.losses[i], plain.losses[i], 0.01 * plain.losses[i]) << "step " << i + 1;
      EXPECT_NE(r.losses[i], plain.losses[i]) << "step " << i + 1 << ": no float8 rounding?";
    }
    EXPECT_NE(r.outputs[0].find(std::string("float8: ") + recipe + " recipe (emulated)"),
              std::string::npos)
        << r.outputs[0];
    // model.print_after_conversion: the six alike blocks on one line, each projection with
    // the arithmetic of its GEMMs (the output projection is filtered: fp32 on CPU).
    if (tensorwise) {
      for (const char* line :
           {"model after conversion", "\n  layers.0-5: attention_norm.weight [256] | ",
            "attention.wq.weight [256, 256] float8 tensorwise (emulated) | ",
            "feed_forward.w2.weight [256, 768] float8 tensorwise (emulated)",
            "output.weight [2048, 256] fp32"}) {
        EXPECT_NE(r.outputs[0].find(line), std::string::npos) << line << "\n" << r.outputs[0];
      }
    }
  }
}

TEST(Float8, BatchIndependentRecipeMatchesOneProcessUnderFsdpAndPipelines) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const auto f8 = float8_args("rowwise_with_gw_hp");
  const RunResult single = train_ranks(dir, "single", 1, 8, kFinalSave + f8);
  const std::string final_single = dir.file("single") + "/checkpoint/step-10";
  const std::vector<LayoutCase> cases = {
      {"fsdp2_full_ac", 2, 4,
       f8 + std::vector<std::string>{"--activation_checkpoint.mode", "full"}},
      {"pp2_1f1b", 2, 8, f8 + pp_args(2, "1F1B", 2)},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const RunResult r = train_ranks(dir, c.name, c.world, c.local_batch, kFinalSave + c.extra);
    expect_same(r, single, c.name, 2e-4, 2e-3);
    EXPECT_LT(weights_difference(dir.file(c.name) + "/checkpoint/step-10", final_single), 2e-3);
  }
  // Deferred weight gradients (zero bubble) keep the packed float8 operands of the rowwise
  // recipe until their W pass: the same training as 1F1B on the same microbatches.
  const auto rowwise = float8_args("rowwise");
  const RunResult one_f_one_b =
      train_ranks(dir, "rowwise_1f1b", 2, 8, kFinalSave + rowwise + pp_args(2, "1F1B", 2));
  const RunResult zbv =
      train_ranks(dir, "rowwise_zbv", 2, 8, kFinalSave + rowwise + pp_args(2, "ZBVZeroBubble", 2));
  expect_same(zbv, one_f_one_b, "rowwise ZBV vs 1F1B", 2e-4, 2e-3);
  EXPECT_LT(weights_difference(dir.file("rowwise_zbv") + "/checkpoint/step-10",
                               dir.file("rowwise_1f1b") + "/checkpoint/step-10"),
            2e-3);
}

// Tensorwise float8 under tensor parallelism: the casts of operands split over tp (weights,
// dy of column-parallel and x of row-parallel projections) use the whole tensor's amax, so
// tp 2 (with and without full checkpointing, whose recompute casts plain tensors) trains as
// one process does on the same batch: the first 3 steps within 1e-5 (loss) and 1e-4 (grad
// norm), where per-rank scales already miss at steps 1-2. Later steps drift as in the FSDP
// float8 test above (fp32 sums in another order move values across float8 rounding
// boundaries; on some CPUs, whose OpenBLAS kernels sum in another order, step 5 differs by
// 1.06e-5): 10 steps within 2e-4 / 2e-3.
TEST(Float8, TensorwiseUnderTensorParallelMatchesOneProcess) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const auto f8 = float8_args("tensorwise");
  const std::vector<std::string> no_fsdp = {"--parallelism.data_parallel_shard_degree", "1"};
  const RunResult single = train_ranks(dir, "single", 1, 8, kFinalSave + f8);
  const std::string final_single = dir.file("single") + "/checkpoint/step-10";
  const std::vector<LayoutCase> cases = {
      {"tp2", 2, 8, f8 + tp_args(2, no_fsdp)},
      {"tp2_full_ac", 2, 8,
       f8 + tp_args(2, no_fsdp + std::vector<std::string>{"--activation_checkpoint.mode", "full"})},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const RunResult r = train_ranks(dir, c.name, c.world, c.local_batch, kFinalSave + c.extra);
    expect_same(r, single, c.name, 2e-4, 2e-3);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_NEAR(r.losses[i], single.losses[i], 1e-5 * single.losses[i]) << "step " << i + 1;
      EXPECT_NEAR(r.grad_norms[i], single.grad_norms[i], 1e-4 * single.grad_norms[i])
          << "step " << i + 1;
    }
    EXPECT_LT(weights_difference(dir.file(c.name) + "/checkpoint/step-10", final_single), 5e-3);
  }
}

TEST(Float8, BadFloat8ConfigurationsAreClearErrors) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  expect_config_error(dir.file("cpu"), 1, {"--model.converters", "float8"},
                      "on CPU set quantize.linear.float8.emulate = true");
  expect_config_error(dir.file("tp_rowwise"), 2, float8_args("rowwise") + tp_args(2),
                      "float8 with tensor parallelism takes the \"tensorwise\" recipe");
  expect_config_error(
      dir.file("gather_rowwise"), 1,
      float8_args("rowwise") +
          std::vector<std::string>{"--quantize.linear.float8.enable_fsdp_float8_all_gather"},
      "enable_fsdp_float8_all_gather applies to the tensorwise recipe only");
  expect_config_error(
      dir.file("precompute_alone"), 1,
      float8_args("tensorwise") +
          std::vector<std::string>{
              "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"},
      "precompute_float8_dynamic_scale_for_fsdp needs enable_fsdp_float8_all_gather = true");
}

// The float8 FSDP all-gather casts each rank's shard with the scale of the whole matrix (the
// amax all-reduced over dp_shard, and tp) and gathers bytes: the same float8 weights as gathering
// bf16/fp32 and casting after, so training is the same to the last bit, with the scales
// computed per unit or precomputed once per step, with a projection left in bf16, under
// checkpointing, pipelines and validation (which must see the scales of the updated weights).
TEST(Float8, FsdpFloat8AllGatherEqualsGatheringInHighPrecision) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const auto f8 = float8_args("tensorwise") + std::vector<std::string>{"--validation.enable",
                                                                       "--validation.freq", "5",
                                                                       "--validation.steps", "2"};
  const std::vector<std::string> gather = {
      "--quantize.linear.float8.enable_fsdp_float8_all_gather"};
  const std::vector<std::string> precompute = {
      "--quantize.linear.float8.enable_fsdp_float8_all_gather",
      "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"};
  auto validation_lines = [](const std::string& out) {
    std::vector<std::string> lines;
    const std::regex re("validate step: +[0-9]+ +loss: +[0-9.]+");
    for (auto it = std::sregex_iterator(out.begin(), out.end(), re); it != std::sregex_iterator();
         ++it) {
      lines.push_back(it->str());
    }
    return lines;
  };
  struct Pair {
    const char* name;
    int world;
    int64_t local_batch;
    std::vector<std::string> common, float8_gather;
    const char* log = "FSDP all-gathers them in float8";
    std::vector<std::string> high_only = {};
  };
  // Unsharded runs with checkpointing cast the float8 matrices straight from the masters (one
  // amax per matrix and step) where they would cast the unit to the compute dtype: the same
  // bytes as casting per use without checkpointing (a single process, tp only, a pipeline).
  const std::vector<std::string> full_ac = {"--activation_checkpoint.mode", "full"};
  const std::vector<std::string> no_ac = {"--activation_checkpoint.mode", "none"};
  const char* from_master = "weights cast from the fp32 masters once per use";
  const std::vector<Pair> pairs = {
      // wo stays bf16: a whole matrix travels with the norms, cut across the shards.
      {"fsdp4_wo_bf16",
       4,
       2,
       {"--quantize.linear.float8.filter_fqns", "output,attention.wo"},
       gather},
      {"fsdp2_full_ac_precompute", 2, 4, {"--activation_checkpoint.mode", "full"}, precompute},
      {"pp2_fsdp2_1f1b", 4, 4, pp_args(2, "1F1B", 2), precompute},
      // Each tp rank gathers its rows or columns; the scale is the whole matrix's (the amax
      // all-reduced over dp_shard and tp), as the float8 TP projections cast with.
      {"fsdp2_tp2", 4, 4, tp_args(2), gather},
      {"one_rank_full_ac", 1, 8, {}, full_ac, from_master, no_ac},
      {"tp2_full_ac", 2, 8, tp_args(2), full_ac, from_master, no_ac},
      {"pp2_1f1b_full_ac", 2, 8, pp_args(2, "1F1B", 2), full_ac, from_master, no_ac},
  };
  for (const auto& p : pairs) {
    SCOPED_TRACE(p.name);
    const std::string high = std::string(p.name) + "_high", low = std::string(p.name) + "_f8";
    const RunResult a =
        train_ranks(dir, high, p.world, p.local_batch, kFinalSave + f8 + p.common + p.high_only);
    const RunResult b =
        train_ranks(dir, low, p.world, p.local_batch, kFinalSave + f8 + p.common + p.float8_gather);
    expect_same(b, a, p.name, 1e-7, 1e-6);
    EXPECT_LT(weights_difference(dir.file(low) + "/checkpoint/step-10",
                                 dir.file(high) + "/checkpoint/step-10"),
              1e-7);
    EXPECT_EQ(validation_lines(b.outputs[0]), validation_lines(a.outputs[0]));
    EXPECT_EQ(validation_lines(b.outputs[0]).size(), 3u) << b.outputs[0];  // steps 1, 5, 10
    EXPECT_NE(b.outputs[0].find(p.log), std::string::npos) << b.outputs[0];
    EXPECT_EQ(a.outputs[0].find(p.log), std::string::npos) << a.outputs[0];
  }
}

// optimizer.early_step_in_backward: each unit steps as soon as its gradient is final (after
// its reduction and, for replicas, the all-reduce) instead of after the whole backward. Every
// parameter's update reads only its own gradient and state, so without clipping training is
// the same to the last bit as the ordinary step, under gradient accumulation, FSDP with full
// checkpointing, HSDP and FSDP x TP (whose norm gradients are summed over tp per unit).
TEST(EarlyStepInBackward, EqualsTheOrdinaryStep) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> no_clip = {"--training.max_norm", "0"};
  const std::vector<std::string> early = {"--optimizer.early_step_in_backward"};
  struct Case {
    const char* name;
    int world;
    int64_t local_batch;
    std::vector<std::string> extra;
  };
  const std::vector<Case> cases = {
      {"single_accumulate", 1, 4, {"--training.global_batch_size", "8"}},
      {"fsdp2_full_ac", 2, 4, {"--activation_checkpoint.mode", "full"}},
      {"hsdp2x2", 4, 2, {"--parallelism.data_parallel_replicate_degree", "2"}},
      {"fsdp2_tp2", 4, 4, tp_args(2)},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string plain = std::string(c.name) + "_plain",
                      eager = std::string(c.name) + "_early";
    const RunResult a =
        train_ranks(dir, plain, c.world, c.local_batch, kFinalSave + no_clip + c.extra);
    const RunResult b =
        train_ranks(dir, eager, c.world, c.local_batch, kFinalSave + no_clip + c.extra + early);
    expect_same(b, a, c.name, 1e-7, 1e-7);
    EXPECT_LT(weights_difference(dir.file(eager) + "/checkpoint/step-10",
                                 dir.file(plain) + "/checkpoint/step-10"),
              1e-7);
    EXPECT_NE(b.outputs[0].find("each unit steps as soon as its gradient is final"),
              std::string::npos)
        << b.outputs[0];
  }
}

TEST(EarlyStepInBackward, CombinationsItCannotHonourAreClearErrors) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::vector<std::string> early = {"--optimizer.early_step_in_backward"};
  expect_config_error(dir.file("clip"), 1, early,
                      "optimizer.early_step_in_backward steps each unit before the global "
                      "gradient norm is known, so it cannot clip; set training.max_norm = 0");
  expect_config_error(
      dir.file("pp"), 2,
      early + std::vector<std::string>{"--training.max_norm", "0"} + pp_args(2, "1F1B", 2),
      "optimizer.early_step_in_backward is not supported with pipeline parallelism");
}
