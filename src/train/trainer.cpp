// The training loop, top to bottom.
#include "titan/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#ifdef TITAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>

#include <fmt/ranges.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "titan/checkpoint/hf.h"
#include "titan/data/dataset.h"
#include "titan/metrics/profiler.h"
#include "titan/model/layout.h"
#include "titan/ops/attention.h"
#include "titan/ops/dispatch.h"
#include "titan/ops/rope.h"
#include "titan/parallel/memory_estimate.h"
#include "titan/parallel/pipeline/terapipe.h"
#include "titan/util/crc32c.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"
#include "titan/util/version.h"

namespace titan::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// This rank's GPU: its local rank (torchrun's LOCAL_RANK, Slurm's SLURM_LOCALID) among the
// visible GPUs; a task that sees one GPU (Slurm's --gpus-per-task binding) takes that one.
c10::Device pick_device(int local_rank) {
  if (const char* force = std::getenv("TITAN_DEVICE"); force && std::string(force) == "cpu") {
    return c10::Device(c10::kCPU);
  }
  if (cuda_device_count() > 0) {
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank % cuda_device_count()));
  }
  return c10::Device(c10::kCPU);
}

// model.print_after_conversion: this rank's parameters as the converters left them, one line
// per unit (consecutive blocks alike collapsed into one), each projection (a matrix other than
// the embedding) with the arithmetic its GEMMs run in: float8 where the plan's float8 ranges
// (the ones FSDP and the optimizer use) cover it.
std::string describe_converted_model(const std::vector<model::UnitLayout>& units,
                                     const parallel::Float8Plan& f8, at::ScalarType compute) {
  const std::string plain = compute == at::kBFloat16 ? "bf16" : "fp32";
  const std::string eight = fmt::format("float8 {}{}", ops::float8_recipe_name(f8.recipe),
                                        f8.emulate ? " (emulated)" : "");
  struct Line {
    std::string name, text;
    int64_t first_layer = -1, last_layer = -1;
  };
  std::vector<Line> lines;
  for (const auto& u : units) {
    const std::vector<model::ElementRange> converted =
        f8.enabled && u.kind == model::UnitKind::Block
            ? model::block_float8_ranges(u, f8.wqkv, f8.wo, f8.w13, f8.w2)
            : std::vector<model::ElementRange>{};
    std::vector<std::string> params;
    for (const auto& p : u.params) {
      std::string arithmetic;
      if (u.kind != model::UnitKind::Embedding && p.shape.size() == 2) {
        const bool in_float8 = std::any_of(converted.begin(), converted.end(), [&](const auto& r) {
          return p.offset >= r.offset && p.offset < r.offset + r.numel;
        });
        arithmetic = " " + (in_float8 ? eight : plain);
      }
      const bool prefixed = u.kind == model::UnitKind::Block && p.name.rfind(u.name + ".", 0) == 0;
      std::vector<std::string> dims;
      for (int64_t d : p.shape) dims.push_back(std::to_string(d));
      params.push_back(fmt::format("{} [{}]{}",
                                   prefixed ? p.name.substr(u.name.size() + 1) : p.name,
                                   util::join(dims, ", "), arithmetic));
    }
    std::string text = util::join(params, " | ");
    if (u.kind == model::UnitKind::Block && !lines.empty() && lines.back().last_layer >= 0 &&
        lines.back().text == text) {
      lines.back().last_layer = u.layer;
    } else {
      lines.push_back({u.name, std::move(text), u.kind == model::UnitKind::Block ? u.layer : -1,
                       u.kind == model::UnitKind::Block ? u.layer : -1});
    }
  }
  std::string out =
      "model after conversion (model.print_after_conversion; this rank's parameters):";
  for (const auto& l : lines) {
    const std::string name = l.last_layer > l.first_layer
                                 ? fmt::format("layers.{}-{}", l.first_layer, l.last_layer)
                                 : l.name;
    out += fmt::format("\n  {}: {}", name, l.text);
  }
  return out;
}

}  // namespace

