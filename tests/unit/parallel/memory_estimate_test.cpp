// The start-up memory estimate of a plan: the float8 FSDP all-gather's gathered units count
// one byte per converted element.
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

}  // namespace
