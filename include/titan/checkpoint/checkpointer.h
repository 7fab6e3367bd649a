// Distributed checkpoints: <dump_folder>/<checkpoint.folder>/step-N/ holds one safetensors shard
// file per writing rank and one metadata.json index that says, for every tensor, its global
// shape and dtype and which file holds which flat element range (with CRC-32C per 4 MiB block),
// plus the training step, optimizer step count, data loader position, the mesh it was written
// with, and every rank's RNG state. Any mesh can load any checkpoint: each rank reads just the
// ranges its own shards need. Saves are atomic: ranks write into step-N.partial/, rank 0 writes
// the index last and renames the folder; anything without an index is ignored and cleaned up.
// Async modes snapshot the state to host memory on the step and write it on a thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "titan/config/job_config.h"
#include "titan/model/llama_args.h"

namespace titan::dist {
class Runtime;
}
namespace titan::parallel {
class FsdpModel;
}
namespace titan::train {
class Optimizer;
}
namespace titan::data {
class DataLoader;
}

namespace titan::checkpoint {

struct SaveStats {
  double stall_seconds = 0;  // time the training loop was blocked by the save
  double write_seconds = 0;  // time to write and commit (on the thread in async modes)
  int64_t bytes = 0;         // bytes this rank wrote
};

// The parts of the trainer a checkpoint covers. Optimizer and loader may be null.
struct TrainerState {
  parallel::FsdpModel* model = nullptr;
  train::Optimizer* optimizer = nullptr;
  data::DataLoader* loader = nullptr;
  model::LlamaArgs args;
  std::string flavor;
  // JSON naming the tokenizer and dataset the run reads (recorded; a resume compares).
  std::string data_identity;
};

// The model arguments a checkpoint's index records beyond the flavor's dims (RoPE theta and
// scaling, norm epsilon) replace those in `args`, with a log line where they differ: a resumed
// or initialized run computes the model the checkpoint was trained as. A checkpoint of another
// shape than `args` (of flavor `flavor`) is an error here, before anything is built.
void adopt_checkpoint_model_args(const std::string& step_dir, model::LlamaArgs& args,
                                 const std::string& flavor);

class Checkpointer {
 public:
  Checkpointer(const config::JobConfig& config, dist::Runtime& runtime, TrainerState state);
  ~Checkpointer();  // waits for an asynchronous save in flight

  // Resumes from the newest complete checkpoint in the folder (or checkpoint.load_step), else
  // from checkpoint.initial_load_path; returns the step to continue after (0: fresh start).
  int64_t load_at_start();
  // Saves when the schedule says so (interval, first step, last step).
  void maybe_save(int64_t step, bool last_step);
  // Whether maybe_save would save at this step.
  bool due(int64_t step, bool last_step) const;
  // Saves now. `model_only`: weights only, in `dtype`.
  void save(int64_t step, bool model_only, at::ScalarType dtype);
  // Waits for an asynchronous save to be committed.
  void wait();
  // Surfaces an asynchronous save's failure as soon as its thread has ended (call every step).
  void check_background();
  const SaveStats& last_stats() const { return last_; }
  // Training step minus the lr schedule's step after load_at_start(): 0, unless the resume
  // excluded lr_scheduler (the schedule restarts: its warmup again) or train_state (the step
  // restarts, the schedule does not). The trainer's lr is lr_at(step - lr_offset_steps()), and
  // saves record the schedule's position.
  int64_t lr_offset_steps() const { return lr_offset_steps_; }

  // Loads `step_dir` (a complete step folder) into the state; `what` chooses among
  // model, optimizer, dataloader, train_state. Returns the stored step.
  int64_t load(const std::string& step_dir, const std::vector<std::string>& what);
  // The step folder a job with `config` starts from: the checkpoint it resumes (newest, or
  // checkpoint.load_step), else a titan initial_load_path; empty for a fresh start or an HF
  // initial load. Read-only: load_at_start() loads it.
  static std::string start_dir(const config::JobConfig& config);
  // Finishes or undoes a re-save interrupted between its two renames and removes saves that
  // never finished (rank 0), then waits until rank 0 has: every rank sees the same steps.
  // load_at_start() calls it; the trainer calls it before start_dir() too.
  static void repair_folder(const config::JobConfig& config, dist::Runtime& runtime);
  // The Hugging Face folder an initial load imports (checkpoint.initial_load_in_hf):
  // initial_load_path, else model.hf_assets_path as torchtitan; empty without initial_load_in_hf.
  static std::string hf_initial_folder(const config::JobConfig& config);
  // Complete step folders in `folder`, oldest first, as (step, path).
  static std::vector<std::pair<int64_t, std::string>> complete_steps(const std::string& folder);
  // For an error about `step_dir`, the newest checkpoint a resume picked: a line naming the
  // other complete steps beside it and checkpoint.load_step; empty when there are none.
  static std::string older_steps_note(const std::string& step_dir);
  const std::string& folder() const { return folder_; }

 private:
  struct Snapshot;
  std::unique_ptr<Snapshot> snapshot(int64_t step, bool model_only, at::ScalarType dtype,
                                     bool pinned);
  void write(std::unique_ptr<Snapshot> snap);
  void write_files(Snapshot& snap);
  // Counts non-finite elements of `tensors` over every rank; the total.
  int64_t nonfinite_elements(const std::vector<at::Tensor>& tensors);
  void check_finite_after_load(const std::string& step_dir, const std::vector<at::Tensor>& masters);
  // Whether the checkpoint's data (tokenizer, dataset) are this run's; a change fails unless
  // checkpoint.allow_data_change, and then the data position is not restored.
  bool same_data(const std::string& step_dir, const nlohmann::json& meta);
  void commit(const Snapshot& snap, const std::string& report);
  void barrier(const std::string& key, int64_t step);

  const config::JobConfig& config_;
  dist::Runtime& runtime_;
  TrainerState state_;
  std::string folder_;
  std::thread writer_;
  std::atomic<bool> writer_done_{false};
  std::exception_ptr writer_error_;
  SaveStats last_;
  int64_t lr_offset_steps_ = 0;
  int64_t loaded_lr_position_ = 0;  // the lr schedule's step in the checkpoint load() read
  bool finite_ = true;  // the state being saved is finite (always, outside the test hook)
  at::Tensor staging_;  // async_with_pinned_mem's page-locked buffer (kByte), kept between saves
};

}  // namespace titan::checkpoint
