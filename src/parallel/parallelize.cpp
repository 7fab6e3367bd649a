// build_plan: the pipeline split (torchtitan's rules), the schedule and microbatching, the
// activation-checkpoint policies and this rank's FSDP units and options.
#include "titan/parallel/parallelize.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "titan/parallel/memory_estimate.h"
#include "titan/parallel/pipeline/terapipe.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::parallel {

using pipeline::ScheduleKind;
using pipeline::StageLayout;

std::vector<model::SavePolicy> choose_checkpointing(int64_t layers, double budget,
                                                    const PolicyFigures& bytes,
                                                    const PolicyFigures& cost) {
  constexpr size_t P = model::kSavePolicies;
  const double limit = std::max(budget * layers * bytes[0], layers * bytes[P - 1]);
  // Blocks are identical: only how many take each policy matters (O(layers^3) candidates).
  std::array<int64_t, P> want{};
  want[P - 1] = layers;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t n0 = 0; n0 <= layers; ++n0) {
    for (int64_t n1 = 0; n0 + n1 <= layers; ++n1) {
      for (int64_t n2 = 0; n0 + n1 + n2 <= layers; ++n2) {
        const std::array<int64_t, P> n = {n0, n1, n2, layers - n0 - n1 - n2};
        double b = 0, t = 0;
        for (size_t k = 0; k < P; ++k) {
          b += static_cast<double>(n[k]) * bytes[k];
          t += static_cast<double>(n[k]) * cost[k];
        }
        if (b <= limit * (1 + 1e-12) && t < best) {
          best = t;
          want = n;
        }
      }
    }
  }
  // Even spread: each layer takes the policy furthest behind its share so far.
  const std::array<model::SavePolicy, P> kinds = {
      model::SavePolicy::All, model::SavePolicy::Matmuls, model::SavePolicy::Attention,
      model::SavePolicy::InputOnly};
  std::array<int64_t, P> given{};
  std::vector<model::SavePolicy> out;
  for (int64_t l = 0; l < layers; ++l) {
    size_t pick = 0;
    double lag = -std::numeric_limits<double>::infinity();
    for (size_t k = 0; k < P; ++k) {
      if (given[k] == want[k]) continue;
      const double behind = static_cast<double>(want[k]) * (l + 1) / layers - given[k];
      if (behind > lag) {
        lag = behind;
        pick = k;
      }
    }
    ++given[pick];
    out.push_back(kinds[pick]);
  }
  return out;
}

CheckpointPolicy CheckpointPolicy::from_config(const config::ActivationCheckpointSection& ac,
                                               const model::LlamaArgs& args, int64_t seq_len,
                                               int64_t tp, const Float8SavedInputs& float8) {
  CheckpointPolicy p;
  if (ac.mode == "none") return p;
  if (ac.mode == "full") {
    p.mode = Mode::Full;
    return p;
  }
  if (ac.mode == "memory_budget") {
    TITAN_CHECK(ac.memory_budget >= 0 && ac.memory_budget <= 1,
                "activation_checkpoint.memory_budget: expected a fraction in [0, 1], got ",
                ac.memory_budget);
    p.mode = Mode::Budget;
    p.budget = ac.memory_budget;
    p.layers_count = args.n_layers;
    // Saved bytes per token of each policy (2-byte compute dtype; only ratios matter), and the
    // recompute cost of each as a fraction of the block's forward: its FLOPs (projections and
    // causal attention) at a matmul rate against the bytes the elementwise recompute of the
    // Matmuls policy moves (norms, RoPE, SwiGLU) at a memory rate; H100/H200 ratio of about
    // 200 FLOP per byte. Recomputing from the input alone skips w2 (its output is not needed).
    PolicyFigures bytes;
    for (auto kind : {model::SavePolicy::All, model::SavePolicy::Matmuls,
                      model::SavePolicy::Attention, model::SavePolicy::InputOnly}) {
      bytes[model::save_policy_index(kind)] =
          static_cast<double>(saved_bytes_per_token(args, kind, 2, tp, float8));
    }
    const double hd = static_cast<double>(args.head_dim());
    const double q = args.n_heads * hd, kv = args.n_kv_heads * hd;
    const double d = static_cast<double>(args.dim), f = static_cast<double>(args.ffn_hidden_dim());
    const double forward_flops =
        (2.0 * d * (q + 2 * kv) + 2.0 * q * d + 6.0 * d * f + 2.0 * q * seq_len) / tp;
    const double elementwise_bytes = (4 * d + 2 * (q + kv) + 3 * f) / tp * 2 * 2;
    const double forward_cost = forward_flops / 200.0;
    const double w13_cost = 4.0 * d * f / tp / 200.0;
    const double w2_cost = 2.0 * d * f / tp / 200.0;
    p.bytes_per_token = bytes;
    p.choose_budget({0.0, elementwise_bytes, w13_cost + elementwise_bytes,
                     forward_cost - w2_cost + elementwise_bytes},
                    forward_cost + elementwise_bytes);
    return p;
  }
  TITAN_CHECK(ac.mode == "selective", "activation_checkpoint.mode: \"", ac.mode,
              "\" is not available here");
  if (ac.selective_ac_option == "op") {
    p.mode = Mode::Ops;
    return p;
  }
  p.mode = Mode::EveryK;
  TITAN_CHECK(util::parse_int(ac.selective_ac_option, p.every) && p.every >= 1,
              "activation_checkpoint.selective_ac_option: expected a positive integer or \"op\", "
              "got \"",
              ac.selective_ac_option, "\"");
  return p;
}