Trainer::Trainer(config::JobConfig config) : cfg_(std::move(config)) {
  const auto& c = cfg_;
  if (c.debug.deterministic) {
    at::globalContext().setDeterministicAlgorithms(true, c.debug.deterministic_warn_only);
  }

  // Launch, device, and the mesh with its communicators.
  const auto env = dist::read_launch_env();
  // One run per dump folder: a second one would replace this one's checkpoints and interleave
  // its metrics. Rank 0 holds the lock (the kernel drops it when the process ends).
  if (env.rank == 0 && !c.memory_estimation.enable) {
    dump_lock_ = std::make_unique<util::FolderLock>(c.job.dump_folder, "job.dump_folder");
  }
  const c10::Device device = pick_device(env.local_rank);
#ifdef TITAN_WITH_CUDA
  // This rank's GPU is the current device of the thread that builds and trains the model:
  // start-up work (attention probe, memory_budget and TeraPipe timings) launches kernels before
  // the training loop's stream guard exists.
  if (device.is_cuda()) c10::cuda::set_device(device.index());
#endif
  device_ = describe_device(device);
  // Slurm's per-task GPU binding (--gpus-per-task=1, --gpu-bind) shows each task only its own
  // GPU: one visible device there is not several ranks sharing one.
  const bool bound_by_slurm = env.source == "slurm" && cuda_device_count() == 1 &&
                              (std::getenv("SLURM_GPUS_PER_TASK") || std::getenv("SLURM_GPU_BIND"));
  if (device.is_cuda() && env.world_size > 1 && !bound_by_slurm) {
    TITAN_CHECK(env.local_world_size <= cuda_device_count(), "LOCAL_WORLD_SIZE ",
                env.local_world_size, " exceeds the ", cuda_device_count(),
                " visible GPUs on this node");
  }
  runtime_ = std::make_unique<dist::Runtime>(env, cfg_, device);
  const auto& mesh = runtime_->mesh();
  if (!c.debug.seed) {
    // Unseeded, as torchtitan's debug.seed = None: one seed for every rank (the weights must
    // agree), drawn on rank 0 and logged so that the run can be repeated.
    const std::string drawn =
        runtime_->share_from_rank0("seed", std::to_string(std::random_device{}() & 0x7fffffff));
    cfg_.debug.seed = std::stoll(drawn);
    log::info("debug.seed = None: drew seed {} (debug.seed = {} repeats this run)", drawn, drawn);
  }
  at::manual_seed(static_cast<uint64_t>(*c.debug.seed));
  log::info("launch: {} | {}", env.source, mesh.describe());
  ops::set_fused_kernels(c.training.fused_kernels);
  const bool cuda = device.is_cuda();
  if (c.compile.enable) {
    log::info(
        "compile.enable: not applicable to titan (ahead-of-time compiled, fused kernels "
        "built in); ignored");
  }
  log::info("device: {}{}", device_.name,
            cuda ? fmt::format(" (cuda:{}), {:.1f} GiB", device.index(),
                               device_.total_memory_bytes / 1073741824.0)
                 : fmt::format(", {:.1f} GiB of memory ({})",
                               device_.total_memory_bytes / 1073741824.0, host_memory().bound()));

  // Model arguments and data.
  args_ = model::llama_flavor(c.model.flavor);
  if (!c.model.rope_scaling) args_.rope_scaling_factor = 0;
  tokenizer_ = data::build_tokenizer(c.model.tokenizer_path, c.model.hf_assets_path);
  log::info("tokenizer: {}", tokenizer_->describe());
  if (!c.model.tokenizer_path.empty() &&
      std::filesystem::path(data::tokenizer_file(c.model.tokenizer_path, "")).extension() !=
          ".json" &&
      tokenizer_->vocab_size() > args_.vocab_size) {
    // model.tokenizer_path with a tiktoken file is torchtitan v0.1.0's job (v0.2 ignores the
    // key), and v0.1.0 sizes the vocabulary from that tokenizer's ids. Only grown: a smaller
    // tokenizer keeps the flavor's vocabulary (and the checkpoints saved with it).
    log::info(
        "model: vocab {} -> {}, the ids of the tiktoken file in model.tokenizer_path (as "
        "torchtitan v0.1.0 sizes the vocabulary)",
        args_.vocab_size, tokenizer_->vocab_size());
    args_.vocab_size = tokenizer_->vocab_size();
  }
  // Interrupted saves are finished or undone before any rank looks for its checkpoint (not by
  // a memory estimate: it holds no lock on the dump folder, so a run may be saving there).
  if (!c.memory_estimation.enable) checkpoint::Checkpointer::repair_folder(cfg_, *runtime_);
  // A run computes the model its weights were trained as: the checkpoint it starts from (or
  // the HF folder's config.json) decides RoPE and the norm epsilon.
  if (const std::string start = checkpoint::Checkpointer::start_dir(cfg_); !start.empty()) {
    try {
      checkpoint::adopt_checkpoint_model_args(start, args_, c.model.flavor);
    } catch (const Error& e) {
      // Resuming the newest checkpoint (not an explicit step): name the others.
      if (c.checkpoint.load_step >= 0 || !c.checkpoint.enable) throw;
      fail(e.what(), checkpoint::Checkpointer::older_steps_note(start));
    }
  } else if (const std::string hf = checkpoint::Checkpointer::hf_initial_folder(cfg_);
             !hf.empty()) {
    checkpoint::adopt_hf_config(hf, args_);
  }
  log::info(
      "model: llama3 {} | {} parameters | dim {} layers {} heads {} kv_heads {} ffn {} "
      "vocab {} | RoPE {}",
      c.model.flavor, util::with_commas(args_.total_params()), args_.dim, args_.n_layers,
      args_.n_heads, args_.n_kv_heads, args_.ffn_hidden_dim(), args_.vocab_size,
      model::describe_rope(args_));

  // The plan: pipeline stages and schedule, microbatching, checkpointing, FSDP units.
  plan_ = parallel::build_plan(args_, mesh, cfg_, cuda);
  for (const auto& line : util::split(plan_.describe(), '\n')) log::info("{}", line);
  if (plan_.pp > 1 && plan_.schedule.microbatches < plan_.pp) {
    log::warn(
        "pipeline: {} microbatches for {} pipeline ranks leave ranks idle most of the step (see "
        "the bubble above); more microbatches (a larger training.local_batch_size or a smaller "
        "pipeline_parallel_microbatch_size) fill the pipeline",
        plan_.schedule.microbatches, plan_.pp);
  }
  dp_size_ = mesh.size("dp");
  dp_rank_ = mesh.group_rank("dp");
  accumulation_ = plan_.pp == 1 ? plan_.schedule.microbatches : plan_.passes;
  loader_ = make_loader("training", c.training.dataset, c.training.dataset_path,
                        c.training.local_batch_size, c.training.seq_len, /*infinite=*/true, cuda);
  log::info("dataset: {}", loader_->describe());
  if (c.validation.enable) {
    // The validation data is read at every validation: checked now (it opens and holds a
    // batch), not after validation.freq steps of training.
    validation_microbatch_size();
    auto validation =
        make_loader("validation", c.validation.dataset, c.validation.dataset_path,
                    c.validation.local_batch_size, c.validation.seq_len, /*infinite=*/false, false);
    check_validation_batches(*validation, validation->next().defined() ? 1 : 0);
  }

  // This rank's units: layouts only (no memory) until the data-parallel owner materializes its
  // shards.
  if (!cuda && c.training.mixed_precision_param == "bfloat16") {
    log::info("CPU run: computing in float32 (training.mixed_precision_param applies on GPU)");
  }
  const auto t_init = Clock::now();
  // FSDP shards over dp_shard x cp (context-parallel ranks hold the same weights, as torchtitan).
  fsdp_ = std::make_unique<parallel::FsdpModel>(plan_.units, mesh.group("dp_shard_cp"),
                                                mesh.group("dp_replicate"), device, plan_.fsdp);
  report_memory_estimate();
  if (c.memory_estimation.enable) {
    estimate_only_ = true;  // nothing allocated; train() returns at once
    return;
  }
  fsdp_->init_weights(*c.debug.seed);
  health_ = at::zeros({2}, at::TensorOptions().dtype(at::kLong).device(device));
  {
    // fp32 parameters + gradients + two AdamW moments, as held by this rank.
    int64_t elements = 0;
    for (size_t i = 0; i < fsdp_->num_units(); ++i) elements += fsdp_->unit(i).shard_numel;
    const double mib = elements / double(1 << 20);
    log::info(
        "parameter state: {:.2f} MiB per rank: fp32 weights {:.2f} + gradients {:.2f} + AdamW "
        "moments {:.2f} MiB ({} of {} elements; FSDP over {} rank(s), tp {}, pp {})",
        16 * mib, 4 * mib, 4 * mib, 8 * mib, util::with_commas(elements),
        util::with_commas(args_.total_params()), fsdp_->dp_shard_size(), plan_.tp, plan_.pp);
  }
  log::info("initialized weights in {:.2f}s (seed {})", seconds_since(t_init), *c.debug.seed);

  // Stages and the executor of the schedule.
  ropes_ = std::make_unique<parallel::pipeline::RopeCache>(args_);
  parallel::pipeline::StageOptions sopts;
  sopts.keep_weights_through_step = plan_.pp > 1;
  sopts.compute_dtype = plan_.fsdp.param_dtype;
  if (plan_.tp > 1) {
    parallel::TensorParallelOptions topts;
    topts.async = plan_.async_tp;
    topts.loss_parallel = plan_.loss_parallel;
    tp_ = std::make_unique<parallel::TensorParallel>(mesh.group("tp"), topts);
    sopts.tp = tp_.get();
  }
  if (plan_.cp > 1) {
    cp_ = std::make_unique<parallel::ContextParallel>(mesh.group("cp"), plan_.cp_rotate,
                                                      plan_.cp_load_balancer);
    sopts.cp = cp_.get();
  }
  if (plan_.float8.enabled) {
#ifdef TITAN_WITH_CUDA
    if (cuda && !plan_.float8.emulate) {
      const auto* prop = at::cuda::getCurrentDeviceProperties();
      TITAN_CHECK(prop->major * 10 + prop->minor >= 89,
                  "model.converters = [\"float8\"]: ", prop->name, " (compute capability ",
                  prop->major, ".", prop->minor,
                  ") has no float8 tensor cores (8.9 or newer needed); set "
                  "quantize.linear.float8.emulate = true to test the numerics");
    }
#endif
    float8_ = std::make_unique<ops::Float8Linear>(plan_.float8.recipe, plan_.float8.emulate);
    if (tp_) tp_->enable_float8(plan_.float8.emulate);
    sopts.float8_column = tp_ ? &tp_->float8_column() : float8_.get();
    sopts.float8_row = tp_ ? &tp_->float8_row() : float8_.get();
    sopts.float8_wqkv = plan_.float8.wqkv;
    sopts.float8_wo = plan_.float8.wo;
    sopts.float8_w13 = plan_.float8.w13;
    sopts.float8_w2 = plan_.float8.w2;
    log::info("float8: {}", plan_.float8.describe());
  }
  if (plan_.checkpointing.mode == parallel::CheckpointPolicy::Mode::Budget && cuda) {
    // Recompute costs measured here replace the FLOP/byte model (CPU keeps the model: its
    // timings are too noisy to make the same choice twice).
    measure_checkpoint_costs(parallel::pipeline::block_plan(args_, sopts));
    report_memory_estimate();
  }
  if (plan_.token_slices_auto) choose_token_slices(parallel::pipeline::block_plan(args_, sopts));
  sopts.token_slices = plan_.token_slices;
  std::map<int, parallel::pipeline::Stage*> by_index;
  for (size_t i = 0; i < plan_.local_stages.size(); ++i) {
    const auto& layout = plan_.stages[static_cast<size_t>(plan_.local_stages[i])];
    std::vector<model::SavePolicy> policies;
    for (int l = 0; l < layout.layers; ++l) {
      policies.push_back(plan_.checkpointing.for_layer(layout.first_layer + l));
    }
    stages_.push_back(std::make_unique<parallel::pipeline::Stage>(
        layout, plan_.stage_units[i], args_, *fsdp_, *ropes_, std::move(policies), sopts));
    by_index[layout.index] = stages_.back().get();
  }
  parallel::pipeline::LinkFn links = [&mesh](int pp_rank, bool send) {
    auto [comm, peer] = mesh.pp_link(pp_rank, send);
    return parallel::pipeline::PipeLink{comm, peer};
  };
  executor_ = std::make_unique<parallel::pipeline::Executor>(
      plan_.schedule, plan_.pp_rank, std::move(by_index), std::move(links), args_.dim,
      plan_.fsdp.param_dtype, plan_.tp * plan_.cp, cp_.get());
  log::info("activation checkpointing: {}", plan_.checkpointing.describe());
  if (c.model.print_after_conversion) {
    std::vector<model::UnitLayout> layouts;
    for (size_t i = 0; i < fsdp_->num_units(); ++i) layouts.push_back(fsdp_->unit(i).layout);
    log::info("{}", describe_converted_model(layouts, plan_.float8, plan_.fsdp.param_dtype));
  }

  OptimizerOptions oopts;
  oopts.name = c.optimizer.name;
  oopts.implementation = c.optimizer.implementation;
  oopts.beta1 = c.optimizer.beta1;
  oopts.beta2 = c.optimizer.beta2;
  oopts.eps = c.optimizer.eps;
  oopts.weight_decay = c.optimizer.weight_decay;
  optimizer_ = std::make_unique<Optimizer>(fsdp_->master_shards(), fsdp_->grad_shards(), oopts,
                                           fsdp_->shadows());
  // Float8 weights: the fused AdamW takes each matrix's amax as it writes the new weights, so
  // the next scales need no pass over them.
  for (size_t i = 0; i < fsdp_->num_units(); ++i) {
    std::vector<AmaxRange> ranges;
    for (const auto& piece : fsdp_->float8_pieces(i)) {
      ranges.push_back({piece.offset, piece.numel, piece.matrix});
    }
    if (!ranges.empty() &&
        optimizer_->take_amax(i, std::move(ranges), fsdp_->stepped_float8_amax(i))) {
      amax_from_optimizer_.push_back(i);
    }
  }
  if (c.optimizer.early_step_in_backward) {
    fsdp_->set_on_grad_final(
        [this](size_t unit, const dist::WorkPtr& work) { step_unit_early(unit, work); });
    log::info(
        "optimizer.early_step_in_backward: each unit steps as soon as its gradient is final{}",
        fsdp_->device().is_cuda() ? ", on a side stream beside the rest of the backward" : "");
  }
  scheduler_ = std::make_unique<LrScheduler>(c.optimizer.lr, c.lr_scheduler.warmup_steps,
                                             c.lr_scheduler.total_steps.value_or(c.training.steps),
                                             c.lr_scheduler.decay_ratio, c.lr_scheduler.decay_type,
                                             c.lr_scheduler.min_lr_factor);
  flops_per_token_ = args_.training_flops_per_token(c.training.seq_len);

  // Checkpoints: resume from the newest complete one, or start from initial_load_path.
  checkpoint::TrainerState cstate;
  cstate.model = fsdp_.get();
  cstate.optimizer = optimizer_.get();
  cstate.loader = loader_.get();
  cstate.args = args_;
  cstate.flavor = c.model.flavor;
  cstate.data_identity = data_identity();
  checkpointer_ = std::make_unique<checkpoint::Checkpointer>(cfg_, *runtime_, cstate);
  if (!c.checkpoint.enable && env.rank == 0) {
    const auto existing = checkpoint::Checkpointer::complete_steps(checkpointer_->folder());
    if (!existing.empty()) {
      log::warn(
          "checkpoint: {} holds {} checkpoint(s) (newest: step {}) that this run does NOT use: "
          "checkpoint.enable is false, so training starts from step 1. Set "
          "checkpoint.enable = true to resume, or use another job.dump_folder. (They are "
          "left untouched.)",
          checkpointer_->folder(), existing.size(), existing.back().first);
    }
  }
  step_ = checkpointer_->load_at_start();
  lr_offset_steps_ = checkpointer_->lr_offset_steps();
  health_base_ = step_;
  if (step_ > 0) log::info("resuming after step {}", step_);

  metrics::MetricsOptions mopts;
  mopts.dump_folder = c.job.dump_folder;
  mopts.enable_tensorboard = c.metrics.enable_tensorboard;
  mopts.tb_folder = c.metrics.save_tb_folder;
  mopts.color = log::colors_wanted(c.metrics.disable_color_printing);
  mopts.rank = env.rank;
  mopts.start_step = step_;
  mopts.write_files = env.rank == 0 || c.metrics.save_for_all_ranks;
  mopts.enable_tensorboard = mopts.enable_tensorboard && mopts.write_files;
  metrics_ = std::make_unique<metrics::MetricsLogger>(mopts);
  log::info(
      "training: {} steps, local batch {}, seq_len {}, global batch {} ({} batch(es) of the "
      "loader per step), peak lr {}, warmup {}",
      c.training.steps, c.training.local_batch_size, c.training.seq_len,
      c.training.local_batch_size * accumulation_ * dp_size_, accumulation_, c.optimizer.lr,
      scheduler_->warmup_steps());
}

