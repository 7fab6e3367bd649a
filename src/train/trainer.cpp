// The training loop, top to bottom.
#include "titan/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#ifdef TITAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "titan/checkpoint/hf.h"
#include "titan/data/dataset.h"
#include "titan/metrics/profiler.h"
#include "titan/model/layout.h"
#include "titan/ops/attention.h"
#include "titan/ops/dispatch.h"
#include "titan/parallel/memory_estimate.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

c10::Device pick_device() {
  if (const char* force = std::getenv("TITAN_DEVICE"); force && std::string(force) == "cpu") {
    return c10::Device(c10::kCPU);
  }
  if (cuda_device_count() > 0) {
    int local = 0;
    if (const char* lr = std::getenv("LOCAL_RANK")) local = std::atoi(lr);
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local % cuda_device_count()));
  }
  return c10::Device(c10::kCPU);
}

}  // namespace

Trainer::Trainer(config::JobConfig config) : cfg_(std::move(config)) {
  const auto& c = cfg_;
  at::manual_seed(static_cast<uint64_t>(c.debug.seed));
  if (c.debug.deterministic) {
    at::globalContext().setDeterministicAlgorithms(true, c.debug.deterministic_warn_only);
  }

  // Launch, device, and the mesh with its communicators.
  const auto env = dist::read_launch_env();
  const c10::Device device = pick_device();
  device_ = describe_device(device);
  if (device.is_cuda() && env.world_size > 1) {
    TITAN_CHECK(env.local_world_size <= cuda_device_count(), "LOCAL_WORLD_SIZE ",
                env.local_world_size, " exceeds the ", cuda_device_count(),
                " visible GPUs on this node");
  }
  runtime_ = std::make_unique<dist::Runtime>(env, cfg_, device);
  const auto& mesh = runtime_->mesh();
  log::info("launch: {} | {}", env.source, mesh.describe());
  ops::set_fused_kernels(c.training.fused_kernels);
  const bool cuda = device.is_cuda();
  at::ScalarType param_dtype = at::kFloat;
  if (cuda && c.training.mixed_precision_param == "bfloat16") param_dtype = at::kBFloat16;
  if (!cuda && c.training.mixed_precision_param == "bfloat16") {
    log::info("CPU run: computing in float32 (training.mixed_precision_param applies on GPU)");
  }
  if (c.compile.enable) {
    log::info(
        "compile.enable: not applicable to titan (ahead-of-time compiled, fused kernels "
        "built in); ignored");
  }
  log::info("device: {}{}", device_.name,
            cuda ? fmt::format(" (cuda:{}), {:.1f} GiB", device.index(),
                               device_.total_memory_bytes / 1073741824.0)
                 : "");

  // Model arguments and data.
  args_ = model::llama_flavor(c.model.flavor);
  if (!c.model.rope_scaling) args_.rope_scaling_factor = 0;
  // A run computes the model its weights were trained as: the checkpoint it starts from (or
  // the HF folder's config.json) decides RoPE and the norm epsilon.
  if (const std::string start = checkpoint::Checkpointer::start_dir(cfg_); !start.empty()) {
    checkpoint::adopt_checkpoint_model_args(start, args_);
  } else if (c.checkpoint.initial_load_in_hf && !c.checkpoint.initial_load_path.empty()) {
    checkpoint::adopt_hf_config(c.checkpoint.initial_load_path, args_);
  }
  tokenizer_ = data::build_tokenizer(c.model.tokenizer_path, c.model.hf_assets_path);
  log::info("tokenizer: {}", tokenizer_->describe());
  dp_size_ = mesh.size("dp");
  dp_rank_ = mesh.group_rank("dp");
  const int64_t micro_tokens = c.training.local_batch_size * dp_size_;
  int64_t global = c.training.global_batch_size;
  if (global < 0) global = micro_tokens;
  TITAN_CHECK(global % micro_tokens == 0, "training.global_batch_size (", global,
              ") must be a multiple of local_batch_size (", c.training.local_batch_size,
              ") x data-parallel degree (", dp_size_, ") = ", micro_tokens);
  grad_accum_steps_ = global / micro_tokens;
  loader_ = make_loader(c.training.dataset, c.training.dataset_path, c.training.local_batch_size,
                        c.training.seq_len, /*infinite=*/true, cuda);
  log::info("dataset: {}", loader_->describe());

  // Model: layouts only (no memory) until the data-parallel owner materializes its shards.
  auto units = model::llama_units(args_);
  log::info(
      "model: llama3 {} | {} parameters | dim {} layers {} heads {} kv_heads {} ffn {} "
      "vocab {} | RoPE {}",
      c.model.flavor, util::with_commas(args_.total_params()), args_.dim, args_.n_layers,
      args_.n_heads, args_.n_kv_heads, args_.ffn_hidden_dim(), args_.vocab_size,
      model::describe_rope(args_));
  parallel::FsdpOptions fopts;
  fopts.param_dtype = param_dtype;
  fopts.reduce_dtype = c.training.mixed_precision_reduce == "bfloat16" ? at::kBFloat16 : at::kFloat;
  const auto& reshard = c.parallelism.fsdp_reshard_after_forward;
  dist::Communicator* shard_group = mesh.group("dp_shard");
  // Unsharded units keep compute-dtype copies of the weights for the whole run (the optimizer
  // rewrites them), so nothing is cast or gathered per step; with activation checkpointing on,
  // the user is short of memory, and "default" then frees them after use, as FSDP2 does.
  const bool ac_on = c.activation_checkpoint.mode != "none";
  fopts.persistent_compute_weights =
      shard_group != nullptr || reshard == "never" || (reshard == "default" && !ac_on);
  fopts.reshard = reshard == "always"    ? parallel::ReshardPolicy::Always
                  : reshard == "never"   ? parallel::ReshardPolicy::Never
                  : shard_group || ac_on ? parallel::ReshardPolicy::Default
                                         : parallel::ReshardPolicy::Never;
  fopts.cpu_offload = c.training.enable_cpu_offload;
  const auto t_init = Clock::now();
  fsdp_ = std::make_unique<parallel::FsdpModel>(std::move(units), shard_group,
                                                mesh.group("dp_replicate"), device, fopts);
  ActivationPolicy ac{c.activation_checkpoint.mode, c.activation_checkpoint.selective_ac_option};
  report_memory_estimate(ac);
  if (c.memory_estimation.enable) {
    estimate_only_ = true;  // nothing allocated; train() returns at once
    return;
  }
  fsdp_->init_weights(c.debug.seed);
  {
    // fp32 parameters + gradients + two AdamW moments, as held by this rank.
    int64_t elements = 0;
    for (size_t i = 0; i < fsdp_->num_units(); ++i) elements += fsdp_->unit(i).shard_numel;
    log::info("parameter state: {:.2f} MiB per rank ({} of {} elements per unit set; dp_shard {})",
              elements * 16.0 / (1 << 20), util::with_commas(elements),
              util::with_commas(args_.total_params()), fsdp_->dp_shard_size());
  }
  log::info("initialized weights in {:.2f}s (seed {})", seconds_since(t_init), c.debug.seed);

  runner_ = std::make_unique<ModelRunner>(args_, *fsdp_, ac);
  log::info("activation checkpointing: {}{}", ac.mode,
            ac.mode == "selective" ? " (" + ac.option + ")" : "");

  OptimizerOptions oopts;
  oopts.name = c.optimizer.name;
  oopts.implementation = c.optimizer.implementation;
  oopts.beta1 = c.optimizer.beta1;
  oopts.beta2 = c.optimizer.beta2;
  oopts.eps = c.optimizer.eps;
  oopts.weight_decay = c.optimizer.weight_decay;
  optimizer_ = std::make_unique<Optimizer>(fsdp_->master_shards(), fsdp_->grad_shards(), oopts,
                                           fsdp_->shadows());
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
  checkpointer_ = std::make_unique<checkpoint::Checkpointer>(cfg_, *runtime_, cstate);
  step_ = checkpointer_->load_at_start();
  if (step_ > 0) log::info("resuming after step {}", step_);

  metrics::MetricsOptions mopts;
  mopts.dump_folder = c.job.dump_folder;
  mopts.enable_tensorboard = c.metrics.enable_tensorboard;
  mopts.tb_folder = c.metrics.save_tb_folder;
  mopts.color = !c.metrics.disable_color_printing;
  mopts.rank = env.rank;
  mopts.write_files = env.rank == 0 || c.metrics.save_for_all_ranks;
  mopts.enable_tensorboard = mopts.enable_tensorboard && mopts.write_files;
  metrics_ = std::make_unique<metrics::MetricsLogger>(mopts);
  log::info(
      "training: {} steps, local batch {}, seq_len {}, global batch {} ({} micro-batch(es) "
      "per step), peak lr {}, warmup {}",
      c.training.steps, c.training.local_batch_size, c.training.seq_len, global, grad_accum_steps_,
      c.optimizer.lr, scheduler_->warmup_steps());
}