void CheckpointPolicy::choose_budget(const PolicyFigures& cost, double forward) {
  const auto n_layers = static_cast<int64_t>(layers.empty() ? layers_count : layers.size());
  layers_count = n_layers;
  layers = choose_checkpointing(n_layers, budget, bytes_per_token, cost);
  double saved = 0, recompute = 0;
  for (auto policy : layers) {
    const size_t k = model::save_policy_index(policy);
    saved += bytes_per_token[k];
    recompute += cost[k];
  }
  saved_fraction = saved / (static_cast<double>(n_layers) * bytes_per_token[0]);
  recompute_fraction = recompute / (static_cast<double>(n_layers) * forward);
}

void CheckpointPolicy::set_measured_costs(double ops_s, double attention_s, double full_s,
                                          double forward_s) {
  TITAN_INTERNAL_CHECK(mode == Mode::Budget, "measured recompute costs outside memory_budget");
  measured = true;
  choose_budget({0.0, std::max(0.0, ops_s), std::max(0.0, attention_s), std::max(0.0, full_s)},
                forward_s);
}

model::SavePolicy CheckpointPolicy::for_layer(int64_t layer) const {
  switch (mode) {
    case Mode::None: return model::SavePolicy::All;
    case Mode::Full: return model::SavePolicy::InputOnly;
    case Mode::Ops: return model::SavePolicy::Matmuls;
    case Mode::Budget: return layers.at(static_cast<size_t>(layer));
    case Mode::EveryK: break;
  }
  // torchtitan checkpoints every k-th block counting from one.
  return (layer + 1) % every == 0 ? model::SavePolicy::InputOnly : model::SavePolicy::All;
}

std::string CheckpointPolicy::describe() const {
  switch (mode) {
    case Mode::None: return "none";
    case Mode::Full: return "full";
    case Mode::Ops: return "selective (op: matmul and attention outputs kept)";
    case Mode::Budget: {
      std::array<int64_t, model::kSavePolicies> n{};
      for (auto p : layers) ++n[model::save_policy_index(p)];
      return fmt::format(
          "memory budget {:.2f}: {} block(s) keep everything, {} keep matmul and attention "
          "outputs (op), {} the attention half's (w1|w3 recomputed), {} only their input "
          "(full); saved activations {:.2f} of no checkpointing, estimated recompute {:.0f}% "
          "of the blocks' forward ({})",
          budget, n[0], n[1], n[2], n[3], saved_fraction, 100 * recompute_fraction,
          measured ? "recompute times measured on this device" : "FLOP/byte model");
    }
    case Mode::EveryK: break;
  }
  return every == 1 ? "selective (every block)"
                    : "selective (every " + std::to_string(every) + " blocks, one checkpointed)";
}

namespace {

// torchtitan's even split: the embedding counts as `in_w` layers and norm + output as `out_w`;
// the first (effective % stages) stages take one effective layer more.
std::vector<StageLayout> even_split(int stages, int64_t layers, int64_t in_w, int64_t out_w) {
  std::vector<StageLayout> out(static_cast<size_t>(stages));
  if (stages == 1) {
    out[0] = {0, true, 0, static_cast<int>(layers), true};
    return out;
  }
  const int64_t effective = layers + in_w + out_w;
  TITAN_CHECK(stages <= effective, "pipeline: ", stages, " stages but only ", effective,
              " layers to give them (", layers, " blocks + the embedding counted as ", in_w,
              " (pipeline_parallel_first_stage_less_layers) + norm and output counted as ", out_w,
              " (pipeline_parallel_last_stage_less_layers)); use fewer stages");
  const int64_t base = effective / stages, extra = effective % stages;
  TITAN_CHECK(in_w <= base && out_w <= base, "pipeline: ", stages, " stages of about ", base,
              " layers each cannot hold the embedding (", in_w,
              " layers, pipeline_parallel_first_stage_less_layers) or the head (", out_w,
              " layers, pipeline_parallel_last_stage_less_layers); lower them or use fewer "
              "stages");
  int64_t next = 0;
  for (int i = 0; i < stages; ++i) {
    int64_t n = base + (i < extra ? 1 : 0);
    StageLayout& st = out[static_cast<size_t>(i)];
    st.index = i;
    st.embedding = i == 0;
    st.head = i == stages - 1;
    if (st.embedding) n -= in_w;
    if (st.head) n -= out_w;
    n = std::min(n, layers - next);
    st.first_layer = static_cast<int>(next);
    st.layers = static_cast<int>(std::max<int64_t>(0, n));
    next += st.layers;
  }
  TITAN_INTERNAL_CHECK(next == layers, "even split assigned ", next, " of ", layers, " layers");
  return out;
}

// Stages from explicit module names per part (module_fqns_per_model_part).
std::vector<StageLayout> split_by_names(const std::vector<std::vector<std::string>>& parts,
                                        int64_t layers) {
  const std::string key = "parallelism.module_fqns_per_model_part";
  std::vector<StageLayout> out;
  int64_t next = 0;
  bool seen_head = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    StageLayout st;
    st.index = static_cast<int>(i);
    st.first_layer = static_cast<int>(next);
    TITAN_CHECK(!parts[i].empty(), key, ": part ", i, " is empty");
    bool norm = false, output = false;
    for (const auto& name : parts[i]) {
      TITAN_CHECK(!seen_head, key, ": part ", i, " comes after the one holding norm and output; ",
                  "the head must be the last part");
      if (name == "tok_embeddings") {
        TITAN_CHECK(i == 0 && st.layers == 0, key,
                    ": tok_embeddings must open the first part (found in part ", i, ")");
        st.embedding = true;
      } else if (name == "norm") {
        norm = true;
      } else if (name == "output") {
        output = true;
      } else if (name.rfind("layers.", 0) == 0) {
        int64_t l = -1;
        TITAN_CHECK(util::parse_int(name.substr(7), l) && l >= 0 && l < layers, key, ": \"", name,
                    "\" is not a layer of this model (layers.0 .. layers.", layers - 1, ")");
        TITAN_CHECK(!norm && !output, key, ": ", name, " comes after norm/output in part ", i);
        TITAN_CHECK(l == next, key, ": layers must appear once each, in order; part ", i, " has ",
                    name, " where layers.", next, " is next");
        ++next;
        ++st.layers;
      } else {
        fail(key, ": unknown module \"", name,
             "\"; expected tok_embeddings, layers.<n>, norm or output");
      }
    }
    TITAN_CHECK(norm == output, key, ": norm and output belong to the same (last) part; part ", i,
                " has only ", norm ? "norm" : "output");
    st.head = norm;
    seen_head = norm;
    out.push_back(st);
  }
  TITAN_CHECK(!out.empty() && out.front().embedding, key, ": tok_embeddings must be in part 0");
  TITAN_CHECK(seen_head, key, ": no part holds norm and output");
  TITAN_CHECK(next == layers, key, ": the parts hold layers.0 .. layers.", next - 1, " but the ",
              "model has ", layers, " layers");
  return out;
}