Trainer::~Trainer() = default;

std::string Trainer::data_identity() const {
  const auto& c = cfg_;
  nlohmann::json tok;
  tok["kind"] = tokenizer_->describe();
  tok["vocab_size"] = tokenizer_->vocab_size();
  const std::string file = data::tokenizer_file(c.model.tokenizer_path, c.model.hf_assets_path);
  if (!file.empty()) {
    std::ifstream in(file, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    const std::string bytes = buf.str();
    tok["file_crc32c"] = util::crc32c(bytes.data(), bytes.size());
  }
  // The dataset by name and by its files' sizes (relative names: moving it keeps it the same).
  nlohmann::json ds;
  ds["name"] = c.training.dataset;
  if (!c.training.dataset_path.empty()) {
    std::vector<std::pair<std::string, int64_t>> files;
    const std::string& root = c.training.dataset_path;
    std::function<void(const std::string&)> walk = [&](const std::string& rel) {
      const std::string path = rel.empty() ? root : util::join_path(root, rel);
      if (!util::is_directory(path)) {
        files.emplace_back(rel.empty() ? std::filesystem::path(root).filename().string() : rel,
                           util::file_size(path));
        return;
      }
      for (const auto& name : util::list_directory(path)) {
        walk(rel.empty() ? name : util::join_path(rel, name));
      }
    };
    walk("");
    ds["files"] = files;
  }
  return nlohmann::json{{"tokenizer", tok}, {"dataset", ds}}.dump();
}

void Trainer::check_health() {
  const at::Tensor h = health_.to(at::kCPU);
  const int64_t first = h[0].item<int64_t>();
  if (first == 0) return;
  const int64_t step = health_base_ + first;
  const auto saved = checkpoint::Checkpointer::complete_steps(checkpointer_->folder());
  fail(
      "training diverged: the loss or gradient norm became non-finite (NaN/Inf) at step ", step,
      "; nothing from that step on was saved",
      saved.empty() ? std::string() : " (newest checkpoint: " + saved.back().second + ")",
      ". Try a lower optimizer.lr, a smaller training.max_norm, or more lr_scheduler.warmup_steps");
}

void Trainer::measure_checkpoint_costs(const model::BlockPlan& bp) {
  const auto t0 = std::chrono::steady_clock::now();
  const c10::Device device = fsdp_->device();
  const auto opts = at::TensorOptions().device(device);
  const at::ScalarType dtype = plan_.fsdp.param_dtype;
  const auto block = model::llama_units(args_, {plan_.tp, runtime_->mesh().coordinate("tp")}).at(1);
  const model::ScratchBlock scratch = model::scratch_block(block, dtype, device);
  const auto& w = scratch.w;
  const auto& g = scratch.g;
  // This rank's tokens of one microbatch (context parallel: its share of the sequence, timed
  // with local attention).
  const int64_t seq = cfg_.training.seq_len / plan_.cp;
  auto [cos, sin] = ops::rope_tables(args_, seq, opts.dtype(at::kFloat));
  const model::Rope rope{cos, sin};
  const at::Tensor x =
      at::randn({plan_.microbatch_size, seq / bp.seq_shards, args_.dim}, opts.dtype(dtype));
  const at::Tensor dy = at::randn_like(x);
  // Seconds of one forward (+ backward) under `policy`: the best of three after a warm-up.
  auto time = [&](model::SavePolicy policy, bool backward) {
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < 4; ++rep) {
      synchronize(device);
      const auto start = std::chrono::steady_clock::now();
      model::BlockSaved saved;
      model::block_forward(args_, bp, w, rope, x, policy, saved);
      if (backward) model::block_backward(args_, bp, w, rope, dy, saved, g, true);
      synchronize(device);
      if (rep > 0) best = std::min(best, seconds_since(start));
    }
    return best;
  };
  at::Tensor secs =
      at::tensor({time(model::SavePolicy::All, false), time(model::SavePolicy::All, true),
                  time(model::SavePolicy::Matmuls, true), time(model::SavePolicy::Attention, true),
                  time(model::SavePolicy::InputOnly, true)},
                 at::kDouble)
          .to(at::kFloat);
  // The world's average, identical on every rank, so all choose the same policies (tensor
  // parallel ranks must: recomputation issues their collectives).
  if (auto* world = runtime_->world()) {
    at::Tensor d = secs.to(device);
    world->all_reduce(d, dist::ReduceOp::Avg);
    secs = d.cpu();
  }
  const auto t = secs.to(at::kDouble);
  const double* v = t.data_ptr<double>();
  plan_.checkpointing.set_measured_costs(v[2] - v[1], v[3] - v[1], v[4] - v[1], v[0]);
  log::info(
      "memory_budget: one block on this device in {:.1f}s: forward {:.2f} ms; forward + backward "
      "keeping everything {:.2f} ms, recomputing norms/RoPE/SwiGLU {:.2f} ms, those and w1|w3 "
      "{:.2f} ms, the block {:.2f} ms",
      seconds_since(t0), 1e3 * v[0], 1e3 * v[1], 1e3 * v[2], 1e3 * v[3], 1e3 * v[4]);
}