Trainer::~Trainer() = default;

void Trainer::report_memory_estimate(const ActivationPolicy& ac) {
  const auto& c = cfg_;
  parallel::MemoryEstimateInputs in;
  int64_t largest = 0;
  for (size_t i = 0; i < fsdp_->num_units(); ++i) {
    const auto& u = fsdp_->unit(i);
    in.param_state_elements += u.shard_numel;
    largest = std::max(largest, u.layout.numel);
  }
  // Shards keep compute-dtype copies on the device where that differs from the fp32 master
  // (FsdpModel::init_weights).
  const auto& fo = fsdp_->options();
  const bool shadows = (fo.param_dtype != at::kFloat || fo.cpu_offload) &&
                       (fsdp_->dp_shard_size() > 1 || fo.persistent_compute_weights);
  if (shadows) in.resident_weight_elements = in.param_state_elements;
  in.state_on_host = c.training.enable_cpu_offload;
  in.compute_dtype_bytes = static_cast<int64_t>(c10::elementSize(fsdp_->options().param_dtype));
  // Gathered units held at once: the one computing and the one prefetched.
  if (fsdp_->dp_shard_size() > 1 || !fsdp_->options().persistent_compute_weights) {
    in.resident_weight_elements += 2 * largest;
  }
  in.largest_unit_elements = largest;
  in.microbatch_tokens = c.training.local_batch_size * c.training.seq_len;
  for (int64_t l = 0; l < args_.n_layers; ++l) in.block_policies.push_back(ac.for_layer(l));
  const auto est = parallel::estimate_memory(args_, in);
  log::info("memory estimate: {}", est.describe());
  OomContext oom;
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
  }
}

