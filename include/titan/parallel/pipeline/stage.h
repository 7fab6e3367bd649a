// A pipeline stage: a contiguous range of the model (the embedding and/or transformer blocks
// and/or the head = final norm + output projection + loss) that runs the forward, the
// input-gradient backward and the weight-gradient backward of any microbatch, keeping each
// microbatch's saved activations until its backward. The executor (executor.h) calls these in
// the order a schedule gives; with one pipeline rank the whole model is one stage.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <vector>

#include "titan/model/llama.h"
#include "titan/model/llama_args.h"
#include "titan/ops/cross_entropy.h"
#include "titan/parallel/fsdp.h"
#include "titan/parallel/pipeline/terapipe.h"

namespace titan::parallel {
class TensorParallel;
class ContextParallel;
}  // namespace titan::parallel

namespace titan::parallel::pipeline {

// Which part of the model a stage holds.
struct StageLayout {
  int index = 0;           // global stage index
  bool embedding = false;  // tok_embeddings: the first stage
  int first_layer = 0;     // transformer blocks [first_layer, first_layer + layers)
  int layers = 0;
  bool head = false;             // final norm + output + loss: the last stage
  std::string describe() const;  // "stage 2: layers.4-layers.8, norm, output"
};

// RoPE tables per sequence length on the compute device, shared by the stages of a rank.
class RopeCache {
 public:
  explicit RopeCache(model::LlamaArgs args) : args_(std::move(args)) {}
  const model::Rope& get(int64_t seq_len, const c10::Device& device);

 private:
  model::LlamaArgs args_;
  std::map<int64_t, model::Rope> tables_;
};

struct StageOptions {
  // Gathered weights stay until the unit's last backward of the step (pipelines: every
  // microbatch needs them again); otherwise freed after each backward.
  bool keep_weights_through_step = false;
  at::ScalarType compute_dtype = at::kFloat;
  // Tensor (+ sequence, loss) parallel over the tp group; nullptr without. Activations between
  // blocks and stages are then token shards [B, S / tp, D].
  const TensorParallel* tp = nullptr;
  // Context parallel (ring attention) over the cp group; nullptr without. The stage's tokens
  // are then this rank's chunks of each sequence (ContextParallel::shard).
  const ContextParallel* cp = nullptr;
  // TeraPipe: the token slices of each sequence (lengths; empty without). Microbatch u of the
  // schedule is then slice u % slices of sequence batch u / slices; the stage keeps each
  // sequence's keys and values until its first slice's backward.
  std::vector<int64_t> token_slices;
  // Float8 training (nullptr: none) and which projections are converted. The float8 Linears of the
  // column-parallel (q|k|v, w1|w3) and row-parallel (wo, w2) projections: one Float8Linear without
  // tensor parallelism.
  const ops::Linear* float8_column = nullptr;
  const ops::Linear* float8_row = nullptr;
  bool float8_wqkv = false, float8_wo = false, float8_w13 = false, float8_w2 = false;
};

// The block plan of `options` without context parallelism: tensor parallel's head split and
// projections, and the float8 Linears of the converted projections (a stage adds context
// parallel's attention; start-up timing keeps attention local).
model::BlockPlan block_plan(const model::LlamaArgs& args, const StageOptions& options);

class Stage {
 public:
  // `units`: this stage's units in `fsdp`, in execution order (embedding, blocks, head).
  // `policies`: the activation-checkpoint policy of each of the stage's blocks.
  Stage(StageLayout layout, std::vector<size_t> units, model::LlamaArgs args, FsdpModel& fsdp,
        RopeCache& ropes, std::vector<model::SavePolicy> policies, StageOptions options);

  const StageLayout& layout() const { return layout_; }

  // A new optimizer step of `microbatches` microbatches: the last one's backward reduces the
  // gradients.
  void begin_step(int microbatches);
  // Drops what a step that did not finish left behind (its saved microbatches): a failed CUDA
  // graph capture, before the step runs again eagerly.
  void abandon_step();