void Trainer::choose_token_slices(const model::BlockPlan& bp) {
  namespace pl = parallel::pipeline;
  const auto& c = cfg_;
  const auto& mesh = runtime_->mesh();
  const c10::Device device = fsdp_->device();
  const int64_t seq_len = c.training.seq_len;
  const int64_t quantum = pl::token_slice_quantum(seq_len, plan_.tp);
  const model::SavePolicy policy = plan_.checkpointing.for_layer(0);
  const at::ScalarType dtype = plan_.fsdp.param_dtype;
  // The cache key: everything the slice times depend on.
  const std::string key = fmt::format(
      "titan {} | {} | dim {} heads {} kv {} ffn {} | microbatch {} seq {} tp {} | {} | policy {}",
      titan_version(), describe_device(device).name, args_.dim, args_.n_heads, args_.n_kv_heads,
      args_.ffn_hidden_dim(), plan_.microbatch_size, seq_len, plan_.tp, c10::toString(dtype),
      static_cast<int>(policy));
  std::string cache;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    cache = std::string(xdg) + "/titan/terapipe";
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    cache = std::string(home) + "/.cache/titan/terapipe";
  }
  const uint32_t digest = util::crc32c(key.data(), key.size());
  const std::string cache_file = cache.empty() ? "" : fmt::format("{}/{:08x}.txt", cache, digest);
  // Coefficients: the cached ones when every rank has them (rank 0's win), else measured on
  // every rank and averaged.
  at::Tensor coef = at::zeros({3}, at::kFloat);
  at::Tensor missing = at::ones({1}, at::kLong);  // 1 where this rank has no cached model
  if (!cache_file.empty()) {
    std::ifstream in(cache_file);
    std::string line;
    double a = 0, b = 0, g = 0;
    if (std::getline(in, line) && line == key && (in >> a >> b >> g) && a >= 0 && b >= 0 &&
        g >= 0) {
      coef = at::tensor({a, b, g}, at::kFloat);
      missing.zero_();
    }
  }
  auto* world = runtime_->world();
  auto reduce = [&](at::Tensor& t, dist::ReduceOp op) {
    if (!world) return;
    at::Tensor d = t.to(device).contiguous();
    world->all_reduce(d, op);
    t = d.cpu();
  };
  reduce(missing, dist::ReduceOp::Max);
  std::string source;
  if (missing.item<int64_t>() == 0) {
    if (world && runtime_->env().rank != 0) coef.zero_();
    reduce(coef, dist::ReduceOp::Sum);
    source = "cached in " + cache_file;
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    const auto block = model::llama_units(args_, {plan_.tp, mesh.coordinate("tp")}).at(1);
    const auto samples = pl::measure_slice_times(args_, bp, block, plan_.microbatch_size, seq_len,
                                                 quantum, policy, dtype, device);
    at::Tensor secs = at::empty({static_cast<int64_t>(samples.size())}, at::kFloat);
    std::vector<int64_t> lens, prefixes;
    for (size_t i = 0; i < samples.size(); ++i) {
      secs[static_cast<int64_t>(i)] = samples[i].seconds;
      lens.push_back(samples[i].len);
      prefixes.push_back(samples[i].prefix);
    }
    reduce(secs, dist::ReduceOp::Avg);
    const at::Tensor secs64 = secs.to(at::kDouble);
    std::vector<double> seconds(secs64.data_ptr<double>(),
                                secs64.data_ptr<double>() + secs64.numel());
    const auto fit = pl::SliceCostModel::fit(lens, prefixes, seconds);
    coef = at::tensor({fit.fixed_s, fit.per_token_s, fit.per_pair_s}, at::kDouble).to(at::kFloat);
    // Every rank takes rank 0's fit (identical up to rounding), so all choose the same slices.
    if (world && runtime_->env().rank != 0) coef.zero_();
    reduce(coef, dist::ReduceOp::Sum);
    source = fmt::format("measured: {} timed slices of one block in {:.1f}s", samples.size(),
                         seconds_since(t0));
    if (!cache_file.empty()) {
      try {
        std::filesystem::create_directories(cache);
        util::write_file_atomically(
            cache_file, fmt::format("{}\n{:.9g} {:.9g} {:.9g}\n", key, coef[0].item<double>(),
                                    coef[1].item<double>(), coef[2].item<double>()));
      } catch (const std::exception& e) {
        log::warn("TeraPipe: could not cache the slice times in {}: {}", cache_file, e.what());
      }
    }
  }
  pl::SliceCostModel model;
  model.fixed_s = coef[0].item<double>();
  model.per_token_s = coef[1].item<double>();
  model.per_pair_s = coef[2].item<double>();
  const int stages = static_cast<int>(plan_.stages.size());
  const int microbatches = plan_.schedule.microbatches / plan_.schedule.slices;
  auto cost = [&](int64_t len, int64_t prefix) { return model.time_s(len, prefix); };
  const auto best = pl::optimal_token_slices(seq_len, quantum, stages, microbatches, cost);
  const auto whole = pl::evaluate_slicing({seq_len}, stages, microbatches, cost);
  int layers = 0;
  for (const auto& st : plan_.stages) layers = std::max(layers, st.layers);
  log::info("TeraPipe: slice time per block {} ({})", model.describe(), source);
  log::info(
      "TeraPipe: token slices [{}] ({} per sequence); predicted {:.1f} ms per pass for {} "
      "block(s) per stage: {} x {:.1f} ms + {} x {:.1f} ms largest slice (whole sequences: "
      "{:.1f} ms)",
      fmt::join(best.lengths, ", "), best.lengths.size(), 1e3 * layers * best.step_s, layers,
      microbatches, 1e3 * layers * best.sum_s, stages - 1, 1e3 * layers * best.max_s,
      1e3 * layers * whole.step_s);
  parallel::set_token_slices(plan_, best.lengths);
}

