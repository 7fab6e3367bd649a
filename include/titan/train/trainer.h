// The Trainer: builds everything a job needs in the order it is needed (config -> launch and
// mesh -> device -> tokenizer and data -> the plan (parallel/parallelize.h) -> this rank's
// units, materialized -> stages and the pipeline executor -> optimizer and schedule ->
// metrics), then runs the training loop. One code path for every pipeline degree: with one
// pipeline rank the whole model is one stage and gradient accumulation is its microbatches.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>

#include "titan/checkpoint/checkpointer.h"
#include "titan/config/job_config.h"
#include "titan/data/dataloader.h"
#include "titan/data/tokenizer.h"
#include "titan/dist/runtime.h"
#include "titan/metrics/metrics.h"
#include "titan/model/llama_args.h"
#include "titan/parallel/context_parallel.h"
#include "titan/parallel/fsdp.h"
#include "titan/parallel/parallelize.h"
#include "titan/parallel/pipeline/executor.h"
#include "titan/parallel/pipeline/stage.h"
#include "titan/parallel/tensor_parallel.h"
#include "titan/train/lr_scheduler.h"
#include "titan/train/optimizer.h"
#include "titan/util/device.h"
#include "titan/util/fs.h"

namespace titan::train {

struct TrainSummary {
  int64_t steps_run = 0;
  double first_loss = 0;
  double last_loss = 0;
};

class Trainer {
 public:
  explicit Trainer(config::JobConfig config);
  ~Trainer();

  // Runs from the current step to training.steps.
  TrainSummary train();
  // One optimizer step (all micro-batches); returns the global mean token loss (device
  // scalar) and the pre-clip gradient norm (device scalar).
  std::pair<at::Tensor, at::Tensor> train_step();
  // Mean validation loss over validation.steps batches (or the whole validation set).
  double validate();

  int64_t step() const { return step_; }
  // Whether the steady-state step now replays a captured CUDA graph.
  bool graph_active() const;
  dist::Runtime& runtime() { return *runtime_; }
  checkpoint::Checkpointer& checkpointer() { return *checkpointer_; }
  parallel::FsdpModel& model() { return *fsdp_; }
  const parallel::Plan& plan() const { return plan_; }
  data::DataLoader& dataloader() { return *loader_; }
  const model::LlamaArgs& model_args() const { return args_; }

 private:
  // validation.local_batch_size in pipeline microbatches: their size (checked to divide it).
  int64_t validation_microbatch_size() const;
  // Fails naming the dataset when the validation data held no whole batch.
  void check_validation_batches(const data::DataLoader& loader, int64_t batches) const;
  // The device work of one step (the loader's batches already on the device, optimizer
  // prepared): gradient reset, the schedule's passes, reductions, clipping, update. Returns
  // (mean loss, grad norm).
  std::pair<at::Tensor, at::Tensor> step_body(const std::vector<at::Tensor>& batches);
  // A loader batch [B, S + 1] as the schedule's microbatches.
  std::vector<at::Tensor> microbatches_of(const at::Tensor& batch) const;
  bool graph_eligible() const;
  // optimizer.early_step_in_backward: unit's update once its gradient is final (CUDA: on a
  // side stream after `work` and the unit's backward); join_early_steps() makes the compute
  // stream wait for every update issued.
  void step_unit_early(size_t unit, const std::shared_ptr<dist::Work>& work);
  void join_early_steps();
  // JSON naming the tokenizer (kind, vocabulary, file checksum) and dataset (name, files and
  // sizes) of this run, recorded in checkpoints so a resume on other data is caught.
  std::string data_identity() const;
  // Fails (naming the step) once a step's loss or gradient norm was not finite; synchronizes.
  void check_health();
  // Logs the per-rank memory estimate of this plan, warns when it exceeds the device, and
  // registers it for out-of-memory reports.
  void report_memory_estimate();
  // TeraPipe with token_slices = "auto": the slice cost model (cached, or timed on this
  // device and averaged over the ranks), the dynamic program's slicing, the rebuilt schedule.
  void choose_token_slices(const model::BlockPlan& timing_plan);
  // memory_budget on a GPU: times one block (random weights, this run's projections, dtype and
  // microbatch) keeping everything, recomputing norms/RoPE/SwiGLU and recomputing it whole,
  // averaged over the world, and re-chooses every block's policy from those costs.
  // `timing_plan`: the BlockPlan training runs (tensor parallel, float8 projections) with local
  // attention, for timing one block.
  void measure_checkpoint_costs(const model::BlockPlan& timing_plan);
  // A loader over `dataset` / `path` (the keys of config section `section`: "training" or
  // "validation") dealing windows to this data-parallel rank.
  std::unique_ptr<data::DataLoader> make_loader(const std::string& section,
                                                const std::string& dataset, const std::string& path,
                                                int64_t batch, int64_t seq_len, bool infinite,
                                                bool pin_memory) const;
  struct StepGraph;
  std::unique_ptr<StepGraph> graph_;
  // Eager steps this process runs before capturing one (counted from its own start, so a
  // resumed run warms up too: lazy set-up such as kernel probes cannot be captured).
  int64_t graph_warmup_steps_ = 2;
  int64_t eager_steps_ = 0;
  struct EarlyStep;  // the side stream of early_step_in_backward
  std::unique_ptr<EarlyStep> early_;

  config::JobConfig cfg_;
  std::unique_ptr<util::FolderLock> dump_lock_;  // rank 0: this run owns job.dump_folder
  std::unique_ptr<dist::Runtime> runtime_;
  DeviceInfo device_;
  model::LlamaArgs args_;
  std::shared_ptr<const data::Tokenizer> tokenizer_;
  std::unique_ptr<data::DataLoader> loader_;
  parallel::Plan plan_;
  std::unique_ptr<parallel::FsdpModel> fsdp_;
  std::unique_ptr<parallel::TensorParallel> tp_;   // tensor_parallel_degree > 1
  std::unique_ptr<parallel::ContextParallel> cp_;  // context_parallel_degree > 1
  std::unique_ptr<ops::Float8Linear> float8_;      // model.converters = ["float8"]
  std::unique_ptr<parallel::pipeline::RopeCache> ropes_;
  std::vector<std::unique_ptr<parallel::pipeline::Stage>> stages_;
  std::unique_ptr<parallel::pipeline::Executor> executor_;
  std::unique_ptr<Optimizer> optimizer_;
  std::vector<size_t> amax_from_optimizer_;  // units whose float8 amaxes the optimizer takes
  std::unique_ptr<LrScheduler> scheduler_;
  std::unique_ptr<metrics::MetricsLogger> metrics_;
  std::unique_ptr<checkpoint::Checkpointer> checkpointer_;
  int64_t step_ = 0;
  // step_ minus the lr schedule's step (Checkpointer::lr_offset_steps).
  int64_t lr_offset_steps_ = 0;
  // Device int64 [2]: the first non-finite step (counted from health_base_; 0: none) and the
  // steps run.
  at::Tensor health_;
  int64_t health_base_ = 0;
  bool estimate_only_ = false;  // memory_estimation.enable: built the plan, allocated nothing
  int64_t accumulation_ = 1;    // loader batches per optimizer step per data-parallel rank
  int64_t dp_size_ = 1;
  int64_t dp_rank_ = 0;
  double flops_per_token_ = 0;
  double data_seconds_window_ = 0;
};

}  // namespace titan::train
