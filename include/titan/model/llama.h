// The Llama 3 computation with explicit forward and backward passes (no autograd): a
// transformer block, the embedding and the head. Weights come in as views of a unit's flat
// buffer in compute dtype; weight gradients are accumulated into the unit's fp32 flat
// gradient. What the forward keeps for the backward is decided by the activation policy.
#pragma once

#include <ATen/core/Tensor.h>

#include "titan/model/layout.h"
#include "titan/model/llama_args.h"
#include "titan/ops/attention.h"
#include "titan/ops/linear.h"

namespace titan::model {

// What a block keeps from forward for backward (activation checkpointing).
// What a block keeps for its backward, from most to least memory (memory_budget mixes them).
enum class SavePolicy {
  All,        // every intermediate: no recomputation (activation_checkpoint.mode = none)
  Matmuls,    // matmul and attention outputs; norms, RoPE and SwiGLU recomputed ("op")
  Attention,  // the attention half's matmul and attention outputs; the feed-forward's input
              // projection (w1|w3) recomputed too, with norms, RoPE and SwiGLU
  InputOnly   // only the block input; the whole block recomputed in backward ("full")
};
constexpr size_t kSavePolicies = 4;
// The index of a policy in the order above (arrays of per-policy figures).
size_t save_policy_index(SavePolicy p);

// Weight views of one block in compute dtype; a projection gathered in float8 (the float8 FSDP
// all-gather) is e4m3 with its inverse scale in the matching *_scale (undefined otherwise).
struct BlockWeights {
  at::Tensor attention_norm, wqkv, wo, ffn_norm, w13, w2;
  at::Tensor wqkv_scale, wo_scale, w13_scale, w2_scale;
};
// The same views into the block's fp32 flat gradient.
using BlockGrads = BlockWeights;

BlockWeights block_views(const UnitLayout& unit, const at::Tensor& flat);
BlockWeights block_views(const UnitLayout& unit, const GatheredUnit& gathered);

// A block with random weights (projections N(0, 0.02), norms one) in `dtype` and a zeroed
// fp32 gradient, for timing one block at start-up.
struct ScratchBlock {
  at::Tensor flat, grad;
  BlockWeights w;
  BlockGrads g;
};
ScratchBlock scratch_block(const UnitLayout& unit, at::ScalarType dtype, const c10::Device& device);

// How a block runs on this rank: its attention heads (all of them, or its tensor-parallel
// share), how many ranks share its tokens (sequence parallel: the block's input and output
// hold 1/seq_shards of the microbatch's tokens, contiguous in [B * S] order), and the Linear
// of each projection.
struct BlockPlan {
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t seq_shards = 1;
  const ops::Linear* wqkv = &ops::plain_linear();
  const ops::Linear* wo = &ops::plain_linear();
  const ops::Linear* w13 = &ops::plain_linear();
  const ops::Linear* w2 = &ops::plain_linear();
  // Causal attention over the microbatch's sequence, or over a sequence split across
  // context-parallel ranks (then the block's tokens are this rank's part of the sequence).
  const ops::Attention* attention = &ops::local_attention();
  // The whole block on one rank.
  static BlockPlan whole(const LlamaArgs& args);
};

struct BlockSaved {
  SavePolicy policy = SavePolicy::All;
  at::Tensor x;           // block input [B, S, D] (sequence parallel: [B, S / tp, D])
  at::Tensor rstd1, xn1;  // attention norm; xn1 as the q|k|v weight gradient takes it
  at::Tensor qkv;         // fused projection output [B, S, H + 2K, hd]
  at::Tensor q, k;        // after RoPE
  ops::AttentionSaved attn;
  at::Tensor o;           // attention output [B, S, H*hd]
  at::Tensor h;           // residual after attention
  at::Tensor rstd2, hn2;  // ffn norm; hn2 as the w1|w3 weight gradient takes it
  at::Tensor ab;          // fused w1|w3 output [B, S, 2F]
  at::Tensor g;           // silu(a) * b as the w2 weight gradient takes it (float8: g^T packed)
  void clear() { *this = BlockSaved{}; }
};

// Rotary tables for the current sequence length, on the compute device.
struct Rope {
  at::Tensor cos, sin;  // [S, hd/2] fp32
};

// x: [B, S, D] compute dtype ([B, S / seq_shards, D] under sequence parallel). Returns the
// block output; fills `saved` per `policy`.
at::Tensor block_forward(const LlamaArgs& args, const BlockPlan& plan, const BlockWeights& w,
                         const Rope& rope, const at::Tensor& x, SavePolicy policy,
                         BlockSaved& saved);

// The operands of a block's four weight-gradient GEMMs (dW = dy^T x), kept when the backward
// of the input runs first and the weight gradients later (zero-bubble pipeline schedules).
struct DeferredWeightGrads {
  at::Tensor d_w2, x_w2;      // feed-forward down projection
  at::Tensor d_w13, x_w13;    // gate|up projection
  at::Tensor d_wo, x_wo;      // attention output projection
  at::Tensor d_wqkv, x_wqkv;  // q|k|v projection
  bool pending() const { return d_w2.defined(); }
};

// dout: gradient of the block output. Adds weight gradients into `grads` (fp32), or writes
// them when `accumulate` is false, and returns the gradient of the block input. Releases `saved`.
// With `deferred`, the four projection gradients are not computed but their operands kept
// there for block_backward_weight (the RMSNorm weight gradients are written at once).
at::Tensor block_backward(const LlamaArgs& args, const BlockPlan& plan, const BlockWeights& w,
                          const Rope& rope, const at::Tensor& dout, BlockSaved& saved,
                          const BlockGrads& grads, bool accumulate = true,
                          DeferredWeightGrads* deferred = nullptr);
// The deferred projection gradients into `grads` (added, or written when !accumulate); releases
// `deferred`'s tensors.
void block_backward_weight(const BlockPlan& plan, DeferredWeightGrads& deferred,
                           const BlockGrads& grads, bool accumulate = true);

// Embedding lookup: table [V, D] (any float dtype) -> [B, S, D] in `dtype`.
at::Tensor embedding_forward(const at::Tensor& table, const at::Tensor& tokens,
                             at::ScalarType dtype);
// grad_table (fp32 [V, D]) += scatter of dh over the token ids (zeroed first if !accumulate).
void embedding_backward(const at::Tensor& dh, const at::Tensor& tokens, at::Tensor& grad_table,
                        bool accumulate = true);

}  // namespace titan::model