void Trainer::report_memory_estimate() {
  const auto& c = cfg_;
  std::vector<int64_t> shards;
  for (size_t i = 0; i < fsdp_->num_units(); ++i) shards.push_back(fsdp_->unit(i).shard_numel);
  const auto est = parallel::estimate_memory(args_, plan_, shards, c.training.seq_len,
                                             fsdp_->dp_shard_size() > 1);
  log::info("memory estimate: {}", est.describe());
  OomContext oom;
  oom.cpu_offload = c.training.enable_cpu_offload;
  const HostMemory& host = host_memory();
  const int local_ranks = std::max(1, runtime_->env().local_world_size);
  oom.host = fmt::format("{:.1f} GiB ({}), {} rank(s) on this host", host.bytes() / 1073741824.0,
                         host.bound(), local_ranks);
  if (device_.device.is_cuda()) {
    oom.device = fmt::format("cuda:{} ({}, {:.1f} GiB)", device_.device.index(), device_.name,
                             device_.total_memory_bytes / 1073741824.0);
    oom.estimate = est.describe();
    if (c.profiling.enable_memory_snapshot) {
      oom.snapshot_path =
          (std::filesystem::path(c.job.dump_folder) / c.profiling.save_memory_snapshot_folder /
           ("rank" + std::to_string(runtime_->env().rank) + "_oom_snapshot.pickle"))
              .string();
    }
    set_oom_context(oom);
    if (est.total_bytes() > device_.total_memory_bytes) {
      log::warn(
          "memory: this plan needs about {:.1f} GiB per GPU but {} has {:.1f} GiB; expect an "
          "out-of-memory error. To fit: shard over more GPUs "
          "(parallelism.data_parallel_shard_degree), checkpoint activations "
          "(activation_checkpoint.mode = \"full\"), lower training.local_batch_size or "
          "training.seq_len, or training.enable_cpu_offload = true",
          est.total_bytes() / 1073741824.0, oom.device, device_.total_memory_bytes / 1073741824.0);
    }
  } else {
    oom.estimate = est.describe();
    set_oom_context(oom);
    // A CPU run shares the host's memory (and its control group's limit) with the other local
    // ranks; an address-space limit is each process's own.
    const double need = static_cast<double>(est.total_bytes());
    const bool shared_short = need * local_ranks > static_cast<double>(host.shared_bytes);
    const bool process_short =
        host.process_bytes > 0 && need > static_cast<double>(host.process_bytes);
    if (shared_short || process_short) {
      log::warn(
          "memory: this plan needs about {:.1f} GiB per rank ({} on this host) but {}; expect "
          "it to fail, swap or be killed. A smaller model.flavor, training.local_batch_size or "
          "training.seq_len fits",
          need / 1073741824.0, local_ranks,
          process_short ? fmt::format("this process may use {:.1f} GiB (ulimit -v)",
                                      host.process_bytes / 1073741824.0)
                        : fmt::format("the ranks here share {:.1f} GiB ({})",
                                      host.shared_bytes / 1073741824.0, host.shared_bound));
    }
  }
}

