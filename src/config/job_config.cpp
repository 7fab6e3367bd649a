// The option table behind JobConfig: one row per key with type, default, range and help;
// TOML and CLI parsing, aliases for older spellings, and error messages with suggestions.
#include "titan/config/job_config.h"

#include <nlohmann/json.hpp>
#include <toml++/toml.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <variant>

#include "titan/model/llama_args.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/strings.h"

namespace titan::config {
namespace {

enum class Type { Bool, Int, OptInt, Float, OptFloat, String, StringList, StringListList };

const char* type_name(Type t) {
  switch (t) {
    case Type::Bool: return "a boolean (true/false)";
    case Type::Int: return "an integer";
    case Type::OptInt: return "an integer (or \"none\")";
    case Type::Float: return "a number";
    case Type::OptFloat: return "a number (or \"none\")";
    case Type::String: return "a string";
    case Type::StringList: return "a list of strings";
    case Type::StringListList: return "a list of lists of strings";
  }
  return "?";
}

using Value =
    std::variant<bool, int64_t, std::optional<int64_t>, double, std::optional<double>, std::string,
                 std::vector<std::string>, std::vector<std::vector<std::string>>>;

struct Option {
  std::string path;  // "section.key"
  Type type;
  std::string help;
  std::function<Value(const JobConfig&)> get;
  std::function<void(JobConfig&, const Value&)> set;
  std::optional<double> min;  // inclusive bounds for numbers
  std::optional<double> max;
  bool min_exclusive = false;
  std::vector<std::string> choices;  // allowed strings (each list element for lists)
  bool hidden = false;               // an older spelling with its own setter: not printed as a key
  bool integer_elements = false;     // a string list whose TOML elements may be integers
};

template <typename Sec, typename T>
Option make_option(const std::string& path, Sec JobConfig::*sec, T Sec::*field, Type type,
                   std::string help) {
  Option o;
  o.path = path;
  o.type = type;
  o.help = std::move(help);
  o.get = [sec, field](const JobConfig& c) -> Value { return Value((c.*sec).*field); };
  o.set = [sec, field](JobConfig& c, const Value& v) { (c.*sec).*field = std::get<T>(v); };
  return o;
}

struct Registry {
  std::vector<Option> options;
  std::map<std::string, std::string> aliases;          // old full path -> new full path
  std::map<std::string, std::string> section_aliases;  // old section -> new section