// Stages from torchtitan v0.1.0's split points ("layers.4" opens a stage).
std::vector<StageLayout> split_by_points(const std::vector<std::string>& points, int64_t layers) {
  const std::string key = "parallelism.pipeline_parallel_split_points";
  std::vector<int64_t> starts = {0};
  for (const auto& p : points) {
    int64_t l = -1;
    TITAN_CHECK(
        p.rfind("layers.", 0) == 0 && util::parse_int(p.substr(7), l) && l > 0 && l < layers, key,
        ": \"", p, "\" is not a layer that can open a stage (layers.1 .. layers.", layers - 1, ")");
    TITAN_CHECK(l > starts.back(), key, ": split points must be in increasing order");
    starts.push_back(l);
  }
  std::vector<StageLayout> out;
  for (size_t i = 0; i < starts.size(); ++i) {
    StageLayout st;
    st.index = static_cast<int>(i);
    st.embedding = i == 0;
    st.head = i + 1 == starts.size();
    st.first_layer = static_cast<int>(starts[i]);
    st.layers = static_cast<int>((i + 1 < starts.size() ? starts[i + 1] : layers) - starts[i]);
    out.push_back(st);
  }
  return out;
}

}  // namespace

std::vector<StageLayout> split_stages(const model::LlamaArgs& args,
                                      const config::ParallelismSection& p, int pp,
                                      ScheduleKind kind) {
  const int64_t layers = args.n_layers;
  if (!p.module_fqns_per_model_part.empty()) {
    return split_by_names(p.module_fqns_per_model_part, layers);
  }
  if (!p.pipeline_parallel_split_points.empty()) {
    return split_by_points(p.pipeline_parallel_split_points, layers);
  }
  const int64_t in_w = p.pipeline_parallel_first_stage_less_layers;
  const int64_t out_w = p.pipeline_parallel_last_stage_less_layers;
  int64_t stages = static_cast<int64_t>(pp) * (pipeline::multi_stage(kind) ? 2 : 1);
  if (p.pipeline_parallel_layers_per_stage) {
    const int64_t per = *p.pipeline_parallel_layers_per_stage;
    stages = (layers + in_w + out_w + per - 1) / per;
    const std::string why =
        " (" + std::to_string(layers) + " layers + " + std::to_string(in_w) + " + " +
        std::to_string(out_w) +
        " for embedding and head, pipeline_parallel_layers_per_stage = " + std::to_string(per) +
        ")";
    TITAN_CHECK(stages % pp == 0, "parallelism.pipeline_parallel_layers_per_stage: ", stages,
                " stages", why, " do not divide over ", pp, " pipeline ranks");
    const int64_t per_rank = stages / pp;
    TITAN_CHECK(pipeline::multi_stage(kind) || per_rank == 1,
                "parallelism.pipeline_parallel_layers_per_stage: ", pipeline::schedule_name(kind),
                " runs one stage per rank, but ", stages, " stages", why, " give ", per_rank,
                " per rank; raise pipeline_parallel_layers_per_stage or use a multi-stage "
                "schedule");
    TITAN_CHECK(!pipeline::multi_stage(kind) || per_rank >= 2,
                "parallelism.pipeline_parallel_layers_per_stage: ", pipeline::schedule_name(kind),
                " needs at least two stages per rank, but ", stages, " stages", why, " give ",
                per_rank, "; lower pipeline_parallel_layers_per_stage");
  }
  return even_split(static_cast<int>(stages), layers, in_w, out_w);
}