// A captured step: static device buffers for the tokens, and the outputs it leaves.
struct Trainer::StepGraph {
#ifdef TITAN_WITH_CUDA
  at::cuda::CUDAGraph graph;
  at::cuda::MempoolId_t pool{0, 0};  // the capture's private memory pool
#endif
  std::vector<at::Tensor> tokens;
  at::Tensor loss, grad_norm;
  bool ready = false;
  bool failed = false;
};

struct Trainer::EarlyStep {
#ifdef TITAN_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> stream;
#endif
  bool used = false;  // updates issued on the stream since the last join
};

void Trainer::step_unit_early(size_t unit, const dist::WorkPtr& work) {
  RECORD_USER_SCOPE("titan/early_optimizer_step");
#ifdef TITAN_WITH_CUDA
  if (fsdp_->device().is_cuda()) {
    // The side stream starts after everything issued so far (the unit's gradient, its
    // reduction), so the update overlaps the backward of the units before it.
    if (!early_) early_ = std::make_unique<EarlyStep>();
    if (!early_->stream) early_->stream = at::cuda::getStreamFromPool(/*isHighPriority=*/false);
    at::cuda::CUDAEvent ready;
    ready.record(at::cuda::getCurrentCUDAStream());
    ready.block(*early_->stream);
    c10::cuda::CUDAStreamGuard guard(*early_->stream);
    if (work) work->wait();
    fsdp_->sum_tp_replicated_grads(unit);
    optimizer_->apply_to({unit}, at::Tensor());
    early_->used = true;
    return;
  }
#endif
  if (work) work->wait();
  fsdp_->sum_tp_replicated_grads(unit);
  optimizer_->apply_to({unit}, at::Tensor());
}

void Trainer::join_early_steps() {
#ifdef TITAN_WITH_CUDA
  if (early_ && early_->used) {
    at::cuda::CUDAEvent done;
    done.record(*early_->stream);
    done.block(at::cuda::getCurrentCUDAStream());
    early_->used = false;
  }
#endif
}

bool Trainer::graph_active() const {
  return graph_ && graph_->ready;
}

bool Trainer::graph_eligible() const {
  // Single-GPU runs without offload: multi-rank steps are bound by communication and compute
  // already, and NCCL calls stay out of captured graphs here.
  // The update must read its learning rate from device memory (titan's fused AdamW); ATen's
  // optimizers take it as a host number, which a graph would freeze.
  return cfg_.training.use_cuda_graphs && fsdp_->device().is_cuda() &&
         !cfg_.optimizer.early_step_in_backward && runtime_->env().world_size == 1 &&
         !cfg_.training.enable_cpu_offload && cfg_.training.fused_kernels &&
         cfg_.optimizer.implementation == "fused";
}

std::vector<at::Tensor> Trainer::microbatches_of(const at::Tensor& batch) const {
  std::vector<at::Tensor> out;
  for (int64_t first = 0; first < batch.size(0); first += plan_.microbatch_size) {
    out.push_back(batch.narrow(0, first, plan_.microbatch_size));
  }
  return out;
}