// A captured step: static device buffers for the tokens, and the outputs it leaves.
struct Trainer::StepGraph {
#ifdef TITAN_WITH_CUDA
  at::cuda::CUDAGraph graph;
#endif
  std::vector<at::Tensor> tokens;
  at::Tensor loss, grad_norm;
  bool ready = false;
  bool failed = false;
};

bool Trainer::graph_active() const {
  return graph_ && graph_->ready;
}

bool Trainer::graph_eligible() const {
  // Single-GPU runs without offload: multi-rank steps are bound by communication and compute
  // already, and NCCL calls stay out of captured graphs here.
  // The update must read its learning rate from device memory (titan's fused AdamW); ATen's
  // optimizers take it as a host number, which a graph would freeze.
  return cfg_.training.use_cuda_graphs && fsdp_->device().is_cuda() &&
         runtime_->env().world_size == 1 && !cfg_.training.enable_cpu_offload &&
         cfg_.training.fused_kernels && cfg_.optimizer.implementation == "fused";
}

std::pair<at::Tensor, at::Tensor> Trainer::step_body(const std::vector<at::Tensor>& tokens) {
  const auto& c = cfg_;
  const c10::Device device = fsdp_->device();
  fsdp_->zero_grad();
  const double tokens_per_step = static_cast<double>(c.training.local_batch_size) *
                                 c.training.seq_len * grad_accum_steps_ * dp_size_;
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  for (int64_t micro = 0; micro < grad_accum_steps_; ++micro) {
    loss_sum.add_(runner_->forward_backward(tokens[static_cast<size_t>(micro)],
                                            1.0 / tokens_per_step, micro + 1 == grad_accum_steps_));
  }
  {
    RECORD_USER_SCOPE("titan/grad_reduction_wait");
    fsdp_->finish_grad_reduction();
  }
  RECORD_USER_SCOPE("titan/clip_and_optimizer");
  at::Tensor grad_norm = fsdp_->grad_norm_squared().sqrt();
  at::Tensor divisor;
  if (c.training.max_norm > 0) {
    // clip coefficient min(1, max_norm / (norm + 1e-6)) applied as a divisor >= 1.
    divisor = ((grad_norm + 1e-6) / c.training.max_norm).clamp_min(1.0);
    divisor = divisor.to(fsdp_->unit(0).master.device());
  }
  optimizer_->apply(divisor);
  // The logged loss is the mean over the global batch.
  if (auto* dp = runtime_->mesh().group("dp")) dp->all_reduce(loss_sum, dist::ReduceOp::Sum);
  return {loss_sum / tokens_per_step, grad_norm};
}