PipelineBalance estimate_pipeline_balance(const model::LlamaArgs& args, int64_t seq_len,
                                          bool full_ac,
                                          const std::vector<pipeline::StageLayout>& stages,
                                          const pipeline::Schedule& schedule) {
  PipelineBalance b;
  const double block = (6.0 * static_cast<double>(args.params_per_block()) +
                        12.0 * static_cast<double>(args.n_heads * args.head_dim() * seq_len)) *
                       (full_ac ? 4.0 / 3.0 : 1.0);
  const double head = 6.0 * static_cast<double>(args.vocab_size * args.dim);
  b.head_in_blocks = head / block;
  int head_rank = -1;
  for (int r = 0; r < schedule.pp; ++r) {
    double flops = 0;
    for (int st : schedule.stages_of(r)) {
      const auto& s = stages[static_cast<size_t>(st)];
      flops += block * s.layers + (s.head ? head : 0.0);
      if (s.head) head_rank = r;
    }
    b.rank_flops.push_back(flops);
  }
  const auto [lo, hi] = std::minmax_element(b.rank_flops.begin(), b.rank_flops.end());
  b.heaviest = static_cast<int>(hi - b.rank_flops.begin());
  b.imbalance = *lo > 0 ? *hi / *lo : std::numeric_limits<double>::infinity();
  b.head_on_heaviest = head_rank == b.heaviest;
  return b;
}

bool float8_gains(int64_t k, int64_t n) {
  return std::min(k, n) >= kFloat8MinFeatures && k * n >= kFloat8MinProduct;
}

Float8SavedInputs Float8Plan::saved_inputs() const {
  // rowwise_with_gw_hp multiplies the weight gradient in bf16: its inputs stay bf16.
  const bool cast = enabled && recipe != ops::Float8Recipe::RowwiseWithGwHp;
  return {cast && wqkv, cast && w13, cast && w2};
}

Float8Plan plan_float8(const model::LlamaArgs& args, const config::JobConfig& c, bool cuda,
                       int64_t tp) {
  Float8Plan f;
  for (const auto& conv : c.model.converters) {
    f.enabled = f.enabled || conv == "float8" || conv == "quantize.linear.float8";
  }
  if (!f.enabled) return f;
  const auto& fc = c.float8;
  f.recipe = ops::parse_float8_recipe(fc.recipe_name);
  f.emulate = fc.emulate;
  TITAN_CHECK(cuda || f.emulate,
              "model.converters = [\"float8\"]: float8 GEMMs need an NVIDIA GPU with compute "
              "capability 8.9 or newer (H100, H200, L40S); on CPU set "
              "quantize.linear.float8.emulate = true (float8 rounding, fp32 products)");
  TITAN_CHECK(tp == 1 || f.recipe == ops::Float8Recipe::Tensorwise,
              "quantize.linear.float8.recipe_name = \"", fc.recipe_name,
              "\" with parallelism.tensor_parallel_degree = ", tp,
              ": float8 with tensor parallelism takes the \"tensorwise\" recipe");
  const auto& filters = fc.filter_fqns;
  const bool auto_small =
      std::find(filters.begin(), filters.end(), "auto_filter_small_kn") != filters.end();
  struct Projection {
    bool* on;
    std::vector<std::string> modules;
    int64_t k, n;
  };
  const int64_t hd = args.head_dim();
  // Each rank's GEMM shapes: tensor parallelism splits N of the column-parallel projections
  // and K of the row-parallel ones.
  const std::vector<Projection> projections = {
      {&f.wqkv, {"attention.wq", "attention.wk", "attention.wv"}, args.dim, args.qkv_dim() / tp},
      {&f.wo, {"attention.wo"}, args.n_heads * hd / tp, args.dim},
      {&f.w13, {"feed_forward.w1", "feed_forward.w3"}, args.dim, 2 * args.ffn_hidden_dim() / tp},
      {&f.w2, {"feed_forward.w2"}, args.ffn_hidden_dim() / tp, args.dim},
  };
  for (const auto& p : projections) {
    bool skip = auto_small && !float8_gains(p.k, p.n);
    for (const auto& m : p.modules) {
      for (const auto& e : filters) {
        if (e != "auto_filter_small_kn" && m.find(e) != std::string::npos) skip = true;
      }
    }
    *p.on = !skip;
  }
  if (std::find(filters.begin(), filters.end(), "output") == filters.end()) {
    log::warn(
        "quantize.linear.float8.filter_fqns does not list \"output\": titan keeps the output "
        "projection in bf16 (it is fused with the loss; torchtitan would convert it)");
  }
  return f;
}

std::string Float8Plan::describe() const {
  if (!enabled) return "off";
  std::vector<std::string> on, off;
  for (auto [flag, name] :
       {std::pair{wqkv, "attention.wq|wk|wv"}, std::pair{wo, "attention.wo"},
        std::pair{w13, "feed_forward.w1|w3"}, std::pair{w2, "feed_forward.w2"}}) {
    (flag ? on : off).push_back(name);
  }
  return fmt::format("{} recipe{}; float8 GEMMs in {}; bf16: {}output{}",
                     ops::float8_recipe_name(recipe), emulate ? " (emulated)" : "",
                     on.empty() ? "none" : util::join(on, ", "),
                     off.empty() ? "" : util::join(off, ", ") + ", ",
                     from_master         ? "; weights cast from the fp32 masters once per use, "
                                           "scales once per step"
                     : !all_gather       ? ""
                     : precompute_scales ? "; FSDP all-gathers them in float8 (scales precomputed "
                                           "once per step)"
                                         : "; FSDP all-gathers them in float8");
}