std::pair<at::Tensor, at::Tensor> Trainer::step_body(const std::vector<at::Tensor>& batches) {
  const auto& c = cfg_;
  const c10::Device device = fsdp_->device();
  fsdp_->zero_grad();
  for (auto& stage : stages_) stage->begin_step(static_cast<int>(plan_.microbatches_per_step()));
  const double tokens_per_step = static_cast<double>(c.training.local_batch_size) *
                                 c.training.seq_len * accumulation_ * dp_size_;
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (plan_.pp == 1) {
    // The trivial schedule: each loader batch is one microbatch.
    executor_->run(batches, 1.0 / tokens_per_step, loss_sum);
  } else {
    for (const auto& batch : batches) {
      executor_->run(microbatches_of(batch), 1.0 / tokens_per_step, loss_sum);
    }
  }
  {
    RECORD_USER_SCOPE("titan/grad_reduction_wait");
    fsdp_->finish_grad_reduction();
  }
  RECORD_USER_SCOPE("titan/clip_and_optimizer");
  const bool early = c.optimizer.early_step_in_backward;
  if (early) join_early_steps();  // every unit has stepped (no clipping: config checks)
  at::Tensor grad_sq = fsdp_->grad_norm_squared();
  // Pipeline ranks hold disjoint units: their squares add up.
  auto* pp = runtime_->mesh().group("pp");
  if (pp) pp->all_reduce(grad_sq, dist::ReduceOp::Sum);
  at::Tensor grad_norm = grad_sq.sqrt();
  at::Tensor divisor;
  if (c.training.max_norm > 0) {
    // clip coefficient min(1, max_norm / (norm + 1e-6)) applied as a divisor >= 1.
    divisor = ((grad_norm + 1e-6) / c.training.max_norm).clamp_min(1.0);
    divisor = divisor.to(fsdp_->unit(0).master.device());
  }
  if (!early) optimizer_->apply(divisor);
  fsdp_->weights_changed();  // validation and the next step gather (and scale) the new weights
  for (size_t i : amax_from_optimizer_) {
    fsdp_->float8_amax_stepped(i, optimizer_->wrote_amax(i));
  }
  // The logged loss is the mean over the global batch: the last stage's sums, over every
  // pipeline and data-parallel rank, so every rank (rank 0 too) holds the true value.
  if (pp) pp->all_reduce(loss_sum, dist::ReduceOp::Sum);
  if (auto* dp = runtime_->mesh().group("dp_cp")) dp->all_reduce(loss_sum, dist::ReduceOp::Sum);
  at::Tensor mean_loss = loss_sum / tokens_per_step;
  // Divergence, every step: the first step whose loss or gradient norm (both already reduced
  // over every rank) is not finite stays on the device, read with the next metrics or before
  // the next save; no synchronization here.
  at::Tensor counter = health_.narrow(0, 1, 1);
  counter.add_(1);
  at::Tensor bad = at::logical_not(at::isfinite(mean_loss + grad_norm.to(mean_loss.device())));
  at::Tensor first = health_.narrow(0, 0, 1);
  first.copy_(at::where(at::logical_and(first.eq(0), bad.reshape({1})), counter, first));
  return {mean_loss, grad_norm};
}

std::pair<at::Tensor, at::Tensor> Trainer::train_step() {
  const c10::Device device = fsdp_->device();
  std::vector<at::Tensor> batches;
  for (int64_t micro = 0; micro < accumulation_; ++micro) {
    RECORD_USER_SCOPE("titan/data");
    at::Tensor batch = loader_->next();
    TITAN_INTERNAL_CHECK(batch.defined(), "training data ended");
    data_seconds_window_ += loader_->last_wait_seconds();
    batches.push_back(batch);
  }
  ++step_;
  optimizer_->prepare(scheduler_->lr_at(step_ - lr_offset_steps_));
#ifdef TITAN_WITH_CUDA
  if (graph_eligible() && !(graph_ && graph_->failed) && eager_steps_ >= graph_warmup_steps_) {
    if (!graph_) {
      graph_ = std::make_unique<StepGraph>();
      for (const auto& b : batches)
        graph_->tokens.push_back(
            at::empty(b.sizes(), b.options().device(device).pinned_memory(false)));
    }
    for (size_t m = 0; m < batches.size(); ++m) graph_->tokens[m].copy_(batches[m], true);
    if (graph_->ready) {
      graph_->graph.replay();
      return {graph_->loss, graph_->grad_norm};
    }
    // Capture this step once, then replay it (capturing does not run the work). Blocks cached
    // by the eager warm-up go back first so the graph's private pool can reuse that memory.
    synchronize(device);
    c10::cuda::CUDACachingAllocator::emptyCache();
    bool pool_in_use = false;
    try {
      graph_->pool = at::cuda::graph_pool_handle();
      graph_->graph.capture_begin(graph_->pool, cudaStreamCaptureModeThreadLocal);
      pool_in_use = true;
      try {
        std::tie(graph_->loss, graph_->grad_norm) = step_body(graph_->tokens);
        // Test-only hook (tests/gpu/training_test.cpp): a capture that fails at its end.
        if (std::getenv("TITAN_TEST_FAIL_GRAPH_CAPTURE")) fail("test hook failed the capture");
      } catch (...) {
        cudaGraph_t partial = nullptr;
        cudaStreamEndCapture(at::cuda::getCurrentCUDAStream().stream(), &partial);
        if (partial) cudaGraphDestroy(partial);
        // capture_end never runs: stop routing allocations to the capture's pool here.
        c10::cuda::CUDACachingAllocator::endAllocateToPool(device.index(), graph_->pool);
        throw;
      }
      graph_->graph.capture_end();
      graph_->ready = true;
      log::info("CUDA graph: captured the step ({} micro-batch(es)); replaying it from step {}",
                accumulation_, step_);
      if (cfg_.profiling.enable_profiling) {
        log::info(
            "profiling: traces of replayed steps show the graph, not every kernel; "
            "--training.use_cuda_graphs false gives a per-kernel breakdown");
      }
      graph_->graph.replay();
      return {graph_->loss, graph_->grad_norm};
    } catch (const std::exception& e) {
      std::string what = e.what();
      what = what.substr(0, what.find('\n'));
      log::warn("CUDA graph capture failed ({}); this run continues without graphs", what);
      cudaGetLastError();
      graph_->failed = true;
      // Nothing captured ran: the weights are unchanged, but the host-side state the step set
      // (gathered units, float8 amaxes said to come from the update) is dropped and retaken.
      fsdp_->weights_changed();
      for (auto& stage : stages_) stage->abandon_step();
      graph_->loss = at::Tensor();
      graph_->grad_norm = at::Tensor();
      // What the failed capture allocated goes back to the eager steps once it is freed.
      if (pool_in_use) {
        c10::cuda::CUDACachingAllocator::releasePool(device.index(), graph_->pool);
      }
    }
  }
#endif
  std::vector<at::Tensor> tokens;
  for (const auto& b : batches) tokens.push_back(b.to(device, /*non_blocking=*/true));
  ++eager_steps_;
  return step_body(tokens);
}