std::pair<at::Tensor, at::Tensor> Trainer::train_step() {
  const c10::Device device = fsdp_->device();
  std::vector<at::Tensor> batches;
  for (int64_t micro = 0; micro < grad_accum_steps_; ++micro) {
    RECORD_USER_SCOPE("titan/data");
    at::Tensor batch = loader_->next();
    TITAN_INTERNAL_CHECK(batch.defined(), "training data ended");
    data_seconds_window_ += loader_->last_wait_seconds();
    batches.push_back(batch);
  }
  ++step_;
  optimizer_->prepare(scheduler_->lr_at(step_));
#ifdef TITAN_WITH_CUDA
  if (graph_eligible() && !(graph_ && graph_->failed) && step_ > graph_warmup_steps_) {
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
    try {
      graph_->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        std::tie(graph_->loss, graph_->grad_norm) = step_body(graph_->tokens);
      } catch (...) {
        cudaGraph_t partial = nullptr;
        cudaStreamEndCapture(at::cuda::getCurrentCUDAStream().stream(), &partial);
        if (partial) cudaGraphDestroy(partial);
        throw;
      }
      graph_->graph.capture_end();
      graph_->ready = true;
      log::info("CUDA graph: captured the step ({} micro-batch(es)); replaying it from step {}",
                grad_accum_steps_, step_);
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
      fsdp_->release_all();
    }
  }
#endif
  std::vector<at::Tensor> tokens;
  for (const auto& b : batches) tokens.push_back(b.to(device, /*non_blocking=*/true));
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
    ++window_steps;
    ++summary.steps_run;
    const bool log_now =
        step_ == first_step || step_ % c.metrics.log_freq == 0 || step_ == c.training.steps;
    if (log_now) {
      const double loss_v = loss.item<double>();  // synchronizes
      const double gn = grad_norm.item<double>();
      TITAN_CHECK(std::isfinite(loss_v), "loss is ", loss_v, " at step ", step_,
                  ": training diverged (try a lower optimizer.lr or training.max_norm)");
      const double window_s = seconds_since(window_start);
      const double step_s = window_s / window_steps;
      metrics::StepMetrics m;
      m.step = step_;
      m.loss = loss_v;
      m.grad_norm = gn;
      m.lr = scheduler_->lr_at(step_);
      const double tokens =
          static_cast<double>(c.training.local_batch_size) * c.training.seq_len * grad_accum_steps_;
      m.tokens_per_second = tokens / step_s;
      m.tflops = m.tokens_per_second * flops_per_token_ / 1e12;
      if (device_.peak_flops > 0) m.mfu_pct = 100.0 * m.tflops * 1e12 / device_.peak_flops;
      m.memory = memory_stats(device);
      m.step_seconds = step_s;
      m.data_seconds = data_seconds_window_ / window_steps;
      m.eta_seconds = step_s * static_cast<double>(c.training.steps - step_);
      metrics_->log_step(m);
      if (summary.steps_run == 1) summary.first_loss = loss_v;
      summary.last_loss = loss_v;
      window_start = Clock::now();
      window_steps = 0;
      data_seconds_window_ = 0;
    }
    checkpointer_->maybe_save(step_, step_ == c.training.steps);
    if (c.validation.enable && step_ % c.validation.freq == 0) {
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

std::unique_ptr<data::DataLoader> Trainer::make_loader(const std::string& dataset,
                                                       const std::string& path, int64_t batch,
                                                       int64_t seq_len, bool infinite,
                                                       bool pin_memory) const {
  data::DatasetOptions dopts;
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

double Trainer::validate() {
  const auto& c = cfg_;
  const c10::Device device = fsdp_->device();
  auto loader_ptr = make_loader(c.validation.dataset, c.validation.dataset_path,
                                c.validation.local_batch_size, c.validation.seq_len,
                                /*infinite=*/false, device.is_cuda());
  data::DataLoader& loader = *loader_ptr;
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  int64_t batches = 0;
  while (c.validation.steps < 0 || batches < c.validation.steps) {
    at::Tensor batch = loader.next();
    if (!batch.defined()) break;
    loss_sum.add_(runner_->forward_loss(batch.to(device, true)));
    ++batches;
  }
  TITAN_CHECK(batches > 0, "validation: dataset ", loader.describe(),
              " holds less than one batch (validation.local_batch_size x (seq_len + 1) tokens "
              "per data-parallel rank)");
  if (auto* dp = runtime_->mesh().group("dp")) dp->all_reduce(loss_sum, dist::ReduceOp::Sum);
  const double tokens = static_cast<double>(batches) * c.validation.local_batch_size *
                        c.validation.seq_len * dp_size_;
  return loss_sum.item<double>() / tokens;
}

}  // namespace titan::train