Plan build_plan(const model::LlamaArgs& args, const dist::DeviceMesh& mesh,
                const config::JobConfig& c, bool cuda) {
  Plan plan;
  const auto& dims = mesh.dims();
  const auto& p = c.parallelism;
  plan.pp = static_cast<int>(dims.pp);
  plan.pp_rank = static_cast<int>(mesh.coordinate("pp"));
  plan.float8 = plan_float8(args, c, cuda, dims.tp);
  plan.checkpointing = CheckpointPolicy::from_config(
      c.activation_checkpoint, args, c.training.seq_len, dims.tp, plan.float8.saved_inputs());

  // Batch: the global batch over the data-parallel ranks, the rest gradient accumulation.
  const int64_t dp = mesh.size("dp");
  const int64_t local = c.training.local_batch_size;
  int64_t global = c.training.global_batch_size < 0 ? local * dp : c.training.global_batch_size;
  TITAN_CHECK(global % (local * dp) == 0, "training.global_batch_size (", global,
              ") must be a multiple of local_batch_size (", local, ") x data-parallel degree (", dp,
              ") = ", local * dp);
  const int64_t accumulation = global / (local * dp);
  plan.local_batch = local;

  const bool slices_given = !pipeline::token_slices_auto(p.pipeline_parallel_token_slices);
  if (plan.pp == 1) {
    // A misspelt schedule is an error even where one stage leaves it unused.
    pipeline::parse_schedule(p.pipeline_parallel_schedule,
                             "parallelism.pipeline_parallel_schedule");
    TITAN_CHECK(util::lower(p.pipeline_parallel_schedule) != "terapipe",
                "parallelism.pipeline_parallel_schedule = \"TeraPipe\" pipelines token slices "
                "of each sequence through pipeline stages; it needs "
                "parallelism.pipeline_parallel_degree > 1");
    TITAN_CHECK(!slices_given,
                "parallelism.pipeline_parallel_token_slices applies to the TeraPipe pipeline "
                "schedule only (parallelism.pipeline_parallel_degree is 1)");
    // One stage; gradient accumulation is the microbatches of the trivial schedule.
    plan.stages = {StageLayout{0, true, 0, static_cast<int>(args.n_layers), true}};
    plan.microbatch_size = local;
    plan.passes = 1;
    plan.schedule =
        pipeline::build_schedule(ScheduleKind::OneFOneB, 1, 1, static_cast<int>(accumulation));
  } else {
    const ScheduleKind kind = pipeline::parse_schedule(p.pipeline_parallel_schedule,
                                                       "parallelism.pipeline_parallel_schedule");
    plan.stages = split_stages(args, p, plan.pp, kind);
    plan.microbatch_size = p.pipeline_parallel_microbatch_size;
    TITAN_CHECK(local % plan.microbatch_size == 0, "training.local_batch_size (", local,
                ") must be a multiple of parallelism.pipeline_parallel_microbatch_size (",
                plan.microbatch_size, ") to split into microbatches");
    const int microbatches = static_cast<int>(local / plan.microbatch_size);
    plan.passes = accumulation;
    if (!p.pipeline_parallel_schedule_csv.empty()) {
      plan.schedule = pipeline::schedule_from_csv(p.pipeline_parallel_schedule_csv, plan.pp,
                                                  pipeline::v_placement(kind));
      TITAN_CHECK(plan.schedule.stages == static_cast<int>(plan.stages.size()),
                  "parallelism.pipeline_parallel_schedule_csv: ", p.pipeline_parallel_schedule_csv,
                  " schedules ", plan.schedule.stages, " stages, but the model is split into ",
                  plan.stages.size());
      TITAN_CHECK(plan.schedule.microbatches == microbatches,
                  "parallelism.pipeline_parallel_schedule_csv: ", p.pipeline_parallel_schedule_csv,
                  " schedules ", plan.schedule.microbatches,
                  " microbatches, but local_batch_size / pipeline_parallel_microbatch_size = ",
                  microbatches);
    } else {
      plan.schedule = pipeline::build_schedule(kind, plan.pp, static_cast<int>(plan.stages.size()),
                                               microbatches);
    }
    if (kind == ScheduleKind::TeraPipe) {
      TITAN_CHECK(p.pipeline_parallel_schedule_csv.empty(),
                  "parallelism.pipeline_parallel_schedule_csv: a CSV schedule cannot carry "
                  "TeraPipe's token slices; unset it or choose another schedule");
      TITAN_CHECK(dims.cp == 1,
                  "parallelism.pipeline_parallel_schedule = \"TeraPipe\" and "
                  "context_parallel_degree > 1 both split the sequence dimension; use one of them");
      plan.token_slices = pipeline::parse_token_slices(
          p.pipeline_parallel_token_slices, c.training.seq_len, static_cast<int64_t>(dims.tp));
      plan.token_slices_auto = plan.token_slices.empty();
      if (plan.token_slices_auto) {
        // Checked now (a bad seq_len fails before anything is built); chosen after measuring.
        pipeline::token_slice_quantum(c.training.seq_len, static_cast<int64_t>(dims.tp));
      } else {
        plan.schedule = pipeline::build_schedule(
            kind, plan.pp, static_cast<int>(plan.stages.size()), microbatches, plan.token_slices);
      }
    } else {
      TITAN_CHECK(!slices_given,
                  "parallelism.pipeline_parallel_token_slices applies to the "
                  "TeraPipe pipeline schedule only (pipeline_parallel_schedule is \"",
                  p.pipeline_parallel_schedule, "\")");
    }
    pipeline::check_schedule(plan.schedule);
    // An even split counts the output projection as pipeline_parallel_last_stage_less_layers
    // blocks; with a large vocabulary it costs several (1B: about 3 under full checkpointing),
    // and the bubble grows with the heaviest rank's excess (measured on 2 H200s: 1F1B at pp 2
    // went from 28,886 to 42,991 TPS/GPU with the suggested 3 instead of 1).
    const bool even = p.module_fqns_per_model_part.empty() &&
                      p.pipeline_parallel_split_points.empty() &&
                      !p.pipeline_parallel_layers_per_stage;
    const PipelineBalance bal = estimate_pipeline_balance(
        args, c.training.seq_len, plan.checkpointing.mode == CheckpointPolicy::Mode::Full,
        plan.stages, plan.schedule);
    if (bal.imbalance > 1.1) {
      std::vector<std::string> shares;
      const double top = bal.rank_flops[static_cast<size_t>(bal.heaviest)];
      for (double f : bal.rank_flops) shares.push_back(fmt::format("{:.0f}%", 100 * f / top));
      const long suggest = std::lround(bal.head_in_blocks);
      log::warn(
          "pipeline: the ranks' estimated compute is uneven ({} of the heaviest, rank {}); the "
          "output projection (vocab {} x dim {}) costs about {:.1f} blocks{}",
          util::join(shares, ", "), bal.heaviest, args.vocab_size, args.dim, bal.head_in_blocks,
          even && bal.head_on_heaviest && suggest != p.pipeline_parallel_last_stage_less_layers
              ? fmt::format(", counted as {}: parallelism.pipeline_parallel_last_stage_less_layers "
                            "= {} balances the split better",
                            p.pipeline_parallel_last_stage_less_layers, suggest)
              : std::string());
    }
  }
  const auto sim = pipeline::simulate(plan.schedule, pipeline::ActionCosts{});
  plan.peak_in_flight = {sim.peak_in_flight[static_cast<size_t>(plan.pp_rank)]};

  // Tensor parallel: every unit holds this tp rank's part of each parameter.
  plan.tp = dims.tp;
  if (plan.tp > 1) {
    model::check_tensor_parallel(args, plan.tp);
    TITAN_CHECK(c.training.seq_len % plan.tp == 0, "training.seq_len (", c.training.seq_len,
                ") must be divisible by parallelism.tensor_parallel_degree (", plan.tp,
                "): sequence parallelism gives each tensor-parallel rank an equal share of the "
                "tokens");
    TITAN_CHECK(!c.validation.enable || c.validation.seq_len % plan.tp == 0, "validation.seq_len (",
                c.validation.seq_len, ") must be divisible by parallelism.tensor_parallel_degree (",
                plan.tp, ")");
    plan.loss_parallel = !p.disable_loss_parallel;
    plan.async_tp = p.enable_async_tensor_parallel;
    const bool all_float8 = plan.float8.wqkv && plan.float8.wo && plan.float8.w13 && plan.float8.w2;
    if (plan.async_tp && plan.float8.enabled) {
      log::warn(
          "parallelism.enable_async_tensor_parallel overlaps the bf16 projections only{}: the "
          "float8 ones gather their tokens first, then multiply",
          all_float8 ? " (none here: every block projection is in float8)" : "");
    }
  } else if (p.enable_async_tensor_parallel) {
    log::warn(
        "parallelism.enable_async_tensor_parallel has no effect without tensor parallelism "
        "(parallelism.tensor_parallel_degree = 1)");
  }

  // Context parallel: each rank holds 1/cp of every sequence, cut into chunks (2 x cp with
  // head-tail load balancing), and sequence parallel splits that share again over tp.
  plan.cp = dims.cp;
  if (plan.cp > 1) {
    TITAN_CHECK(p.context_parallel_load_balancer != "ptrr",
                "parallelism.context_parallel_load_balancer = \"ptrr\" (per-document round-robin) "
                "balances flex attention's document masks, which titan does not use; use "
                "\"headtail\" (balanced causal work) or \"none\"");
    plan.cp_rotate = p.context_parallel_rotate_method;
    plan.cp_load_balancer = p.context_parallel_load_balancer;
    const int64_t chunks = plan.cp_load_balancer == "headtail" ? 2 * plan.cp : plan.cp;
    const int64_t unit = chunks * plan.tp;
    const std::string why =
        std::string(plan.cp_load_balancer == "headtail" ? "2 x " : "") +
        "parallelism.context_parallel_degree (" + std::to_string(plan.cp) + ")" +
        (plan.tp > 1 ? " x tensor_parallel_degree (" + std::to_string(plan.tp) + ")" : "");
    TITAN_CHECK(
        c.training.seq_len % unit == 0, "training.seq_len (", c.training.seq_len,
        ") must be divisible by ", why, " = ", unit,
        ": context parallel cuts each sequence into equal chunks",
        plan.cp_load_balancer == "headtail" ? " (head-tail load balancing: 2 per rank)" : "");
    TITAN_CHECK(!c.validation.enable || c.validation.seq_len % unit == 0, "validation.seq_len (",
                c.validation.seq_len, ") must be divisible by ", why, " = ", unit);
  }

  // This rank's units, stage after stage.
  const auto all_units = model::llama_units(args, {plan.tp, mesh.coordinate("tp")});
  plan.local_stages = plan.schedule.stages_of(plan.pp_rank);
  for (int st : plan.local_stages) {
    const StageLayout& s = plan.stages[static_cast<size_t>(st)];
    std::vector<size_t> ids;
    if (s.embedding) {
      ids.push_back(plan.units.size());
      plan.units.push_back(all_units.front());
    }
    for (int l = 0; l < s.layers; ++l) {
      ids.push_back(plan.units.size());
      plan.units.push_back(all_units[static_cast<size_t>(s.first_layer + l + 1)]);
    }
    if (s.head) {
      ids.push_back(plan.units.size());
      plan.units.push_back(all_units.back());
    }
    plan.stage_units.push_back(std::move(ids));
  }

  // FSDP / HSDP / DDP over the data-parallel dims.
  FsdpOptions& f = plan.fsdp;
  f.param_dtype =
      cuda && c.training.mixed_precision_param == "bfloat16" ? at::kBFloat16 : at::kFloat;
  f.reduce_dtype = c.training.mixed_precision_reduce == "bfloat16" ? at::kBFloat16 : at::kFloat;
  f.cpu_offload = c.training.enable_cpu_offload;
  f.accumulate_across_microbatches = plan.pp > 1;
  f.tensor_parallel = mesh.group("tp");
  const bool sharded = mesh.size("dp_shard_cp") > 1;
  const bool ac_on = plan.checkpointing.mode != CheckpointPolicy::Mode::None;
  const std::string& reshard = p.fsdp_reshard_after_forward;
  // Unsharded units keep compute-dtype copies of the weights for the whole run (the optimizer
  // rewrites them), so nothing is cast or gathered per step; with activation checkpointing on,
  // the user is short of memory, and "default" then frees them after use, as FSDP2 does.
  f.persistent_compute_weights = sharded || reshard == "never" || (reshard == "default" && !ac_on);
  for (const auto& u : plan.units) {
    bool after_forward = reshard == "always";
    if (reshard == "default" && plan.pp == 1 && (sharded || ac_on)) {
      // torchtitan: every unit but the last block reshards; the head is used right away by the
      // backward, so keeping it saves a gather. (Pipelines keep every unit gathered through
      // the step, as torchtitan does under PP: each microbatch needs them again.)
      const bool last_block = u.kind == model::UnitKind::Block && u.layer == args.n_layers - 1;
      after_forward = u.kind != model::UnitKind::Head && !last_block;
    }
    f.reshard_after_forward.push_back(after_forward);
  }
  // Float8 all-gather: the converted projections of every block travel in float8.
  auto& f8 = plan.float8;
  // The converted projections of every block unit, as element ranges of its flat buffer.
  auto set_float8_ranges = [&] {
    for (const auto& u : plan.units) {
      f.float8_ranges.push_back(u.kind == model::UnitKind::Block
                                    ? model::block_float8_ranges(u, f8.wqkv, f8.wo, f8.w13, f8.w2)
                                    : std::vector<model::ElementRange>{});
    }
  };
  if (!f8.enabled && c.float8.enable_fsdp_float8_all_gather) {
    log::warn(
        "quantize.linear.float8.enable_fsdp_float8_all_gather has no effect without float8 "
        "training (model.converters = [\"float8\"])");
  }
  if (f8.enabled && c.float8.enable_fsdp_float8_all_gather) {
    if (!sharded) {
      log::warn(
          "quantize.linear.float8.enable_fsdp_float8_all_gather has no effect without FSDP "
          "sharding (parallelism.data_parallel_shard_degree = 1): no weights are gathered");
    } else {
      set_float8_ranges();
      f.float8_precompute_scales = c.float8.precompute_float8_dynamic_scale_for_fsdp;
      f8.all_gather = f8.wqkv || f8.wo || f8.w13 || f8.w2;
      f8.precompute_scales = f8.all_gather && f.float8_precompute_scales;
      if (!f8.all_gather) f.float8_ranges.clear();
    }
  }
  // One rank holds whole units that it casts to the compute dtype at every use: the float8
  // matrices are cast from the masters instead (half the bytes of the bf16 cast, and each
  // matrix's amax once per step). Runs keeping bf16 copies of the weights cast those per use.
  const bool any_float8 = f8.wqkv || f8.wo || f8.w13 || f8.w2;
  if (f8.enabled && any_float8 && f8.recipe == ops::Float8Recipe::Tensorwise && !sharded &&
      !f.cpu_offload && !f.persistent_compute_weights) {
    set_float8_ranges();
    f8.from_master = true;
  }
  return plan;
}