TrainSummary Trainer::train() {
  const auto& c = cfg_;
  TrainSummary summary;
  if (estimate_only_) {
    log::info("memory_estimation.enable: the estimate is above; exiting without training");
    return summary;
  }
  if (c.checkpoint.create_seed_checkpoint) {
    checkpointer_->save(0, /*model_only=*/true, at::kFloat);
    checkpointer_->wait();
    log::info("seed checkpoint written to {}; exiting (checkpoint.create_seed_checkpoint)",
              checkpointer_->folder());
    return summary;
  }
  const c10::Device device = fsdp_->device();
  runtime_->enter_training();
  reset_peak_memory(device);
  synchronize(device);
  auto window_start = Clock::now();
  int64_t window_steps = 0;
  const auto run_start = Clock::now();
  const int64_t first_step = step_ + 1;
  metrics::Profiler profiler(cfg_, runtime_->env().rank, device.is_cuda());
#ifdef TITAN_WITH_CUDA
  // The loop runs on a side stream: CUDA graphs cannot capture the legacy default stream.
  std::optional<c10::cuda::CUDAStreamGuard> stream_guard;
  if (device.is_cuda()) stream_guard.emplace(c10::cuda::getStreamFromPool(false, device.index()));
#endif
  while (step_ < c.training.steps) {
    profiler.step_begin(step_ + 1);
    auto [loss, grad_norm] = train_step();
    profiler.step_end(step_);
    test_fault_point(runtime_->env().rank, "step" + std::to_string(step_));
    ++window_steps;
    ++summary.steps_run;
    const bool log_now =
        step_ == first_step || step_ % c.metrics.log_freq == 0 || step_ == c.training.steps;
    if (log_now) {
      check_health();  // synchronizes
      const double loss_v = loss.item<double>();
      const double gn = grad_norm.item<double>();
      const double window_s = seconds_since(window_start);
      const double step_s = window_s / window_steps;
      metrics::StepMetrics m;
      m.step = step_;
      m.loss = loss_v;
      m.grad_norm = gn;
      m.lr = scheduler_->lr_at(step_ - lr_offset_steps_);
      // Per device, as torchtitan counts: a data-parallel rank's tokens are shared by its
      // pipeline, tensor- and context-parallel ranks.
      const double tokens = static_cast<double>(c.training.local_batch_size) * c.training.seq_len *
                            accumulation_ / (plan_.pp * plan_.tp * plan_.cp);
      m.tokens_per_second = tokens / step_s;
      m.tflops = m.tokens_per_second * flops_per_token_ / 1e12;
      if (device_.peak_flops > 0) m.mfu_pct = 100.0 * m.tflops * 1e12 / device_.peak_flops;
      m.memory = memory_stats(device);
      m.step_seconds = step_s;
      m.data_seconds = data_seconds_window_ / window_steps;
      m.eta_seconds = step_s * static_cast<double>(c.training.steps - step_);
      metrics_->log_step(m);
      // Each logged peak is its window's, as torchtitan's: a save's or a validation pass's
      // (both follow this line) shows in the next line, no longer in every later one.
      reset_peak_memory(device);
      if (summary.steps_run == 1) summary.first_loss = loss_v;
      summary.last_loss = loss_v;
      window_start = Clock::now();
      window_steps = 0;
      data_seconds_window_ = 0;
    }
    checkpointer_->check_background();
    // (TITAN_TEST_ALLOW_NONFINITE_SAVE: tests make the checkpoints older versions made.)
    if (checkpointer_->due(step_, step_ == c.training.steps) &&
        !std::getenv("TITAN_TEST_ALLOW_NONFINITE_SAVE")) {
      check_health();
    }
    checkpointer_->maybe_save(step_, step_ == c.training.steps);
    // At step 1 too, as torchtitan's should_validate: the curve starts at the untrained model.
    if (c.validation.enable && (step_ == 1 || step_ % c.validation.freq == 0)) {
      const auto t0 = Clock::now();
      const double vloss = validate();
      metrics_->log_validation(step_, vloss, seconds_since(t0));
      window_start = Clock::now();
    }
  }
  checkpointer_->wait();
  log::info("training finished: {} steps in {}", summary.steps_run,
            metrics::format_duration(seconds_since(run_start)));
  return summary;
}

std::unique_ptr<data::DataLoader> Trainer::make_loader(const std::string& section,
                                                       const std::string& dataset,
                                                       const std::string& path, int64_t batch,
                                                       int64_t seq_len, bool infinite,
                                                       bool pin_memory) const {
  data::DatasetOptions dopts;
  dopts.section = section;
  dopts.name = dataset;
  dopts.path = path;
  dopts.text_field = cfg_.training.dataset_text_field;
  dopts.dp_rank = 0;  // windows are dealt by the loader (see LoaderOptions)
  dopts.dp_size = 1;
  dopts.vocab_size = args_.vocab_size;
  data::LoaderOptions lopts;
  lopts.batch_size = batch;
  lopts.seq_len = seq_len;
  lopts.infinite = infinite;
  lopts.pin_memory = pin_memory;
  lopts.dp_rank = dp_rank_;
  lopts.dp_size = dp_size_;
  return std::make_unique<data::DataLoader>(data::make_source(dopts, tokenizer_), lopts);
}

int64_t Trainer::validation_microbatch_size() const {
  // Forward only through the pipeline: each batch in microbatches of the training size.
  const auto& c = cfg_;
  const int64_t mbs = plan_.pp == 1 ? c.validation.local_batch_size : plan_.microbatch_size;
  TITAN_CHECK(c.validation.local_batch_size % mbs == 0, "validation.local_batch_size (",
              c.validation.local_batch_size,
              ") must be a multiple of parallelism.pipeline_parallel_microbatch_size (", mbs, ")");
  return mbs;
}

void Trainer::check_validation_batches(const data::DataLoader& loader, int64_t batches) const {
  TITAN_CHECK(batches > 0, "validation: dataset ", loader.describe(),
              " holds less than one batch (validation.local_batch_size x (seq_len + 1) tokens "
              "per data-parallel rank)");
}

double Trainer::validate() {
  const auto& c = cfg_;
  const c10::Device device = fsdp_->device();
  auto loader_ptr = make_loader("validation", c.validation.dataset, c.validation.dataset_path,
                                c.validation.local_batch_size, c.validation.seq_len,
                                /*infinite=*/false, device.is_cuda());
  data::DataLoader& loader = *loader_ptr;
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  const int64_t mbs = validation_microbatch_size();
  const auto eval = parallel::pipeline::build_eval_schedule(
      plan_.pp, static_cast<int>(plan_.stages.size()),
      static_cast<int>(c.validation.local_batch_size / mbs), plan_.schedule.stage_rank);
  int64_t batches = 0;
  while (c.validation.steps < 0 || batches < c.validation.steps) {
    at::Tensor batch = loader.next();
    if (!batch.defined()) break;
    batch = batch.to(device, true);
    std::vector<at::Tensor> parts;
    for (int64_t first = 0; first < batch.size(0); first += mbs) {
      parts.push_back(batch.narrow(0, first, mbs));
    }
    executor_->run_eval(eval, parts, loss_sum);
    ++batches;
  }
  fsdp_->release_all();
  check_validation_batches(loader, batches);
  if (auto* pp = runtime_->mesh().group("pp")) pp->all_reduce(loss_sum, dist::ReduceOp::Sum);
  if (auto* dp = runtime_->mesh().group("dp_cp")) dp->all_reduce(loss_sum, dist::ReduceOp::Sum);
  const double tokens = static_cast<double>(batches) * c.validation.local_batch_size *
                        c.validation.seq_len * dp_size_;
  return loss_sum.item<double>() / tokens;
}

}  // namespace titan::train
