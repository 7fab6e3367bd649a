// The start-up plan: its memory estimate (the float8 FSDP all-gather's gathered units count one
// byte per converted element, and float8 blocks keep their projections' inputs in one byte),
// and its checks of pipeline keys at one stage.
#include <gtest/gtest.h>

#include "titan/config/job_config.h"
#include "titan/dist/device_mesh.h"
#include "titan/model/llama_args.h"
#include "titan/parallel/parallelize.h"

namespace {

using namespace titan;

parallel::MemoryEstimate estimate_8b_fsdp8(bool float8_all_gather) {
  const model::LlamaArgs args = model::llama_flavor("8B");
  dist::ParallelDims d;
  d.world = 8;
  d.dp_shard = 8;
  const dist::DeviceMesh mesh(d, 0, nullptr);
  config::JobConfig c;
  c.model.converters = {"float8"};
  c.float8.enable_fsdp_float8_all_gather = float8_all_gather;
  c.training.seq_len = 4096;
  c.training.local_batch_size = 1;
  const parallel::Plan plan = parallel::build_plan(args, mesh, c, /*cuda=*/true);
  std::vector<int64_t> shards;
  for (const auto& u : plan.units) shards.push_back((u.numel + d.dp_shard - 1) / d.dp_shard);
  return parallel::estimate_memory(args, plan, shards, c.training.seq_len, /*sharded=*/true);
}

TEST(MemoryEstimate, Float8AllGatherHalvesTheGatheredProjections) {
  const auto bf16 = estimate_8b_fsdp8(false);
  const auto float8 = estimate_8b_fsdp8(true);
  // The largest two neighbours gathered at once are the embedding (bf16 either way) and the
  // first block, whose 4096 x 6144 q|k|v + 4096^2 wo + 3 x 4096 x 14336 FFN elements take one
  // byte each instead of two.
  const int64_t projections = 4096LL * 6144 + 4096LL * 4096 + 3 * 4096LL * 14336;
  EXPECT_EQ(bf16.weight_bytes - float8.weight_bytes, projections);
  EXPECT_EQ(bf16.param_state_bytes, float8.param_state_bytes);
  EXPECT_EQ(bf16.activation_bytes, float8.activation_bytes);
}

parallel::Plan plan_3b(const std::string& recipe, const std::string& ac_mode) {
  dist::ParallelDims d;
  d.world = 1;
  const dist::DeviceMesh mesh(d, 0, nullptr);
  config::JobConfig c;
  if (!recipe.empty()) c.model.converters = {"float8"};
  c.float8.recipe_name = recipe;
  c.training.seq_len = 4096;
  c.training.local_batch_size = 2;
  c.activation_checkpoint.mode = ac_mode;
  c.activation_checkpoint.memory_budget = 0.5;
  return parallel::build_plan(model::llama_flavor("3B"), mesh, c, /*cuda=*/true);
}

// A float8 block keeps the weight-gradient inputs of q|k|v, w1|w3 and w2 (the norms' and
// SwiGLU's outputs) cast, one byte each: keeping everything saves that much less, the recompute
// policies (which keep none of them) do not change, and memory_budget sizes its choice so.
TEST(MemoryEstimate, Float8BlocksKeepTheirProjectionInputsInOneByte) {
  using model::SavePolicy;
  const auto args = model::llama_flavor("3B");
  const int64_t d = args.dim, f = args.ffn_hidden_dim();
  const parallel::Float8SavedInputs cast{true, true, true};
  for (int64_t tp : {1, 2}) {
    EXPECT_EQ(parallel::saved_bytes_per_token(args, SavePolicy::All, 2, tp) -
                  parallel::saved_bytes_per_token(args, SavePolicy::All, 2, tp, cast),
              2 * d + f / tp);
    for (auto p : {SavePolicy::Matmuls, SavePolicy::Attention, SavePolicy::InputOnly}) {
      EXPECT_EQ(parallel::saved_bytes_per_token(args, p, 2, tp),
                parallel::saved_bytes_per_token(args, p, 2, tp, cast));
    }
  }
  const auto in = plan_3b("tensorwise", "none").float8.saved_inputs();
  EXPECT_TRUE(in.wqkv && in.w13 && in.w2);
  const auto hp = plan_3b("rowwise_with_gw_hp", "none").float8.saved_inputs();
  EXPECT_FALSE(hp.wqkv || hp.w13 || hp.w2);  // its weight gradient reads bf16 inputs
  const auto all = model::save_policy_index(SavePolicy::All);
  EXPECT_LT(plan_3b("tensorwise", "memory_budget").checkpointing.bytes_per_token[all],
            plan_3b("", "memory_budget").checkpointing.bytes_per_token[all]);
}

}  // namespace

// One stage leaves the schedule unused, but a misspelt name is still the config error it is
// with several (pp 1 is where a job file is first tried).
TEST(Plan, AMisspeltScheduleIsAnErrorAtOneStage) {
  dist::ParallelDims d;
  d.world = 1;
  const dist::DeviceMesh mesh(d, 0, nullptr);
  config::JobConfig c;
  c.parallelism.pipeline_parallel_schedule = "Interleaved1F1";
  std::string msg;
  try {
    parallel::build_plan(model::llama_flavor("debugmodel"), mesh, c, /*cuda=*/false);
  } catch (const std::exception& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("parallelism.pipeline_parallel_schedule: unknown pipeline schedule"),
            std::string::npos)
      << msg;
  c.parallelism.pipeline_parallel_schedule = "ZBV";
  EXPECT_EQ(parallel::build_plan(model::llama_flavor("debugmodel"), mesh, c, false).pp, 1);
}