  Option& add(Option o) {
    options.push_back(std::move(o));
    return options.back();
  }
  const Option* find(const std::string& path) const {
    for (const auto& o : options) {
      if (o.path == path) return &o;
    }
    return nullptr;
  }
};

// The option type of a field type.
template <typename T>
Type type_of() {
  if constexpr (std::is_same_v<T, bool>) {
    return Type::Bool;
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return Type::Int;
  } else if constexpr (std::is_same_v<T, std::optional<int64_t>>) {
    return Type::OptInt;
  } else if constexpr (std::is_same_v<T, double>) {
    return Type::Float;
  } else if constexpr (std::is_same_v<T, std::optional<double>>) {
    return Type::OptFloat;
  } else if constexpr (std::is_same_v<T, std::string>) {
    return Type::String;
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    return Type::StringList;
  } else {
    static_assert(std::is_same_v<T, std::vector<std::vector<std::string>>>);
    return Type::StringListList;
  }
}

// Shorthands for the table below.
template <typename Sec, typename T>
Option& opt(Registry& r, const std::string& path, Sec JobConfig::*sec, T Sec::*field,
            std::string help) {
  return r.add(make_option(path, sec, field, type_of<T>(), std::move(help)));
}

// An option of a nested section, e.g. [training.dataloader].
template <typename Sec, typename Sub, typename T>
Option& opt2(Registry& r, const std::string& path, Sec JobConfig::*sec, Sub Sec::*sub,
             T Sub::*field, std::string help) {
  Option o;
  o.path = path;
  o.type = type_of<T>();
  o.help = std::move(help);
  o.get = [sec, sub, field](const JobConfig& c) -> Value { return Value(((c.*sec).*sub).*field); };
  o.set = [sec, sub, field](JobConfig& c, const Value& v) {
    ((c.*sec).*sub).*field = std::get<T>(v);
  };
  return r.add(std::move(o));
}

Option& range(Option& o, std::optional<double> lo, std::optional<double> hi = std::nullopt,
              bool lo_exclusive = false) {
  o.min = lo;
  o.max = hi;
  o.min_exclusive = lo_exclusive;
  return o;
}
Option& choices(Option& o, std::vector<std::string> c) {
  o.choices = std::move(c);
  return o;
}

// [<section>.dataloader]: torchtitan's DataLoader keys. titan reads and tokenizes on one
// background thread per process (and pins batches on GPU runs), so worker processes and
// prefetch depth have nothing to change; the keys are accepted and reported by print_config.
template <typename Sec>
void add_dataloader_options(Registry& r, const std::string& section, Sec JobConfig::*sec,
                            DataLoaderSection Sec::*sub) {
  const std::string p = section + ".dataloader.";
  range(opt2(r, p + "num_workers", sec, sub, &DataLoaderSection::num_workers,
             "Accepted for torchtitan compatibility (titan loads on a background thread)"),
        0);
  opt2(r, p + "persistent_workers", sec, sub, &DataLoaderSection::persistent_workers,
       "Accepted for torchtitan compatibility");
  opt2(r, p + "pin_memory", sec, sub, &DataLoaderSection::pin_memory,
       "Accepted for torchtitan compatibility (titan pins batches on GPU runs)");
  range(opt2(r, p + "prefetch_factor", sec, sub, &DataLoaderSection::prefetch_factor,
             "Accepted for torchtitan compatibility"),
        1);
}

Registry build_registry() {
  Registry r;
  using J = JobConfig;
  // [job]
  opt(r, "job.config_file", &J::job, &JobSection::config_file, "TOML job file to read first");
  opt(r, "job.dump_folder", &J::job, &JobSection::dump_folder,
      "Folder for metrics, checkpoints, traces and TensorBoard files");
  opt(r, "job.description", &J::job, &JobSection::description, "Free-form job description");
  opt(r, "job.print_config", &J::job, &JobSection::print_config,
      "Print the full resolved config at start");
  opt(r, "job.save_config_file", &J::job, &JobSection::save_config_file,
      "Write the resolved config to this file under job.dump_folder at start (as torchtitan; "
      "JSON for a .json name, as torchtitan writes it, else TOML)");
  opt(r, "job.custom_config_module", &J::job, &JobSection::custom_config_module,
      "torchtitan's Python config extension module (not available in titan: no Python)");
  opt(r, "job.use_for_integration_test", &J::job, &JobSection::use_for_integration_test,
      "torchtitan v0.1.0 test-suite marker; no effect");
  r.aliases["job.print_args"] = "job.print_config";

  // [profiling]
  opt(r, "profiling.enable_profiling", &J::profiling, &ProfilingSection::enable_profiling,
      "Write Chrome traces of profiled steps");
  opt(r, "profiling.save_traces_folder", &J::profiling, &ProfilingSection::save_traces_folder,
      "Trace folder under job.dump_folder");
  range(opt(r, "profiling.profile_freq", &J::profiling, &ProfilingSection::profile_freq,
            "Profile one window every this many steps"),
        1);
  range(opt(r, "profiling.profiler_warmup", &J::profiling, &ProfilingSection::profiler_warmup,
            "Steps of warm-up before each profiled window"),
        0);
  range(opt(r, "profiling.profiler_active", &J::profiling, &ProfilingSection::profiler_active,
            "Steps recorded per profiled window"),
        1);
  opt(r, "profiling.enable_memory_snapshot", &J::profiling,
      &ProfilingSection::enable_memory_snapshot,
      "Dump CUDA caching-allocator snapshots (and on out-of-memory)");
  opt(r, "profiling.save_memory_snapshot_folder", &J::profiling,
      &ProfilingSection::save_memory_snapshot_folder, "Memory snapshot folder under dump_folder");

  // [metrics]
  range(opt(r, "metrics.log_freq", &J::metrics, &MetricsSection::log_freq,
            "Log metrics every this many steps"),
        1);
  opt(r, "metrics.enable_tensorboard", &J::metrics, &MetricsSection::enable_tensorboard,
      "Write TensorBoard event files");
  opt(r, "metrics.disable_color_printing", &J::metrics, &MetricsSection::disable_color_printing,
      "Plain (uncolored) log output");
  opt(r, "metrics.save_tb_folder", &J::metrics, &MetricsSection::save_tb_folder,
      "TensorBoard folder under job.dump_folder");
  opt(r, "metrics.save_for_all_ranks", &J::metrics, &MetricsSection::save_for_all_ranks,
      "Write metrics files for every rank, not only rank 0");
  opt(r, "metrics.enable_wandb", &J::metrics, &MetricsSection::enable_wandb,
      "Weights & Biases logging (not available in titan)");

  // [model]
  choices(opt(r, "model.name", &J::model, &ModelSection::name, "Model family"), {"llama3"});
  opt(r, "model.flavor", &J::model, &ModelSection::flavor,
      "Model size: debugmodel, debugmodel_gqa, 1B, 3B, 8B, 70B, 405B");
  opt(r, "model.hf_assets_path", &J::model, &ModelSection::hf_assets_path,
      "Folder with tokenizer.json or tokenizer.model (and HF weights); empty: byte tokenizer");
  opt(r, "model.tokenizer_path", &J::model, &ModelSection::tokenizer_path,
      "Tokenizer file (tokenizer.json or tiktoken tokenizer.model); overrides hf_assets_path");
  opt(r, "model.converters", &J::model, &ModelSection::converters,
      "Model converters to apply, e.g. [\"float8\"]");
  opt(r, "model.print_after_conversion", &J::model, &ModelSection::print_after_conversion,
      "Print the model after converters ran");
  opt(r, "model.rope_scaling", &J::model, &ModelSection::rope_scaling,
      "Llama 3.1 RoPE frequency scaling (factor 8, original context 8192), as torchtitan and "
      "Meta's weights use; false computes plain RoPE");

  // [optimizer]
  choices(opt(r, "optimizer.name", &J::optimizer, &OptimizerSection::name, "Optimizer"),
          {"AdamW", "Adam"});
  range(opt(r, "optimizer.lr", &J::optimizer, &OptimizerSection::lr, "Peak learning rate"), 0.0,
        std::nullopt, true);
  range(opt(r, "optimizer.beta1", &J::optimizer, &OptimizerSection::beta1, "Adam beta1"), 0.0, 1.0);
  range(opt(r, "optimizer.beta2", &J::optimizer, &OptimizerSection::beta2, "Adam beta2"), 0.0, 1.0);
  range(opt(r, "optimizer.eps", &J::optimizer, &OptimizerSection::eps, "Adam epsilon"), 0.0,
        std::nullopt, true);
  range(opt(r, "optimizer.weight_decay", &J::optimizer, &OptimizerSection::weight_decay,
            "Weight decay"),
        0.0);
  choices(opt(r, "optimizer.implementation", &J::optimizer, &OptimizerSection::implementation,
              "fused (one kernel), foreach (batched ops) or for-loop"),
          {"fused", "foreach", "for-loop"});
  opt(r, "optimizer.early_step_in_backward", &J::optimizer,
      &OptimizerSection::early_step_in_backward, "Step each parameter during backward");

  // [lr_scheduler]
  range(opt(r, "lr_scheduler.warmup_steps", &J::lr_scheduler, &LrSchedulerSection::warmup_steps,
            "Linear warm-up steps"),
        0);
  range(opt(r, "lr_scheduler.total_steps", &J::lr_scheduler, &LrSchedulerSection::total_steps,
            "Steps the schedule spans (unset: training.steps); later steps keep its final lr "
            "(torchtitan's formula runs on past the end)"),
        1);
  range(opt(r, "lr_scheduler.decay_ratio", &J::lr_scheduler, &LrSchedulerSection::decay_ratio,
            "Fraction of steps spent decaying (unset: all steps after warm-up)"),
        0.0, 1.0);
  choices(opt(r, "lr_scheduler.decay_type", &J::lr_scheduler, &LrSchedulerSection::decay_type,
              "Decay shape"),
          {"linear", "sqrt", "cosine"});
  range(opt(r, "lr_scheduler.min_lr_factor", &J::lr_scheduler, &LrSchedulerSection::min_lr_factor,
            "Final lr as a fraction of the peak"),
        0.0, 1.0);
  r.aliases["lr_scheduler.lr_min"] = "lr_scheduler.min_lr_factor";

  // [training]
  opt(r, "training.dataset", &J::training, &TrainingSection::dataset,
      "Dataset name: titan_corpus (built in), or any name with training.dataset_path");
  opt(r, "training.dataset_path", &J::training, &TrainingSection::dataset_path,
      "Local text/JSONL file or folder, or titan token shards");
  opt(r, "training.dataset_text_field", &J::training, &TrainingSection::dataset_text_field,
      "JSONL field holding the document text");
  range(opt(r, "training.local_batch_size", &J::training, &TrainingSection::local_batch_size,
            "Sequences per micro-batch per data-parallel rank"),
        1);
  opt(r, "training.global_batch_size", &J::training, &TrainingSection::global_batch_size,
      "Sequences per optimizer step across ranks (-1: local x dp); more means accumulation");
  range(opt(r, "training.seq_len", &J::training, &TrainingSection::seq_len, "Sequence length"), 2);
  range(opt(r, "training.max_norm", &J::training, &TrainingSection::max_norm,
            "Gradient-norm clipping threshold (<= 0 disables clipping; in torchtitan 0 "
            "zeroes the gradients)"),
        std::nullopt);
  range(opt(r, "training.steps", &J::training, &TrainingSection::steps, "Optimizer steps"), 1);
  opt(r, "training.enable_cpu_offload", &J::training, &TrainingSection::enable_cpu_offload,
      "Keep sharded parameters and optimizer state in host memory");
  choices(opt(r, "training.mixed_precision_param", &J::training,
              &TrainingSection::mixed_precision_param, "Compute dtype of parameters on GPU"),
          {"bfloat16", "float32"});
  choices(opt(r, "training.mixed_precision_reduce", &J::training,
              &TrainingSection::mixed_precision_reduce, "Dtype of gradient reductions"),
          {"float32", "bfloat16"});
  range(opt(r, "training.gc_freq", &J::training, &TrainingSection::gc_freq,
            "Accepted for torchtitan compatibility (Python GC; nothing to do in titan)"),
        1);
  opt(r, "training.gc_debug", &J::training, &TrainingSection::gc_debug,
      "Accepted for torchtitan compatibility (Python GC debugging; nothing to do in titan)");
  choices(opt(r, "training.dtype", &J::training, &TrainingSection::dtype,
              "Dtype of parameters and optimizer state: float32 (mixed precision per "
              "mixed_precision_param); bfloat16 (pure bf16 training) is not available"),
          {"float32", "bfloat16"});
  opt(r, "training.use_cuda_graphs", &J::training, &TrainingSection::use_cuda_graphs,
      "Capture the steady-state step in a CUDA graph where shapes are static");
  opt(r, "training.fused_kernels", &J::training, &TrainingSection::fused_kernels,
      "Use titan's fused CUDA kernels (RMSNorm, RoPE, SwiGLU, cross-entropy, AdamW)");
  add_dataloader_options(r, "training", &J::training, &TrainingSection::dataloader);
  r.aliases["training.batch_size"] = "training.local_batch_size";
  r.aliases["training.seed"] = "debug.seed";
  r.aliases["training.deterministic"] = "debug.deterministic";
  r.aliases["training.data_parallel_shard_degree"] = "parallelism.data_parallel_shard_degree";
  r.aliases["training.data_parallel_replicate_degree"] =
      "parallelism.data_parallel_replicate_degree";
  r.aliases["training.tensor_parallel_degree"] = "parallelism.tensor_parallel_degree";
  r.aliases["training.compile"] = "compile.enable";

  // [parallelism]
  range(opt(r, "parallelism.data_parallel_replicate_degree", &J::parallelism,
            &ParallelismSection::data_parallel_replicate_degree,
            "Replicas (DDP / the replicate dim of HSDP)"),
        1);
  opt(r, "parallelism.data_parallel_shard_degree", &J::parallelism,
      &ParallelismSection::data_parallel_shard_degree,
      "FSDP shard degree (-1: whatever the other degrees leave of the world size)");
  choices(opt(r, "parallelism.fsdp_reshard_after_forward", &J::parallelism,
              &ParallelismSection::fsdp_reshard_after_forward,
              "Free gathered parameters after forward: default, always, never"),
          {"default", "always", "never"});
  range(opt(r, "parallelism.tensor_parallel_degree", &J::parallelism,
            &ParallelismSection::tensor_parallel_degree, "Tensor-parallel degree"),
        1);
  opt(r, "parallelism.disable_loss_parallel", &J::parallelism,
      &ParallelismSection::disable_loss_parallel, "Gather logits before the loss under TP");
  opt(r, "parallelism.enable_async_tensor_parallel", &J::parallelism,
      &ParallelismSection::enable_async_tensor_parallel, "Overlap TP communication with matmuls");
  range(opt(r, "parallelism.pipeline_parallel_degree", &J::parallelism,
            &ParallelismSection::pipeline_parallel_degree, "Pipeline stages"),
        1);
  opt(r, "parallelism.pipeline_parallel_split_points", &J::parallelism,
      &ParallelismSection::pipeline_parallel_split_points,
      "Module names where stages begin, e.g. [\"layers.4\"]");
  opt(r, "parallelism.module_fqns_per_model_part", &J::parallelism,
      &ParallelismSection::module_fqns_per_model_part,
      "Modules of each pipeline stage, e.g. [[\"tok_embeddings\", \"layers.0\"], "
      "[\"layers.1\", \"norm\", \"output\"]]");
  range(opt(r, "parallelism.pipeline_parallel_first_stage_less_layers", &J::parallelism,
            &ParallelismSection::pipeline_parallel_first_stage_less_layers,
            "Layers the embedding counts as when splitting stages"),
        0);
  range(opt(r, "parallelism.pipeline_parallel_last_stage_less_layers", &J::parallelism,
            &ParallelismSection::pipeline_parallel_last_stage_less_layers,
            "Layers the final norm + output count as when splitting stages (titan warns with "
            "a balancing value when the output projection costs more: about 3 for Llama 3 1B "
            "under full AC)"),
        0);
  range(opt(r, "parallelism.pipeline_parallel_layers_per_stage", &J::parallelism,
            &ParallelismSection::pipeline_parallel_layers_per_stage,
            "Layers per (virtual) pipeline stage (unset: 1 stage per rank, 2 for multi-stage "
            "schedules)"),
        1);
  opt(r, "parallelism.pipeline_parallel_schedule", &J::parallelism,
      &ParallelismSection::pipeline_parallel_schedule, "Pipeline schedule");
  opt(r, "parallelism.pipeline_parallel_schedule_csv", &J::parallelism,
      &ParallelismSection::pipeline_parallel_schedule_csv,
      "Read the pipeline schedule from this CSV file (one row of actions per rank)");
  range(opt(r, "parallelism.pipeline_parallel_microbatch_size", &J::parallelism,
            &ParallelismSection::pipeline_parallel_microbatch_size, "Sequences per microbatch"),
        1);
  opt(r, "parallelism.pipeline_parallel_token_slices", &J::parallelism,
      &ParallelismSection::pipeline_parallel_token_slices,
      "TeraPipe schedule: \"auto\" (slicing chosen from slice times measured at start-up) or "
      "the token slice lengths, e.g. [3072, 2048, 1536, 1536], summing to training.seq_len")
      .integer_elements = true;
  opt(r, "parallelism.pipeline_parallel_expert_parallel_overlap", &J::parallelism,
      &ParallelismSection::pipeline_parallel_expert_parallel_overlap,
      "Accepted for torchtitan compatibility (MoE only; Llama 3 has no experts)");
  range(opt(r, "parallelism.context_parallel_degree", &J::parallelism,
            &ParallelismSection::context_parallel_degree, "Context-parallel degree"),
        1);
  choices(opt(r, "parallelism.context_parallel_load_balancer", &J::parallelism,
              &ParallelismSection::context_parallel_load_balancer,
              "Causal load balancing of context parallel: headtail, ptrr, or none"),
          {"headtail", "ptrr", "none"});
  choices(opt(r, "parallelism.context_parallel_rotate_method", &J::parallelism,
              &ParallelismSection::context_parallel_rotate_method, "Ring attention rotation"),
          {"allgather", "alltoall"});
  range(opt(r, "parallelism.expert_parallel_degree", &J::parallelism,
            &ParallelismSection::expert_parallel_degree, "Expert-parallel degree (MoE)"),
        1);
  range(opt(r, "parallelism.expert_tensor_parallel_degree", &J::parallelism,
            &ParallelismSection::expert_tensor_parallel_degree,
            "Expert tensor-parallel degree (MoE)"),
        1);
  choices(opt(r, "parallelism.expert_parallel_comm_backend", &J::parallelism,
              &ParallelismSection::expert_parallel_comm_backend,
              "Expert-parallel communication backend (MoE only; no effect on Llama 3)"),
          {"standard", "deepep"});
  opt(r, "parallelism.enable_compiled_autograd", &J::parallelism,
      &ParallelismSection::enable_compiled_autograd,
      "Accepted for torchtitan compatibility; titan has no autograd to compile");
  r.aliases["experimental.pipeline_parallel_degree"] = "parallelism.pipeline_parallel_degree";
  r.aliases["experimental.pipeline_parallel_split_points"] =
      "parallelism.pipeline_parallel_split_points";
  r.aliases["experimental.pipeline_parallel_schedule"] = "parallelism.pipeline_parallel_schedule";
  r.aliases["experimental.context_parallel_degree"] = "parallelism.context_parallel_degree";
  r.aliases["experimental.enable_async_tensor_parallel"] =
      "parallelism.enable_async_tensor_parallel";

  // [checkpoint]
  opt(r, "checkpoint.enable", &J::checkpoint, &CheckpointSection::enable, "Save checkpoints");
  opt(r, "checkpoint.folder", &J::checkpoint, &CheckpointSection::folder,
      "Checkpoint folder under job.dump_folder");
  range(opt(r, "checkpoint.interval", &J::checkpoint, &CheckpointSection::interval,
            "Save every this many steps"),
        1);
  opt(r, "checkpoint.initial_load_path", &J::checkpoint, &CheckpointSection::initial_load_path,
      "Checkpoint (or HF folder) to start from when the folder has none");
  opt(r, "checkpoint.initial_load_model_only", &J::checkpoint,
      &CheckpointSection::initial_load_model_only, "Load only weights from initial_load_path");
  opt(r, "checkpoint.initial_load_in_hf", &J::checkpoint, &CheckpointSection::initial_load_in_hf,
      "Start from Hugging Face safetensors: initial_load_path, else model.hf_assets_path");
  opt(r, "checkpoint.last_save_model_only", &J::checkpoint,
      &CheckpointSection::last_save_model_only, "The final save holds only weights");
  opt(r, "checkpoint.last_save_in_hf", &J::checkpoint, &CheckpointSection::last_save_in_hf,
      "The final save is in Hugging Face format");
  choices(opt(r, "checkpoint.export_dtype", &J::checkpoint, &CheckpointSection::export_dtype,
              "Dtype of model-only saves"),
          {"float32", "bfloat16", "float16"});
  choices(opt(r, "checkpoint.async_mode", &J::checkpoint, &CheckpointSection::async_mode,
              "disabled, async, or async_with_pinned_mem"),
          {"disabled", "async", "async_with_pinned_mem"});
  opt(r, "checkpoint.keep_latest_k", &J::checkpoint, &CheckpointSection::keep_latest_k,
      "Keep this many newest checkpoints (0: all; 1 is allowed, saves being atomic, where "
      "torchtitan refuses it)");
  opt(r, "checkpoint.load_step", &J::checkpoint, &CheckpointSection::load_step,
      "Resume from this step (-1: newest complete)");
  opt(r, "checkpoint.exclude_from_loading", &J::checkpoint,
      &CheckpointSection::exclude_from_loading,
      "State not to restore: model, optimizer, lr_scheduler, dataloader, train_state");
  opt(r, "checkpoint.enable_first_step_checkpoint", &J::checkpoint,
      &CheckpointSection::enable_first_step_checkpoint, "Also save after step 1");
  opt(r, "checkpoint.create_seed_checkpoint", &J::checkpoint,
      &CheckpointSection::create_seed_checkpoint, "Write step-0 weights and exit");
  opt(r, "checkpoint.load_only", &J::checkpoint, &CheckpointSection::load_only,
      "Load checkpoints but never save one");
  opt(r, "checkpoint.allow_data_change", &J::checkpoint, &CheckpointSection::allow_data_change,
      "Resume even though the tokenizer or dataset differ from the checkpoint's (titan key)");
  opt(r, "checkpoint.allow_nonfinite_load", &J::checkpoint,
      &CheckpointSection::allow_nonfinite_load,
      "Resume from a checkpoint whose weights hold NaN/Inf (titan key)");
  opt(r, "checkpoint.initial_load_in_hf_quantized", &J::checkpoint,
      &CheckpointSection::initial_load_in_hf_quantized,
      "initial_load_path holds quantized HF weights (not available in titan)");
  opt(r, "checkpoint.enable_ft_dataloader_checkpoints", &J::checkpoint,
      &CheckpointSection::enable_ft_dataloader_checkpoints,
      "Accepted for torchtitan compatibility (fault-tolerant replicas only)");
  r.aliases["checkpoint.enable_checkpoint"] = "checkpoint.enable";
  r.aliases["checkpoint.model_weights_only"] = "checkpoint.last_save_model_only";
  r.aliases["checkpoint.last_save_model_weights_only"] = "checkpoint.last_save_model_only";
  r.aliases["checkpoint.initial_load_model_weights_only"] = "checkpoint.initial_load_model_only";

  // [activation_checkpoint]
  choices(opt(r, "activation_checkpoint.mode", &J::activation_checkpoint,
              &ActivationCheckpointSection::mode, "none, selective, full, or memory_budget"),
          {"none", "selective", "full", "memory_budget"});
  opt(r, "activation_checkpoint.selective_ac_option", &J::activation_checkpoint,
      &ActivationCheckpointSection::selective_ac_option,
      "Integer k (every k-th block) or \"op\" (recompute cheap ops only)");
  range(opt(r, "activation_checkpoint.memory_budget", &J::activation_checkpoint,
            &ActivationCheckpointSection::memory_budget,
            "memory_budget mode: fraction of the no-checkpointing activation memory to keep"),
        0.0, 1.0);
  opt(r, "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns",
      &J::activation_checkpoint,
      &ActivationCheckpointSection::per_op_sac_force_recompute_mm_shapes_by_fqns,
      "Accepted for torchtitan compatibility (MoE router shapes; Llama 3 has none)");
  opt(r, "activation_checkpoint.early_stop", &J::activation_checkpoint,
      &ActivationCheckpointSection::early_stop,
      "Accepted for torchtitan compatibility (titan recomputes only what a backward reads)");
  opt(r, "activation_checkpoint.visualize_memory_budget_pareto", &J::activation_checkpoint,
      &ActivationCheckpointSection::visualize_memory_budget_pareto,
      "torch.compile partitioner's Pareto plot (not available in titan)");
  opt(r, "activation_checkpoint.preserve_rng_state", &J::activation_checkpoint,
      &ActivationCheckpointSection::preserve_rng_state,
      "Accepted for torchtitan compatibility (titan's forward draws no random numbers, so "
      "recomputation is exact either way)");
  choices(opt(r, "activation_checkpoint.determinism_check", &J::activation_checkpoint,
              &ActivationCheckpointSection::determinism_check,
              "Accepted for torchtitan compatibility (recomputation is deterministic)"),
          {"default", "none"});
  opt(r, "activation_checkpoint.debug", &J::activation_checkpoint,
      &ActivationCheckpointSection::debug,
      "PyTorch checkpoint debug traces (not available in titan)");

  // [compile]
  opt(r, "compile.enable", &J::compile, &CompileSection::enable,
      "Accepted for torchtitan compatibility; titan is compiled ahead of time");
  opt(r, "compile.components", &J::compile, &CompileSection::components,
      "Accepted for torchtitan compatibility");
  opt(r, "compile.backend", &J::compile, &CompileSection::backend,
      "Accepted for torchtitan compatibility");

  // [quantize.linear.float8] (older spelling: [float8])
  opt(r, "quantize.linear.float8.enable_fsdp_float8_all_gather", &J::float8,
      &Float8Section::enable_fsdp_float8_all_gather, "All-gather float8 weights under FSDP");
  opt(r, "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp", &J::float8,
      &Float8Section::precompute_float8_dynamic_scale_for_fsdp,
      "One scale all-reduce for all float8 weights");
  opt(r, "quantize.linear.float8.recipe_name", &J::float8, &Float8Section::recipe_name,
      "Float8 recipe (empty: tensorwise)");
  opt(r, "quantize.linear.float8.filter_fqns", &J::float8, &Float8Section::filter_fqns,
      "Linear layers kept in high precision");
  opt(r, "quantize.linear.float8.emulate", &J::float8, &Float8Section::emulate,
      "Emulate float8 arithmetic (for tests)");
  opt(r, "quantize.linear.float8.force_recompute_fp8_weight_in_bwd", &J::float8,
      &Float8Section::force_recompute_fp8_weight_in_bwd,
      "torchtitan v0.1.0 key; accepted, no effect");
  {
    // The older switch: enable_float8_linear = true means model.converters += "float8".
    Option o;
    o.path = "quantize.linear.float8.enable_float8_linear";
    o.type = Type::Bool;
    o.hidden = true;
    o.help = "Older spelling of model.converters = [\"float8\"]";
    o.get = [](const JobConfig& c) -> Value {
      const auto& v = c.model.converters;
      return Value(std::find(v.begin(), v.end(), "float8") != v.end());
    };
    o.set = [](JobConfig& c, const Value& v) {
      auto& conv = c.model.converters;
      bool on = std::get<bool>(v);
      bool has = std::find(conv.begin(), conv.end(), "float8") != conv.end();
      if (on && !has) conv.push_back("float8");
      if (!on && has) conv.erase(std::find(conv.begin(), conv.end(), "float8"));
    };
    r.add(std::move(o));
  }
  r.section_aliases["float8"] = "quantize.linear.float8";

  // [quantize.linear.mx] (older spelling: [mx]); used only through model.converters.
  choices(opt(r, "quantize.linear.mx.mxfp8_dim1_cast_kernel_choice", &J::mx,
              &MxSection::mxfp8_dim1_cast_kernel_choice, "MX dim-1 cast kernel"),
          {"triton", "cuda", "torch"});
  opt(r, "quantize.linear.mx.recipe_name", &J::mx, &MxSection::recipe_name, "MX recipe");
  opt(r, "quantize.linear.mx.filter_fqns", &J::mx, &MxSection::filter_fqns,
      "Linear layers kept in high precision under MX");
  {
    Option o;
    o.path = "quantize.linear.mx.use_fp8_dim1_cast_triton_kernel";
    o.type = Type::Bool;
    o.hidden = true;
    o.help = "Older spelling of mxfp8_dim1_cast_kernel_choice (true: triton, false: torch)";
    o.get = [](const JobConfig& c) -> Value {
      return Value(c.mx.mxfp8_dim1_cast_kernel_choice == "triton");
    };
    o.set = [](JobConfig& c, const Value& v) {
      c.mx.mxfp8_dim1_cast_kernel_choice = std::get<bool>(v) ? "triton" : "torch";
    };
    r.add(std::move(o));
  }
  r.section_aliases["mx"] = "quantize.linear.mx";

  // [quantize.grouped_mm.*]: MoE grouped GEMMs (Llama 3 has none).
  opt(r, "quantize.grouped_mm.float8.fqns", &J::grouped_mm, &GroupedMmSection::float8_fqns,
      "MoE layers with float8 grouped GEMMs (Llama 3 has none)");
  choices(opt(r, "quantize.grouped_mm.mx.recipe_name", &J::grouped_mm,
              &GroupedMmSection::mx_recipe_name, "MX recipe of grouped GEMMs"),
          {"mxfp8"});
  opt(r, "quantize.grouped_mm.mx.fqns", &J::grouped_mm, &GroupedMmSection::mx_fqns,
      "MoE layers with MX grouped GEMMs (Llama 3 has none)");
  r.aliases["training.enable_float8_linear"] = "quantize.linear.float8.enable_float8_linear";

  // [comm]
  range(opt(r, "comm.init_timeout_seconds", &J::comm, &CommSection::init_timeout_seconds,
            "Rendezvous / first collective timeout"),
        1);
  range(opt(r, "comm.train_timeout_seconds", &J::comm, &CommSection::train_timeout_seconds,
            "Collective timeout during training (watchdog)"),
        1);
  range(opt(r, "comm.trace_buf_size", &J::comm, &CommSection::trace_buf_size,
            "Flight-recorder entries kept per rank"),
        0);
  opt(r, "comm.save_traces_folder", &J::comm, &CommSection::save_traces_folder,
      "Flight-recorder dump folder under job.dump_folder");
  opt(r, "comm.save_traces_file_prefix", &J::comm, &CommSection::save_traces_file_prefix,
      "Flight-recorder dump file prefix (<prefix><rank>.json)");
  choices(opt(r, "comm.mode", &J::comm, &CommSection::mode,
              "default; fake_backend and local_tensor are PyTorch testing modes (not available)"),
          {"default", "fake_backend", "local_tensor"});

  // [memory_estimation]
  opt(r, "memory_estimation.enable", &J::memory_estimation, &MemoryEstimationSection::enable,
      "Log this plan's per-rank memory estimate and exit before training");
  opt(r, "memory_estimation.disable_fake_mode", &J::memory_estimation,
      &MemoryEstimationSection::disable_fake_mode,
      "Accepted for torchtitan compatibility (titan estimates arithmetically)");
  r.aliases["memory_estimation.enabled"] = "memory_estimation.enable";

  // [fault_tolerance]: TorchFT (not available in titan; rejected when enabled).
  using FT = FaultToleranceSection;
  opt(r, "fault_tolerance.enable", &J::fault_tolerance, &FT::enable,
      "TorchFT fault-tolerant training (not available in titan)");
  opt(r, "fault_tolerance.process_group", &J::fault_tolerance, &FT::process_group, "TorchFT");
  opt(r, "fault_tolerance.process_group_timeout_ms", &J::fault_tolerance,
      &FT::process_group_timeout_ms, "TorchFT");
  opt(r, "fault_tolerance.replica_id", &J::fault_tolerance, &FT::replica_id, "TorchFT");
  opt(r, "fault_tolerance.group_size", &J::fault_tolerance, &FT::group_size, "TorchFT");
  opt(r, "fault_tolerance.min_replica_size", &J::fault_tolerance, &FT::min_replica_size, "TorchFT");
  opt(r, "fault_tolerance.semi_sync_method", &J::fault_tolerance, &FT::semi_sync_method,
      "TorchFT semi-synchronous training: local_sgd or diloco (not available in titan)");
  opt(r, "fault_tolerance.sync_steps", &J::fault_tolerance, &FT::sync_steps, "TorchFT");
  opt(r, "fault_tolerance.should_quantize", &J::fault_tolerance, &FT::should_quantize, "TorchFT");
  opt(r, "fault_tolerance.fragment_sync_delay", &J::fault_tolerance, &FT::fragment_sync_delay,
      "TorchFT");
  opt(r, "fault_tolerance.fragment_update_alpha", &J::fault_tolerance, &FT::fragment_update_alpha,
      "TorchFT");
  opt(r, "fault_tolerance.module_fqns_per_model_fragment", &J::fault_tolerance,
      &FT::module_fqns_per_model_fragment, "TorchFT");
  opt(r, "fault_tolerance.num_fragments", &J::fault_tolerance, &FT::num_fragments, "TorchFT");

  // [experimental]
  opt(r, "experimental.custom_import", &J::experimental, &ExperimentalSection::custom_import,
      "Python module to import (not available in titan: no Python)");
  opt(r, "experimental.custom_args_module", &J::experimental,
      &ExperimentalSection::custom_args_module,
      "torchtitan v0.1.0's config extension module (not available in titan: no Python)");

  // [validation]
  opt(r, "validation.enable", &J::validation, &ValidationSection::enable,
      "Evaluate loss on a validation set");
  r.aliases["validation.enabled"] = "validation.enable";
  opt(r, "validation.dataset", &J::validation, &ValidationSection::dataset,
      "Validation dataset name");
  opt(r, "validation.dataset_path", &J::validation, &ValidationSection::dataset_path,
      "Validation data path");
  range(opt(r, "validation.local_batch_size", &J::validation, &ValidationSection::local_batch_size,
            "Validation batch size"),
        1);
  range(opt(r, "validation.seq_len", &J::validation, &ValidationSection::seq_len,
            "Validation sequence length"),
        2);
  range(opt(r, "validation.freq", &J::validation, &ValidationSection::freq,
            "Validate at step 1 and every this many steps (as torchtitan)"),
        1);
  opt(r, "validation.steps", &J::validation, &ValidationSection::steps,
      "Validation batches per evaluation, the same first ones each time (-1: the whole "
      "validation set); torchtitan's loader goes on where the last evaluation stopped");
  add_dataloader_options(r, "validation", &J::validation, &ValidationSection::dataloader);

  // [debug]
  range(opt(r, "debug.seed", &J::debug, &DebugSection::seed,
            "Random seed (None: rank 0 draws one, logged and shared by every rank)"),
        0);
  opt(r, "debug.deterministic", &J::debug, &DebugSection::deterministic,
      "Deterministic algorithms only (ATen's deterministic mode; GPU GEMM and attention "
      "kernels chosen without timing)");
  opt(r, "debug.deterministic_warn_only", &J::debug, &DebugSection::deterministic_warn_only,
      "With debug.deterministic: warn about nondeterministic ops instead of failing");
  opt(r, "debug.moe_force_load_balance", &J::debug, &DebugSection::moe_force_load_balance,
      "Accepted for torchtitan compatibility (MoE only; Llama 3 has no experts)");
  r.aliases["training.debug_moe_force_load_balance"] = "debug.moe_force_load_balance";
  return r;
}

const Registry& registry() {
  static const Registry r = build_registry();
  return r;
}

// Where a value came from, for messages.
struct Origin {
  std::string where;  // "configs/x.toml:3:7" or "command line argument '--a.b'"
};

std::string resolve_alias(const std::string& path, const Registry& r) {
  if (auto it = r.aliases.find(path); it != r.aliases.end()) return it->second;
  for (const auto& [old_sec, new_sec] : r.section_aliases) {
    if (path.rfind(old_sec + ".", 0) == 0) return new_sec + path.substr(old_sec.size());
  }
  return path;
}

std::string suggestion(const std::string& path, const Registry& r) {
  std::vector<std::string> names;
  for (const auto& o : r.options) names.push_back(o.path);
  for (const auto& [a, _] : r.aliases) names.push_back(a);
  std::string best = util::nearest(path, names);
  return best.empty() ? std::string() : "; did you mean " + best + "?";
}

std::string unknown_key_message(const std::string& path, const Origin& origin) {
  return "unknown key " + path + " (" + origin.where + ")" + suggestion(path, registry());
}

[[noreturn]] void unknown_key(const std::string& path, const Origin& origin) {
  fail(unknown_key_message(path, origin));
}

std::string format_number(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

void check_value(const Option& o, const Value& v, const Origin& origin) {
  auto bad = [&](const std::string& what) { fail(o.path, ": ", what, " (", origin.where, ")"); };
  std::optional<double> num;
  if (auto* i = std::get_if<int64_t>(&v)) num = static_cast<double>(*i);
  if (auto* oi = std::get_if<std::optional<int64_t>>(&v); oi && oi->has_value()) {
    num = static_cast<double>(**oi);
  }
  if (auto* d = std::get_if<double>(&v)) num = *d;
  if (auto* od = std::get_if<std::optional<double>>(&v); od && od->has_value()) num = **od;
  if (num) {
    if (std::isnan(*num)) bad("expected a number, got nan");
    bool low = o.min && (o.min_exclusive ? *num <= *o.min : *num < *o.min);
    bool high = o.max && *num > *o.max;
    if (low || high) {
      std::string expect;
      if (o.min && o.max) {
        expect = "in [" + format_number(*o.min) + ", " + format_number(*o.max) + "]";
      } else if (o.min) {
        expect = std::string(o.min_exclusive ? "> " : ">= ") + format_number(*o.min);
      } else {
        expect = "<= " + format_number(*o.max);
      }
      bad("value " + format_number(*num) + " is out of range: expected " + expect);
    }
  }
  if (!o.choices.empty()) {
    std::vector<std::string> items;
    if (auto* s = std::get_if<std::string>(&v)) items.push_back(*s);
    if (auto* l = std::get_if<std::vector<std::string>>(&v)) items = *l;
    for (const auto& item : items) {
      if (std::find(o.choices.begin(), o.choices.end(), item) == o.choices.end()) {
        std::string list = util::join(o.choices, ", ");
        std::string near = util::nearest(item, o.choices);
        bad("\"" + item + "\" is not one of: " + list +
            (near.empty() ? "" : "; did you mean \"" + near + "\"?"));
      }
    }
  }
}

// ---- values from TOML ----

std::string where_in(const toml::node& node, const std::string& source) {
  const auto& b = node.source().begin;
  return source + ":" + std::to_string(b.line) + ":" + std::to_string(b.column);
}

std::string toml_kind(const toml::node& n) {
  if (n.is_boolean()) return "boolean";
  if (n.is_integer()) return "integer";
  if (n.is_floating_point()) return "float";
  if (n.is_string()) return "string";
  if (n.is_array()) return "array";
  if (n.is_table()) return "table";
  return "date/time";
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::string t = text;
  if (!t.empty() && t.front() == '[' && t.back() == ']') t = t.substr(1, t.size() - 2);
  for (auto& part : util::split(t, ',')) {
    std::string item = util::trim(part);
    if (item.size() >= 2 && (item.front() == '"' || item.front() == '\'') &&
        item.back() == item.front()) {
      item = item.substr(1, item.size() - 2);
    }
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

std::vector<std::string> strings_of(const Option& o, const toml::array& arr, const Origin& origin) {
  std::vector<std::string> out;
  for (const auto& el : arr) {
    if (auto s = el.value_exact<std::string>()) {
      out.push_back(*s);
    } else if (auto i = el.value_exact<int64_t>(); i && o.integer_elements) {
      out.push_back(std::to_string(*i));
    } else {
      fail(o.path, ": expected ", type_name(o.type), ", found a ", toml_kind(el), " element (",
           origin.where, ")");
    }
  }
  return out;
}

Value value_from_toml(const Option& o, const toml::node& n, const Origin& origin) {
  auto wrong = [&]() -> Value {
    fail(o.path, ": expected ", type_name(o.type), ", got ", toml_kind(n), " (", origin.where, ")");
  };
  switch (o.type) {
    case Type::Bool:
      if (auto b = n.value_exact<bool>()) return *b;
      return wrong();
    case Type::Int:
      if (auto i = n.value_exact<int64_t>()) return *i;
      return wrong();
    case Type::OptInt:
      if (auto i = n.value_exact<int64_t>()) return std::optional<int64_t>(*i);
      if (auto s = n.value_exact<std::string>(); s && util::lower(*s) == "none")
        return std::optional<int64_t>();
      return wrong();
    case Type::Float:
      if (auto d = n.value_exact<double>()) return *d;
      if (auto i = n.value_exact<int64_t>()) return static_cast<double>(*i);
      return wrong();
    case Type::OptFloat:
      if (auto d = n.value_exact<double>()) return std::optional<double>(*d);
      if (auto i = n.value_exact<int64_t>()) return std::optional<double>(static_cast<double>(*i));
      if (auto s = n.value_exact<std::string>(); s && util::lower(*s) == "none")
        return std::optional<double>();
      return wrong();
    case Type::String:
      if (auto s = n.value_exact<std::string>()) return *s;
      // Integers are accepted where torchtitan writes numbers as strings (selective_ac_option).
      if (auto i = n.value_exact<int64_t>()) return std::to_string(*i);
      return wrong();
    case Type::StringList: {
      // A plain string is a comma-separated list, as torchtitan's command line writes lists.
      if (auto s = n.value_exact<std::string>()) return split_list(*s);
      const toml::array* arr = n.as_array();
      if (!arr) return wrong();
      return strings_of(o, *arr, origin);
    }
    case Type::StringListList: {
      const toml::array* arr = n.as_array();
      if (!arr) return wrong();
      std::vector<std::vector<std::string>> out;
      for (const auto& el : *arr) {
        const toml::array* inner = el.as_array();
        if (!inner) {
          fail(o.path, ": expected a list of lists of strings, found a ", toml_kind(el),
               " element (", origin.where, ")");
        }
        out.push_back(strings_of(o, *inner, origin));
      }
      return out;
    }
  }
  return wrong();
}

// Sets every known key of `table`; the messages for unknown ones go to `unknown` (so a file
// with several is reported whole, as torchtitan does).
void walk_table(JobConfig& config, const toml::table& table, const std::string& prefix,
                const std::string& source, std::vector<std::string>& unknown) {
  const Registry& r = registry();
  for (const auto& [key, node] : table) {
    std::string path =
        prefix.empty() ? std::string(key.str()) : prefix + "." + std::string(key.str());
    Origin origin{where_in(node, source)};
    std::string resolved = resolve_alias(path, r);
    const Option* o = r.find(resolved);
    if (!o && node.is_table()) {
      walk_table(config, *node.as_table(), path, source, unknown);
      continue;
    }
    if (!o) {
      unknown.push_back(unknown_key_message(path, origin));
      continue;
    }
    Value v = value_from_toml(*o, node, origin);
    check_value(*o, v, origin);
    o->set(config, v);
  }
}

// ---- values from the command line ----

std::optional<bool> parse_bool(const std::string& s) {
  std::string l = util::lower(s);
  if (l == "true" || l == "1" || l == "yes" || l == "on") return true;
  if (l == "false" || l == "0" || l == "no" || l == "off") return false;
  return std::nullopt;
}

Value value_from_string(const Option& o, const std::string& text, const Origin& origin) {
  auto wrong = [&]() -> Value {
    fail(o.path, ": expected ", type_name(o.type), ", got \"", text, "\" (", origin.where, ")");
  };
  switch (o.type) {
    case Type::Bool:
      if (auto b = parse_bool(text)) return *b;
      return wrong();
    case Type::Int: {
      int64_t v = 0;
      if (util::parse_int(text, v)) return v;
      return wrong();
    }
    case Type::OptInt: {
      if (util::lower(text) == "none" || text.empty()) return std::optional<int64_t>();
      int64_t v = 0;
      if (util::parse_int(text, v)) return std::optional<int64_t>(v);
      return wrong();
    }
    case Type::Float: {
      double v = 0;
      if (util::parse_double(text, v)) return v;
      return wrong();
    }
    case Type::OptFloat: {
      if (util::lower(text) == "none" || text.empty()) return std::optional<double>();
      double v = 0;
      if (util::parse_double(text, v)) return std::optional<double>(v);
      return wrong();
    }
    case Type::String: return text;
    case Type::StringList: return split_list(text);
    case Type::StringListList: {
      // TOML's array syntax: [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]
      toml::table t;
      try {
        t = toml::parse("v = " + text, origin.where);
      } catch (const toml::parse_error&) {
        fail(o.path,
             ": expected a list of lists of strings such as [[\"a\", \"b\"], [\"c\"]], got \"",
             text, "\" (", origin.where, ")");
      }
      return value_from_toml(o, *t.get("v"), origin);
    }
  }
  return wrong();
}

struct CliOverride {
  std::string path;  // as written, normalized ('-' -> '_')
  std::optional<std::string> value;
  std::string arg;  // original spelling, for messages
};

std::vector<CliOverride> parse_cli(const std::vector<std::string>& args) {
  const Registry& r = registry();
  std::vector<CliOverride> out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0 || a.size() <= 2) {
      fail("unexpected command line argument '", a, "': options look like --section.key value");
    }
    std::string body = a.substr(2);
    CliOverride ov;
    ov.arg = a;
    if (auto eq = body.find('='); eq != std::string::npos) {
      ov.path = body.substr(0, eq);
      ov.value = body.substr(eq + 1);
    } else {
      ov.path = body;
    }
    std::replace(ov.path.begin(), ov.path.end(), '-', '_');
    // torchtitan's (tyro's) way to switch a boolean off: --section.no_key / --section.no-key.
    if (const size_t dot = ov.path.rfind('.'); dot != std::string::npos &&
                                               ov.path.compare(dot + 1, 3, "no_") == 0 &&
                                               !r.find(resolve_alias(ov.path, r))) {
      const std::string positive = ov.path.substr(0, dot + 1) + ov.path.substr(dot + 4);
      const Option* o = r.find(resolve_alias(positive, r));
      if (o && o->type == Type::Bool) {
        if (ov.value) {
          fail("command line argument '", a, "': a --section.no_key flag takes no value (write --",
               positive, " false, or --", positive, "=false)");
        }
        ov.path = positive;
        ov.value = "false";
        out.push_back(ov);
        continue;
      }
    }
    if (!ov.value) {
      const Option* o = r.find(resolve_alias(ov.path, r));
      bool is_bool = o && o->type == Type::Bool;
      bool next_is_value = i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0;
      if (is_bool) {
        // Bare flag means true; an explicit true/false may follow.
        if (next_is_value && parse_bool(args[i + 1])) ov.value = args[++i];
      } else if (i + 1 < args.size()) {
        ov.value = args[++i];
      } else if (o) {
        fail(ov.path, ": expected ", type_name(o->type), " after '", a,
             "', but the command line ends there");
      }
    }
    out.push_back(ov);
  }
  return out;
}

void apply_override(JobConfig& config, const CliOverride& ov) {
  const Registry& r = registry();
  Origin origin{"command line argument '" + ov.arg + "'"};
  const Option* o = r.find(resolve_alias(ov.path, r));
  if (!o) unknown_key(ov.path, origin);
  Value v = ov.value ? value_from_string(*o, *ov.value, origin) : Value(true);
  check_value(*o, v, origin);
  o->set(config, v);
}

// ---- printing ----

std::string toml_value(const Value& v) {
  struct {
    std::string operator()(bool b) const { return b ? "true" : "false"; }
    std::string operator()(int64_t i) const { return std::to_string(i); }
    std::string operator()(const std::optional<int64_t>& i) const {
      return i ? std::to_string(*i) : "\"none\"";
    }
    std::string operator()(double d) const {
      // The shortest text that reads back as the same double (8e-4, not
      // 0.00080000000000000004).
      std::array<char, 64> buf{};
      const auto res = std::to_chars(buf.data(), buf.data() + buf.size(), d);
      std::string t(buf.data(), res.ptr);
      if (t.find_first_of(".eEn") == std::string::npos) t += ".0";
      return t;
    }
    std::string operator()(const std::optional<double>& d) const {
      return d ? (*this)(*d) : "\"none\"";
    }
    std::string operator()(const std::string& s) const { return util::quote(s); }
    std::string operator()(const std::vector<std::string>& l) const {
      std::vector<std::string> q;
      for (const auto& s : l) q.push_back(util::quote(s));
      return "[" + util::join(q, ", ") + "]";
    }
    std::string operator()(const std::vector<std::vector<std::string>>& ll) const {
      std::vector<std::string> q;
      for (const auto& l : ll) q.push_back((*this)(l));
      return "[" + util::join(q, ", ") + "]";
    }
  } visitor;
  return std::visit(visitor, v);
}

std::string section_of(const std::string& path) {
  return path.substr(0, path.rfind('.'));
}
std::string key_of(const std::string& path) {
  return path.substr(path.rfind('.') + 1);
}

}  // namespace

void apply_toml(JobConfig& config, const std::string& toml_text, const std::string& source_name) {
  toml::table table;
  try {
    table = toml::parse(toml_text, source_name);
  } catch (const toml::parse_error& e) {
    const auto& b = e.source().begin;
    fail(source_name, ":", b.line, ":", b.column, ": malformed TOML: ", e.description());
  }
  std::vector<std::string> unknown;
  walk_table(config, table, "", source_name, unknown);
  if (!unknown.empty()) fail(util::join(unknown, "\n"));
}

void apply_cli(JobConfig& config, const std::vector<std::string>& args) {
  for (const auto& ov : parse_cli(args)) apply_override(config, ov);
}

JobConfig load_job_config(const std::vector<std::string>& args) {
  JobConfig config;
  std::vector<CliOverride> overrides = parse_cli(args);
  // The config file applies first, whatever its position on the command line.
  for (const auto& ov : overrides) {
    if (ov.path != "job.config_file") continue;
    const std::string before = config.job.config_file;
    apply_override(config, ov);
    TITAN_CHECK(before.empty() || before == config.job.config_file,
                "job.config_file: given twice ('", before, "' and '", config.job.config_file,
                "'); a job reads one TOML file, the command line overrides its keys");
  }
  if (!config.job.config_file.empty()) {
    const std::string file = config.job.config_file;
    std::ifstream in(file);
    TITAN_CHECK(!util::is_directory(file), "job.config_file: '", file,
                "' is a directory; expected a TOML job file");
    TITAN_CHECK(in.good(), "job.config_file: cannot open '", file, "'", util::relative_note(file));
    std::stringstream buf;
    buf << in.rdbuf();
    config.job.config_file.clear();
    apply_toml(config, buf.str(), file);
    TITAN_CHECK(config.job.config_file.empty(), file, ": [job] config_file = '",
                config.job.config_file,
                "': a job file cannot name another job file (only the command line's "
                "--job.config_file is read); remove the key");
    config.job.config_file = file;
  }
  for (const auto& ov : overrides) apply_override(config, ov);
  validate(config);
  return config;
}

void validate(const JobConfig& c) {
  // Flavor names live with the model; list them in the message.
  const auto flavors = model::llama_flavor_names();
  if (std::find(flavors.begin(), flavors.end(), c.model.flavor) == flavors.end()) {
    std::string near = util::nearest(c.model.flavor, flavors);
    fail("model.flavor: unknown flavor \"", c.model.flavor, "\"; expected one of ",
         util::join(flavors, ", "), near.empty() ? "" : "; did you mean \"" + near + "\"?");
  }
  const auto& ac = c.activation_checkpoint;
  if (ac.mode == "selective" && ac.selective_ac_option != "op") {
    int64_t k = 0;
    TITAN_CHECK(util::parse_int(ac.selective_ac_option, k) && k >= 1,
                "activation_checkpoint.selective_ac_option: expected a positive integer or "
                "\"op\", got \"",
                ac.selective_ac_option, "\"");
  }
  const auto& t = c.training;
  TITAN_CHECK(t.global_batch_size == -1 || t.global_batch_size >= 1,
              "training.global_batch_size: expected -1 or a positive integer, got ",
              t.global_batch_size);
  TITAN_CHECK(c.parallelism.data_parallel_shard_degree == -1 ||
                  c.parallelism.data_parallel_shard_degree >= 1,
              "parallelism.data_parallel_shard_degree: expected -1 or a positive integer, got ",
              c.parallelism.data_parallel_shard_degree);
  TITAN_CHECK(c.validation.steps == -1 || c.validation.steps >= 1,
              "validation.steps: expected -1 or a positive integer, got ", c.validation.steps);
  TITAN_CHECK(c.checkpoint.keep_latest_k >= 0, "checkpoint.keep_latest_k: expected >= 0, got ",
              c.checkpoint.keep_latest_k);
  TITAN_CHECK(c.checkpoint.load_step >= -1,
              "checkpoint.load_step: expected -1 or a step >= 0, got ", c.checkpoint.load_step);
  TITAN_CHECK(!c.metrics.enable_wandb,
              "metrics.enable_wandb: Weights & Biases is not available in titan (no Python); "
              "use metrics.enable_tensorboard = true");
  if (c.optimizer.early_step_in_backward) {
    // Each unit steps before the other units' gradients exist, so nothing global may scale
    // the update (torchtitan refuses pipelines too).
    TITAN_CHECK(c.training.max_norm <= 0,
                "optimizer.early_step_in_backward steps each unit "
                "before the global gradient norm is known, so it cannot clip; set "
                "training.max_norm = 0 (no clipping; it is ",
                c.training.max_norm, ") or turn early_step_in_backward off");
    TITAN_CHECK(c.parallelism.pipeline_parallel_degree <= 1,
                "optimizer.early_step_in_backward is not supported with pipeline parallelism "
                "(parallelism.pipeline_parallel_degree = ",
                c.parallelism.pipeline_parallel_degree, "), as in torchtitan");
    TITAN_CHECK(!c.training.enable_cpu_offload,
                "optimizer.early_step_in_backward with training.enable_cpu_offload: offloaded "
                "gradients are accumulated on the host after the backward; turn one of them off");
  }
  for (const auto& conv : c.model.converters) {
    if (conv == "float8" || conv == "quantize.linear.float8") continue;
    if (conv == "mx" || conv == "quantize.linear.mx") {
      fail("model.converters: \"", conv,
           "\" (MX-format training) is not available in titan; it needs Blackwell GPUs");
    }
    if (conv == "quantize.grouped_mm.float8" || conv == "quantize.grouped_mm.mx") {
      fail("model.converters: \"", conv,
           "\" quantizes MoE grouped GEMMs, and Llama 3 has no experts; remove it");
    }
    fail("model.converters: unknown converter \"", conv,
         "\"; titan knows \"quantize.linear.float8\" (also spelled \"float8\")");
  }
  {
    const auto& f = c.float8;
    const std::string& r = f.recipe_name;
    TITAN_CHECK(r.empty() || r == "tensorwise" || r == "rowwise" || r == "rowwise_with_gw_hp",
                "quantize.linear.float8.recipe_name: unknown recipe \"", r,
                "\"; expected \"tensorwise\" (default), \"rowwise\" or \"rowwise_with_gw_hp\"");
    const bool tensorwise = r.empty() || r == "tensorwise";
    TITAN_CHECK(tensorwise || !f.enable_fsdp_float8_all_gather,
                "quantize.linear.float8.enable_fsdp_float8_all_gather applies to the tensorwise "
                "recipe only (recipe_name is \"",
                r, "\"), as in torchtitan");
    TITAN_CHECK(tensorwise || !f.precompute_float8_dynamic_scale_for_fsdp,
                "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp applies to the "
                "tensorwise recipe only (recipe_name is \"",
                r, "\"), as in torchtitan");
    TITAN_CHECK(!f.precompute_float8_dynamic_scale_for_fsdp || f.enable_fsdp_float8_all_gather,
                "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp needs "
                "enable_fsdp_float8_all_gather = true");
    for (const auto& fqn : f.filter_fqns) {
      TITAN_CHECK(fqn.find("layers.") == std::string::npos,
                  "quantize.linear.float8.filter_fqns: \"", fqn,
                  "\" names layers; titan converts a projection in every block or in none, so "
                  "entries name module kinds (\"output\", \"attention.wo\", \"feed_forward\", "
                  "\"auto_filter_small_kn\", ...)");
    }
  }
  // Keys titan accepts for torchtitan compatibility but whose feature it lacks: an error names
  // the feature instead of silently ignoring the request.
  auto lacks = [](bool asked, const std::string& key, const std::string& why) {
    if (asked) fail(key, ": ", why);
  };
  lacks(!c.job.custom_config_module.empty(), "job.custom_config_module",
        "extending the config with a Python module is not available in titan (no Python); "
        "remove the key");
  lacks(!c.experimental.custom_import.empty(), "experimental.custom_import",
        "importing Python modules is not available in titan (no Python); remove the key");
  lacks(!c.experimental.custom_args_module.empty(), "experimental.custom_args_module",
        "extending the config with a Python module is not available in titan (no Python); "
        "remove the key");
  lacks(c.training.dtype == "bfloat16", "training.dtype",
        "\"bfloat16\" (pure bf16 training, no fp32 master weights) is not available in titan; "
        "titan keeps fp32 master weights and computes in bf16 "
        "(training.mixed_precision_param = \"bfloat16\")");
  if (c.checkpoint.initial_load_in_hf && c.checkpoint.initial_load_path.empty() &&
      c.model.hf_assets_path.empty()) {
    fail(
        "checkpoint.initial_load_in_hf = true: set checkpoint.initial_load_path (or "
        "model.hf_assets_path) to the Hugging Face folder to load");
  }
  lacks(c.checkpoint.initial_load_in_hf_quantized, "checkpoint.initial_load_in_hf_quantized",
        "loading quantized Hugging Face checkpoints is not available in titan");
  lacks(c.activation_checkpoint.visualize_memory_budget_pareto,
        "activation_checkpoint.visualize_memory_budget_pareto",
        "the Pareto plot of torch.compile's partitioner is not available in titan");
  lacks(c.activation_checkpoint.debug, "activation_checkpoint.debug",
        "PyTorch's checkpoint debug traces are not available in titan (its recomputation is "
        "explicit: see activation_checkpoint.mode)");
  lacks(c.comm.mode != "default", "comm.mode",
        "\"" + c.comm.mode + "\" is a PyTorch testing mode, not available in titan");
  lacks(c.fault_tolerance.enable, "fault_tolerance.enable",
        "fault-tolerant training (TorchFT) is not available in titan");
  lacks(!c.fault_tolerance.semi_sync_method.empty(), "fault_tolerance.semi_sync_method",
        "semi-synchronous training (TorchFT local_sgd / diloco) is not available in titan");
  lacks(!c.grouped_mm.float8_fqns.empty(), "quantize.grouped_mm.float8.fqns",
        "float8 MoE grouped GEMMs: Llama 3 has no experts");
  lacks(!c.grouped_mm.mx_fqns.empty(), "quantize.grouped_mm.mx.fqns",
        "MX MoE grouped GEMMs: Llama 3 has no experts");
  lacks(c.parallelism.expert_tensor_parallel_degree != 1,
        "parallelism.expert_tensor_parallel_degree",
        "expert tensor parallelism needs experts, and Llama 3 has none; set it to 1");
  const auto& p = c.parallelism;
  auto unsupported = [](const char* key, int64_t v, const char* what) {
    fail("parallelism.", key, " = ", v, ": ", what,
         " is not available in this titan release yet; set it to 1");
  };
  if (p.expert_parallel_degree != 1)
    unsupported("expert_parallel_degree", p.expert_parallel_degree,
                "expert parallelism (Llama 3 has no experts)");
}

std::string to_toml(const JobConfig& config) {
  const Registry& r = registry();
  std::ostringstream out;
  std::string current;
  for (const auto& o : r.options) {
    if (o.hidden) continue;
    std::string sec = section_of(o.path);
    if (sec != current) {
      out << (current.empty() ? "" : "\n") << "[" << sec << "]\n";
      current = sec;
    }
    out << key_of(o.path) << " = " << toml_value(o.get(config)) << "\n";
  }
  return out.str();
}

std::string to_json(const JobConfig& config) {
  struct {
    nlohmann::json operator()(bool b) const { return b; }
    nlohmann::json operator()(int64_t i) const { return i; }
    nlohmann::json operator()(const std::optional<int64_t>& i) const {
      return i ? nlohmann::json(*i) : nlohmann::json(nullptr);
    }
    nlohmann::json operator()(double d) const { return d; }
    nlohmann::json operator()(const std::optional<double>& d) const {
      return d ? nlohmann::json(*d) : nlohmann::json(nullptr);
    }
    nlohmann::json operator()(const std::string& s) const { return s; }
    nlohmann::json operator()(const std::vector<std::string>& l) const { return l; }
    nlohmann::json operator()(const std::vector<std::vector<std::string>>& ll) const { return ll; }
  } visitor;
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& o : registry().options) {
    if (o.hidden) continue;
    nlohmann::ordered_json* node = &out;
    for (const auto& part : util::split(section_of(o.path), '.')) node = &(*node)[part];
    (*node)[key_of(o.path)] = std::visit(visitor, o.get(config));
  }
  return out.dump(2) + "\n";
}

std::string markdown_reference() {
  const Registry& r = registry();
  JobConfig defaults;
  std::ostringstream out;
  out << "# titan job configuration reference\n\n"
         "Generated by `titan_train --help-markdown`; a test keeps it current. Every key can be\n"
         "set in the TOML job file (`[section]` then `key = value`) or on the command line as\n"
         "`--section.key value`, `--section.key=value`, a bare `--section.flag` for true, or\n"
         "`--section.no_flag` for false.\n";
  std::string current;
  for (const auto& o : r.options) {
    if (o.hidden) continue;
    std::string sec = section_of(o.path);
    if (sec != current) {
      out << "\n## [" << sec << "]\n\n| key | type | default | meaning |\n|---|---|---|---|\n";
      current = sec;
    }
    std::string help = o.help;
    if (!o.choices.empty()) help += " (one of: " + util::join(o.choices, ", ") + ")";
    std::string def = toml_value(o.get(defaults));
    std::replace(def.begin(), def.end(), '|', '/');
    out << "| `" << key_of(o.path) << "` | " << type_name(o.type) << " | `" << def << "` | " << help
        << " |\n";
  }
  out << "\n## Older spellings accepted\n\n| old | new |\n|---|---|\n";
  for (const auto& [a, b] : r.aliases) out << "| `" << a << "` | `" << b << "` |\n";
  for (const auto& o : r.options) {
    if (o.hidden) out << "| `" << o.path << "` | " << o.help << " |\n";
  }
  for (const auto& [a, b] : r.section_aliases) out << "| `[" << a << "]` | `[" << b << "]` |\n";
  return out.str();
}

std::string help_text() {
  const Registry& r = registry();
  JobConfig defaults;
  std::ostringstream out;
  out << "usage: titan_train [--job.config_file FILE.toml] [--section.key VALUE ...]\n"
         "       titan_train convert --to hf|titan --input DIR --output DIR [--dtype D]\n"
         "       titan_train schedule --pp P --microbatches M --schedule NAME [...]\n"
         "       titan_train --help | convert --help | schedule --help\n\n"
         "Every option below can be set in the TOML file or overridden on the command line\n"
         "(--section.key value, --section.key=value, a bare --section.flag for true, or\n"
         "--section.no_flag for false).\n";
  std::string current;
  for (const auto& o : r.options) {
    if (o.hidden) continue;
    std::string sec = section_of(o.path);
    if (sec != current) {
      out << "\n[" << sec << "]\n";
      current = sec;
    }
    out << "  --" << o.path << " (" << type_name(o.type) << ", default "
        << toml_value(o.get(defaults)) << ")\n      " << o.help;
    if (!o.choices.empty()) out << " {" << util::join(o.choices, ", ") << "}";
    out << "\n";
  }
  out << "\nOlder spellings accepted:";
  for (const auto& [a, b] : r.aliases) out << "\n  " << a << " -> " << b;
  for (const auto& o : r.options) {
    if (o.hidden) out << "\n  " << o.path << ": " << o.help;
  }
  for (const auto& [a, b] : r.section_aliases) out << "\n  [" << a << "] -> [" << b << "]";
  out << "\n";
  return out.str();
}

}  // namespace titan::config
