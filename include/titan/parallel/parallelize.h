// The plan of a run: from the model, the mesh and the config, in torchtitan's order, everything
// the trainer builds from — the pipeline's stage split and schedule, the microbatching, each
// block's activation-checkpoint policy and the FSDP units and options of this rank. No policy
// strings survive into the plan: they are parsed here, once.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "titan/config/job_config.h"
#include "titan/dist/device_mesh.h"
#include "titan/model/layout.h"
#include "titan/model/llama.h"
#include "titan/model/llama_args.h"
#include "titan/ops/float8.h"
#include "titan/parallel/fsdp.h"
#include "titan/parallel/memory_estimate.h"
#include "titan/parallel/pipeline/schedule.h"
#include "titan/parallel/pipeline/stage.h"

namespace titan::parallel {

// activation_checkpoint.mode / selective_ac_option, parsed.
// One figure per SavePolicy, in its order (bytes saved, recompute cost).
using PolicyFigures = std::array<double, model::kSavePolicies>;

struct CheckpointPolicy {
  enum class Mode { None, Full, EveryK, Ops, Budget };
  Mode mode = Mode::None;
  int64_t every = 1;  // EveryK: blocks (layer + 1) % every == 0 keep only their input
  // Budget (activation_checkpoint.mode = "memory_budget"): each block's policy, chosen so the
  // saved activations are at most `budget` x those of no checkpointing at the least estimated
  // recompute time; the estimate's figures for the log.
  double budget = 1.0;
  std::vector<model::SavePolicy> layers;
  double saved_fraction = 1.0;    // of no checkpointing's saved bytes
  double recompute_fraction = 0;  // estimated recompute time / the blocks' forward time
  // Budget: saved bytes per token of one block under each SavePolicy (in its order), the
  // number of blocks, and whether the recompute costs were measured (else a FLOP/byte model).
  PolicyFigures bytes_per_token{};
  int64_t layers_count = 0;
  bool measured = false;
  // Budget: re-chooses the blocks' policies from measured seconds per block of the Matmuls
  // recompute (norms, RoPE, SwiGLU), of the Attention one (those and w1|w3), of the whole-block
  // recompute, and of a block's forward.
  void set_measured_costs(double ops_s, double attention_s, double full_s, double forward_s);
  // `args`, `tp` and `float8` size the blocks for memory_budget (the other modes ignore them).
  static CheckpointPolicy from_config(const config::ActivationCheckpointSection& ac,
                                      const model::LlamaArgs& args, int64_t seq_len, int64_t tp = 1,
                                      const Float8SavedInputs& float8 = {});
  model::SavePolicy for_layer(int64_t layer) const;
  // "none", "full", "selective (every 2nd block)", "selective (op)", "memory budget ...".
  std::string describe() const;
  // Budget: the policies of least recompute `cost` (seconds or model units per block, per
  // SavePolicy) within the budget; `forward`: one block's forward in the same units.
  void choose_budget(const PolicyFigures& cost, double forward);
};

// memory_budget's choice: per-layer policies for `layers` identical blocks whose saved bytes per
// token under each SavePolicy are `bytes` and whose recompute costs are `cost` (SavePolicy
// order), minimizing the total cost with the saved bytes at most budget x all-kept (or the
// least possible when the budget is below it). Spread evenly over the layers.
std::vector<model::SavePolicy> choose_checkpointing(int64_t layers, double budget,
                                                    const PolicyFigures& bytes,
                                                    const PolicyFigures& cost);

// The model parts of each stage, from module_fqns_per_model_part, pipeline_parallel_split_points
// (torchtitan v0.1.0) or torchtitan's even split with the embedding and the head counted as
// first/last_stage_less_layers layers. Throws titan::Error naming the key for bad input.
std::vector<pipeline::StageLayout> split_stages(const model::LlamaArgs& args,
                                                const config::ParallelismSection& p, int pp,
                                                pipeline::ScheduleKind kind);

// Estimated compute per pipeline rank, in FLOPs per token: a block 6 x its parameters plus
// attention (12 x heads x head_dim x seq), 4/3 of that when fully checkpointed (the forward runs
// twice); the output projection 6 x vocab x dim. `head_in_blocks` is the head's cost in blocks,
// the value of pipeline_parallel_last_stage_less_layers that balances an even split.
struct PipelineBalance {
  std::vector<double> rank_flops;
  int heaviest = 0;
  double imbalance = 1.0;  // heaviest rank over the lightest
  double head_in_blocks = 0.0;
  bool head_on_heaviest = false;
};
PipelineBalance estimate_pipeline_balance(const model::LlamaArgs& args, int64_t seq_len,
                                          bool full_ac,
                                          const std::vector<pipeline::StageLayout>& stages,
                                          const pipeline::Schedule& schedule);

// Float8 training ([quantize.linear.float8] with model.converters = ["float8"]): the recipe
// and which block projections run their GEMMs in float8.
struct Float8Plan {
  bool enabled = false;
  ops::Float8Recipe recipe = ops::Float8Recipe::Tensorwise;
  bool emulate = false;
  bool wqkv = false, wo = false, w13 = false, w2 = false;
  bool all_gather = false;         // FSDP gathers the converted weights in float8
  bool precompute_scales = false;  // ... with one amax all-reduce per step
  // Unsharded weights cast per use (activation checkpointing on): the converted matrices are
  // cast to float8 straight from the fp32 masters where the unit is materialized, with one amax
  // per matrix and step (no bf16 copy, no amax per use).
  bool from_master = false;
  std::string describe() const;
  // The projections whose weight-gradient inputs a block keeps in float8.
  Float8SavedInputs saved_inputs() const;
};

// auto_filter_small_kn: whether a projection with K input and N output features gains from
// float8. Measured on an H200 with titan's kernels (titan_bench_float8: the three GEMMs plus
// the casts against bf16): at 8,192 tokens every shape with both dimensions >= 2048 and
// K x N >= 4096^2 gains (2048 x 8192: 1.04x, 4096 x 4096: 1.07x, 3072 x 16384: 1.2x), and at
// 16,384 tokens from 3072^2 (1.06x); below 2048 features nothing gains (2048 x 2048: 0.80x,
// 1024 x 14336: 0.76x). In the 3B model (8,192 tokens per microbatch) converting its 3072 x
// 3072 and 3072 x 5120 projections too is 2.5% faster (24,116 vs 23,511 TPS), so the product
// threshold is 3072^2.
constexpr int64_t kFloat8MinFeatures = 2048;
constexpr int64_t kFloat8MinProduct = int64_t{3072} * 3072;
bool float8_gains(int64_t k, int64_t n);
// From the config: which projections are converted (filter_fqns, auto_filter_small_kn).
// Throws titan::Error for combinations titan cannot run (float8 on CPU without emulate, with
// tensor parallelism).
Float8Plan plan_float8(const model::LlamaArgs& args, const config::JobConfig& config, bool cuda,
                       int64_t tp);

struct Plan {
  int pp = 1;                                 // pipeline degree
  int64_t tp = 1;                             // tensor-parallel degree
  bool loss_parallel = true;                  // tp: the loss on vocabulary shards
  bool async_tp = false;                      // tp: overlapped gathers / reduce-scatters
  int64_t cp = 1;                             // context-parallel degree
  std::string cp_rotate = "allgather";        // cp: "allgather" or "alltoall" (ring)
  std::string cp_load_balancer = "headtail";  // cp: "headtail" or "none"
  int pp_rank = 0;                            // this rank's pipeline coordinate
  pipeline::Schedule schedule;  // one pass (gradient-accumulation step) of the pipeline
  std::vector<pipeline::StageLayout> stages;  // every stage
  std::vector<int> local_stages;              // global indices of this rank's stages
  int64_t microbatch_size = 1;                // sequences per microbatch
  int64_t passes = 1;       // schedule passes per optimizer step (gradient accumulation)
  int64_t local_batch = 1;  // sequences per data-parallel rank per pass
  CheckpointPolicy checkpointing;
  Float8Plan float8;
  std::vector<model::UnitLayout> units;          // this rank's units, stage after stage
  std::vector<std::vector<size_t>> stage_units;  // per local stage: indices into `units`
  FsdpOptions fsdp;
  // Microbatches of each local stage whose activations live at once (simulated schedule).
  std::vector<int> peak_in_flight;
  // TeraPipe: the token slices of each sequence (empty without), and whether they are still to
  // be chosen from measured slice times (parallelism.pipeline_parallel_token_slices = "auto";
  // the schedule then runs whole sequences until set_token_slices).
  std::vector<int64_t> token_slices;
  bool token_slices_auto = false;

  // TeraPipe: sequences run as token slices (chosen or still to be chosen).
  bool terapipe() const { return token_slices_auto || !token_slices.empty(); }
  int64_t microbatches_per_step() const {
    return passes * static_cast<int64_t>(schedule.microbatches);
  }
  // Multi-line description for the log (stages, schedule, microbatching, bubble).
  std::string describe() const;
};

// Builds the plan for this rank (`mesh` gives the degrees and its coordinates). `dp` is the
// data-parallel degree the global batch divides over; `cuda`: GPU run (bf16 compute).
Plan build_plan(const model::LlamaArgs& args, const dist::DeviceMesh& mesh,
                const config::JobConfig& config, bool cuda);

// TeraPipe: rebuilds the plan's schedule with `lengths` as each sequence's token slices.
void set_token_slices(Plan& plan, const std::vector<int64_t>& lengths);

// This rank's memory estimate under the plan.
MemoryEstimate estimate_memory(const model::LlamaArgs& args, const Plan& plan,
                               const std::vector<int64_t>& shard_numels, int64_t seq_len,
                               bool sharded);

}  // namespace titan::parallel