void set_token_slices(Plan& plan, const std::vector<int64_t>& lengths) {
  const auto& old = plan.schedule;
  plan.schedule = pipeline::build_schedule(ScheduleKind::TeraPipe, old.pp, old.stages,
                                           old.microbatches / old.slices, lengths);
  pipeline::check_schedule(plan.schedule);
  plan.token_slices = lengths;
  plan.token_slices_auto = false;
  const auto sim = pipeline::simulate(plan.schedule, pipeline::ActionCosts{});
  plan.peak_in_flight = {sim.peak_in_flight[static_cast<size_t>(plan.pp_rank)]};
}

std::string Plan::describe() const {
  std::ostringstream out;
  if (cp > 1) {
    out << "context parallel: " << cp << " ranks, each holding "
        << (cp_load_balancer == "headtail" ? "2 chunks (head-tail)" : "1 contiguous chunk")
        << " of every sequence; ring attention, key/value "
        << (cp_rotate == "allgather" ? "all-gathered" : "passed around the ring (alltoall)")
        << "\n";
  }
  if (tp > 1) {
    out << "tensor parallel: " << tp << " ranks, sequence parallel between blocks, "
        << (loss_parallel ? "loss parallel" : "logits gathered for the loss")
        << (async_tp ? ", async TP (overlapped gather/matmul and matmul/reduce-scatter)" : "")
        << "\n";
  }
  if (pp == 1) {
    out << "pipeline: none (one stage); " << schedule.microbatches << " microbatch(es) of "
        << microbatch_size << " sequence(s) per step";
    return out.str();
  }
  const auto sim = pipeline::simulate(schedule, pipeline::ActionCosts{});
  out << "pipeline: " << pp << " ranks, " << stages.size() << " stages, schedule " << schedule.name
      << "; " << schedule.microbatches / schedule.slices << " microbatches of " << microbatch_size
      << " sequence(s) per pass";
  if (terapipe()) {
    out << (token_slices_auto
                ? ", token slices chosen after measuring slice times"
                : ", each cut into " + std::to_string(schedule.slices) + " token slices [" +
                      fmt::format("{}", fmt::join(token_slices, ", ")) + "]");
  }
  out << ", " << passes << " pass(es) per step; bubble " << fmt::format("{:.1f}", 100 * sim.bubble)
      << "% at equal forward/backward/weight costs (" << fmt::format("{:.1f}", 100 * sim.step_idle)
      << "% of the step with fill and drain)";
  out << "\npipeline rank " << pp_rank << " holds ";
  for (size_t i = 0; i < local_stages.size(); ++i) {
    out << (i ? "; " : "") << stages[static_cast<size_t>(local_stages[i])].describe();
  }
  return out.str();
}