  // Forward of microbatch `mb`. The first stage takes token ids [B, S], the others the previous
  // stage's output [B, S, D]. The last stage needs `labels` ([B * S] ids): it adds the sum of
  // token losses to `loss_sum` and, in the same fused pass, computes the gradient of its input
  // (scaled by `grad_scale`) and of its own weights; it returns nothing. Other stages return
  // their output.
  at::Tensor forward(int mb, const at::Tensor& input, const at::Tensor& labels, double grad_scale,
                     at::Tensor& loss_sum);
  // Backward of microbatch `mb` from `dout`, the gradient of this stage's output (the last stage
  // uses its own). `with_weight`: the weight gradients too (B); otherwise they wait for
  // backward_weight (I, then W). Returns the gradient of the input (undefined on the first
  // stage).
  at::Tensor backward(int mb, const at::Tensor& dout, bool with_weight);
  void backward_weight(int mb);

  // Forward without gradients (validation): the output, or on the last stage the loss sum.
  at::Tensor forward_eval(const at::Tensor& input, const at::Tensor& labels);

  // Microbatches whose activations are held now.
  size_t microbatches_in_flight() const { return saved_.size(); }

 private:
  struct Saved {
    at::Tensor tokens;  // first stage: input ids, for the embedding's gradient
    std::vector<model::BlockSaved> blocks;
    std::vector<model::DeferredWeightGrads> deferred;  // per block, between I and W
    at::Tensor dh;                                     // last stage: gradient of the head's input
    at::Tensor embed_grad;        // first stage: gradient of the embedding output, between I and W
    bool weight_pending = false;  // I ran, W has not
  };
  at::Tensor embed(const at::Tensor& tokens);
  // The embedding's weight gradient from the gradient of its output.
  void embed_backward(const at::Tensor& dh, const at::Tensor& tokens);
  // The head's norm, output and loss (and their backward with compute_grad) on h [B, S', D].
  ops::HeadResult head(const at::Tensor& h, const at::Tensor& labels, double grad_scale,
                       bool compute_grad);
  // `mb`: the schedule microbatch (its token slice), or -1 for a whole sequence (validation).
  at::Tensor blocks_forward(at::Tensor h, Saved* saved, int mb);
  // RoPE tables for activations h [B, S', D] (S': this rank's tokens of each sequence, or of
  // microbatch mb's token slice).
  const model::Rope& rope_for(const at::Tensor& h, int mb);
  // TeraPipe: points the attention at block k's keys/values of microbatch mb's sequence (none
  // when mb < 0 or without slices).
  void select_slice(int mb, int k);
  void weight_done(size_t unit);  // a unit's gradient of this microbatch is complete
  // Frees a unit's gathered weights after a use, `uses_done` earlier uses of the step before it.
  void release_after_use(size_t unit, int uses_done);

  StageLayout layout_;
  std::vector<size_t> units_;  // embedding?, blocks, head?
  size_t first_block_ = 0;     // index in units_ of the first block
  model::LlamaArgs args_;
  FsdpModel& fsdp_;
  RopeCache& ropes_;
  std::vector<model::SavePolicy> policies_;
  StageOptions options_;
  model::BlockPlan block_plan_;
  std::map<int64_t, model::Rope> cp_ropes_;  // context parallel: by sequence length
  // TeraPipe: the slices' first tokens (and the sequence length last), the attention, each
  // sequence batch's per-block keys/values, and RoPE tables by (first token, length).
  std::vector<int64_t> slice_start_;
  std::unique_ptr<TokenSliceAttention> slicer_;
  std::map<int, std::vector<SliceKv>> slice_kv_;
  std::map<std::pair<int64_t, int64_t>, model::Rope> slice_ropes_;
  int step_microbatches_ = 1;
  int forwards_done_ = 0, backwards_done_ = 0;  // this step
  std::map<size_t, int> weight_passes_;         // per unit: microbatches whose gradient is complete
  std::map<int, Saved> saved_;
};

}  // namespace titan::parallel::pipeline
