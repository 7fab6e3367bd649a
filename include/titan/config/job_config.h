// JobConfig: every option of a titan job, grouped in torchtitan's TOML sections, with
// torchtitan's defaults. Filled by load_job_config() from a TOML file and CLI overrides.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace titan::config {

struct JobSection {
  std::string config_file;
  std::string dump_folder = "./outputs";
  std::string description = "titan training job";
  bool print_config = false;
  std::string save_config_file;           // the resolved config, under dump_folder (.json: JSON)
  std::string custom_config_module;       // torchtitan's Python config extension (rejected if set)
  bool use_for_integration_test = false;  // torchtitan v0.1.0 test-suite marker (no effect)
};

struct ProfilingSection {
  bool enable_profiling = false;
  std::string save_traces_folder = "profile_traces";
  int64_t profile_freq = 10;
  int64_t profiler_warmup = 3;
  int64_t profiler_active = 1;
  bool enable_memory_snapshot = false;
  std::string save_memory_snapshot_folder = "memory_snapshot";
};

struct MetricsSection {
  int64_t log_freq = 10;
  bool enable_tensorboard = false;
  bool disable_color_printing = false;
  std::string save_tb_folder = "tb";
  bool save_for_all_ranks = false;
  bool enable_wandb = false;
};

struct ModelSection {
  std::string name = "llama3";
  std::string flavor = "debugmodel";
  // Folder with tokenizer.json / tokenizer.model (and HF weights); empty = byte tokenizer.
  std::string hf_assets_path;
  std::string tokenizer_path;
  std::vector<std::string> converters;
  bool print_after_conversion = false;
  // Llama 3.1 RoPE frequency scaling (factor 8, low/high frequency factors 1/4, original
  // context 8192), as torchtitan >= v0.2.0 and Meta's Llama 3.1 weights use. titan key.
  bool rope_scaling = true;
};

struct OptimizerSection {
  std::string name = "AdamW";
  double lr = 8e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  std::string implementation = "fused";
  bool early_step_in_backward = false;
};

struct LrSchedulerSection {
  int64_t warmup_steps = 200;
  std::optional<int64_t> total_steps;  // unset: training.steps
  std::optional<double> decay_ratio;   // unset: decay over all steps after warm-up
  std::string decay_type = "linear";
  double min_lr_factor = 0.0;
};

// torchtitan's DataLoader options; titan loads on one background thread per process.
struct DataLoaderSection {
  int64_t num_workers = 0;
  bool persistent_workers = false;
  bool pin_memory = false;
  std::optional<int64_t> prefetch_factor;
};

struct TrainingSection {
  std::string dataset = "titan_corpus";
  std::string dataset_path;
  std::string dataset_text_field = "text";
  int64_t local_batch_size = 8;
  int64_t global_batch_size = -1;
  int64_t seq_len = 2048;
  double max_norm = 1.0;
  int64_t steps = 10000;
  bool enable_cpu_offload = false;
  std::string mixed_precision_param = "bfloat16";
  std::string mixed_precision_reduce = "float32";
  int64_t gc_freq = 50;
  bool gc_debug = false;
  std::string dtype = "float32";  // "bfloat16": pure bf16 training (rejected)
  bool use_cuda_graphs = true;
  bool fused_kernels = true;
  DataLoaderSection dataloader;
};

struct ParallelismSection {
  int64_t data_parallel_replicate_degree = 1;
  int64_t data_parallel_shard_degree = -1;
  std::string fsdp_reshard_after_forward = "default";
  int64_t tensor_parallel_degree = 1;
  bool disable_loss_parallel = false;
  bool enable_async_tensor_parallel = false;
  int64_t pipeline_parallel_degree = 1;
  std::vector<std::string> pipeline_parallel_split_points;
  std::vector<std::vector<std::string>> module_fqns_per_model_part;
  int64_t pipeline_parallel_first_stage_less_layers = 1;
  int64_t pipeline_parallel_last_stage_less_layers = 1;
  std::optional<int64_t> pipeline_parallel_layers_per_stage;
  std::string pipeline_parallel_schedule = "1F1B";
  std::string pipeline_parallel_schedule_csv;
  int64_t pipeline_parallel_microbatch_size = 1;
  // TeraPipe: "auto" (slices chosen by the dynamic program from measured slice times) or the
  // slice lengths in tokens, summing to training.seq_len.
  std::vector<std::string> pipeline_parallel_token_slices = {"auto"};
  bool pipeline_parallel_expert_parallel_overlap = true;
  int64_t context_parallel_degree = 1;
  std::string context_parallel_load_balancer = "headtail";  // "none": no load balancing
  std::string context_parallel_rotate_method = "allgather";
  int64_t expert_parallel_degree = 1;
  int64_t expert_tensor_parallel_degree = 1;
  std::string expert_parallel_comm_backend = "standard";
  bool enable_compiled_autograd = false;
};

struct CheckpointSection {
  bool enable = false;
  std::string folder = "checkpoint";
  int64_t interval = 500;
  std::string initial_load_path;
  bool initial_load_model_only = true;
  bool initial_load_in_hf = false;
  bool last_save_model_only = true;
  bool last_save_in_hf = false;
  std::string export_dtype = "float32";
  std::string async_mode = "disabled";
  int64_t keep_latest_k = 10;
  int64_t load_step = -1;
  std::vector<std::string> exclude_from_loading;
  bool enable_first_step_checkpoint = false;
  bool create_seed_checkpoint = false;
  bool load_only = false;             // load, never save
  bool allow_data_change = false;     // resume with another tokenizer or dataset
  bool allow_nonfinite_load = false;  // resume from weights holding NaN/Inf
  bool initial_load_in_hf_quantized = false;
  bool enable_ft_dataloader_checkpoints = true;
};