MemoryEstimate estimate_memory(const model::LlamaArgs& args, const Plan& plan,
                               const std::vector<int64_t>& shard_numels, int64_t seq_len,
                               bool sharded) {
  MemoryEstimateInputs in;
  const auto& f = plan.fsdp;
  in.compute_dtype_bytes = static_cast<int64_t>(c10::elementSize(f.param_dtype));
  // A unit as gathered, in compute-dtype elements: the float8 all-gather's matrices take one
  // byte per element.
  auto gathered_numel = [&](size_t i) {
    int64_t float8 = 0;
    if (i < f.float8_ranges.size()) {
      for (const auto& r : f.float8_ranges[i]) float8 += r.numel;
    }
    return plan.units[i].numel - float8 +
           (float8 + in.compute_dtype_bytes - 1) / in.compute_dtype_bytes;
  };
  // Held at once while resharding: a unit and the next one (prefetched), in either direction.
  int64_t largest = 0, pair_gathered = 0, all_gathered = 0;
  for (size_t i = 0; i < plan.units.size(); ++i) {
    in.param_state_elements += shard_numels[i];
    largest = std::max(largest, plan.units[i].numel);
    const int64_t next = i + 1 < plan.units.size() ? gathered_numel(i + 1) : 0;
    pair_gathered = std::max(pair_gathered, gathered_numel(i) + next);
    all_gathered += gathered_numel(i);
  }
  in.state_on_host = f.cpu_offload;
  // Shards keep compute-dtype copies on the device where that differs from the fp32 master.
  const bool shadows =
      (f.param_dtype != at::kFloat || f.cpu_offload) && (sharded || f.persistent_compute_weights);
  if (shadows) in.resident_weight_elements = in.param_state_elements;
  if (sharded || !f.persistent_compute_weights) {
    // Gathered units held at once: two neighbours while resharding, all of them in a pipeline.
    // Units that skip the reshard after forward (fsdp_reshard_after_forward = "never") all
    // stay gathered until their backward.
    const bool none_reshards = std::none_of(
        f.reshard_after_forward.begin(), f.reshard_after_forward.end(), [](bool b) { return b; });
    in.resident_weight_elements += plan.pp > 1 || none_reshards ? all_gathered : pair_gathered;
  }
  in.gradient_buffer_elements = 2 * largest;
  in.microbatch_tokens = plan.microbatch_size * seq_len / plan.cp;
  in.tp = plan.tp;
  in.float8 = plan.float8.saved_inputs();
  // Saved activations: the stages' blocks, times the microbatches alive at once per stage.
  for (int st : plan.local_stages) {
    const auto& s = plan.stages[static_cast<size_t>(st)];
    for (int l = 0; l < s.layers; ++l) {
      in.block_policies.push_back(plan.checkpointing.for_layer(s.first_layer + l));
    }
  }
  // TeraPipe holds slices: a sequence's worth of activations per `slices` of them.
  const int slices = plan.schedule.slices;
  const int peak =
      plan.peak_in_flight.empty() ? 1 : (plan.peak_in_flight.front() + slices - 1) / slices;
  in.microbatches_in_flight =
      plan.pp == 1
          ? 1
          : std::max<int64_t>(1, (peak + static_cast<int64_t>(plan.local_stages.size()) - 1) /
                                     static_cast<int64_t>(plan.local_stages.size()));
  in.holds_head = false;
  for (int st : plan.local_stages) in.holds_head = in.holds_head || plan.stages[size_t(st)].head;
  if (plan.pp > 1) {
    // Pipelines accumulate each unit's full fp32 gradient over the step.
    in.gradient_buffer_elements = largest;
    for (const auto& u : plan.units) in.gradient_buffer_elements += u.numel;
  }
  MemoryEstimate e = titan::parallel::estimate_memory(args, in);
  if (plan.terapipe()) {
    // Each sequence in flight keeps its keys/values (compute dtype) and their fp32 gradient
    // accumulators per block until its first slice's backward.
    const int64_t sequences = plan.schedule.microbatches / plan.schedule.slices;
    const int64_t per_token =
        (args.n_kv_heads / plan.tp) * args.head_dim() * (2 * in.compute_dtype_bytes + 2 * 4);
    e.activation_bytes += static_cast<int64_t>(in.block_policies.size()) * sequences *
                          plan.microbatch_size * seq_len * per_token;
  }
  return e;
}

}  // namespace titan::parallel