struct ActivationCheckpointSection {
  std::string mode = "selective";
  std::string selective_ac_option = "2";  // an integer k (every k-th block) or "op"
  double memory_budget = 0.5;
  std::vector<std::string> per_op_sac_force_recompute_mm_shapes_by_fqns = {"moe.router.gate"};
  bool early_stop = false;
  bool visualize_memory_budget_pareto = false;
  bool preserve_rng_state = true;
  std::string determinism_check = "default";
  bool debug = false;
};

struct CompileSection {
  bool enable = false;
  std::vector<std::string> components = {"model", "loss"};
  std::string backend = "inductor";
};

struct Float8Section {
  bool enable_fsdp_float8_all_gather = false;
  bool precompute_float8_dynamic_scale_for_fsdp = false;
  std::string recipe_name;
  std::vector<std::string> filter_fqns = {"output"};
  bool emulate = false;
  bool force_recompute_fp8_weight_in_bwd = false;  // torchtitan v0.1.0 (no effect)
};

// [quantize.linear.mx]: MX formats need Blackwell GPUs; accepted, used only via converters.
struct MxSection {
  std::string mxfp8_dim1_cast_kernel_choice = "triton";
  std::string recipe_name = "mxfp8_cublas";
  std::vector<std::string> filter_fqns = {"output"};
};

// [quantize.grouped_mm.*]: MoE grouped GEMMs (Llama 3 has none).
struct GroupedMmSection {
  std::vector<std::string> float8_fqns;
  std::string mx_recipe_name = "mxfp8";
  std::vector<std::string> mx_fqns;
};

struct MemoryEstimationSection {
  bool enable = false;  // log the per-rank memory estimate and exit before training
  bool disable_fake_mode = false;
};

// TorchFT fault tolerance (not available in titan: rejected when enabled).
struct FaultToleranceSection {
  bool enable = false;
  std::string process_group = "gloo";
  int64_t process_group_timeout_ms = 10000;
  int64_t replica_id = 0;
  int64_t group_size = 0;
  int64_t min_replica_size = 1;
  std::string semi_sync_method;
  int64_t sync_steps = 5;
  bool should_quantize = false;
  int64_t fragment_sync_delay = 0;
  double fragment_update_alpha = 0.0;
  std::vector<std::vector<std::string>> module_fqns_per_model_fragment;
  int64_t num_fragments = 1;
};

struct ExperimentalSection {
  std::string custom_import;
  std::string custom_args_module;
};

struct CommSection {
  int64_t init_timeout_seconds = 300;
  int64_t train_timeout_seconds = 100;
  int64_t trace_buf_size = 20000;
  std::string save_traces_folder = "comm_traces";
  std::string save_traces_file_prefix = "rank_";
  std::string mode = "default";
};

struct ValidationSection {
  bool enable = false;
  std::string dataset = "titan_corpus_validation";
  std::string dataset_path;
  int64_t local_batch_size = 8;
  int64_t seq_len = 2048;
  int64_t freq = 10;
  int64_t steps = -1;
  DataLoaderSection dataloader;
};

struct DebugSection {
  std::optional<int64_t> seed = 0;  // None: rank 0 draws one (logged), every rank uses it
  bool deterministic = false;
  bool deterministic_warn_only = false;
  bool moe_force_load_balance = false;
};

struct JobConfig {
  JobSection job;
  ProfilingSection profiling;
  MetricsSection metrics;
  ModelSection model;
  OptimizerSection optimizer;
  LrSchedulerSection lr_scheduler;
  TrainingSection training;
  ParallelismSection parallelism;
  CheckpointSection checkpoint;
  ActivationCheckpointSection activation_checkpoint;
  CompileSection compile;
  Float8Section float8;
  MxSection mx;
  GroupedMmSection grouped_mm;
  CommSection comm;
  MemoryEstimationSection memory_estimation;
  FaultToleranceSection fault_tolerance;
  ExperimentalSection experimental;
  ValidationSection validation;
  DebugSection debug;
};

// Builds the config from `args` (argv without the program name): --job.config_file picks
// the TOML file, then every --section.key override applies on top, in order.
// Throws titan::Error for bad input (unknown key, wrong type, impossible value, bad TOML).
JobConfig load_job_config(const std::vector<std::string>& args);

// Parses TOML text (as from `source_name`) on top of `config`.
void apply_toml(JobConfig& config, const std::string& toml_text, const std::string& source_name);

// Applies "--section.key value" style overrides on top of `config`.
void apply_cli(JobConfig& config, const std::vector<std::string>& args);

// Cross-field checks (impossible combinations); throws titan::Error.
void validate(const JobConfig& config);

// The whole config as TOML text (every key, defaults included).
std::string to_toml(const JobConfig& config);
// The same as JSON, nested by section as torchtitan's JobConfig.to_dict() (unset optional
// values are null).
std::string to_json(const JobConfig& config);

// Help text listing every option with its type, default and description.
std::string help_text();
// The same as a Markdown reference (docs/CONFIG.md).
std::string markdown_reference();

}  // namespace titan::config
