// Tensor, sequence and loss parallelism over the mesh's tp group (Megatron-LM's scheme, as
// torchtitan's plan for Llama). Between blocks, activations are sequence-parallel: each tp rank
// holds a contiguous 1/tp of the microbatch's [B * S] tokens. A column-parallel projection
// (q|k|v, w1|w3, output) all-gathers the token shards and multiplies by its rows of the weight;
// a row-parallel one (wo, w2) multiplies by its columns and reduce-scatters the partial sums
// back to token shards; the norms run on token shards (their weight gradients are summed over
// tp once per step). The embedding is split by vocabulary and reduce-scattered to token
// shards; the loss runs on vocabulary shards, combining per-token statistics (loss parallel).
//
// Async TP: the gather -> matmul and matmul -> reduce-scatter pairs are decomposed into tp
// chunks over a ring of point-to-point transfers, so chunk i multiplies while chunk i+1 moves.
// The transfers are the Communicator's batched send/recv (NCCL on its own stream on GPU, Gloo
// on CPU, so CI checks the arithmetic). CUDA IPC peer copies are the other option the design
// allows; NCCL P2P keeps one code path for every backend and needs no symmetric memory or
// multicast, and the choice is to be revisited with the multi-GPU measurements (issue 18).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "titan/model/llama.h"
#include "titan/model/llama_args.h"
#include "titan/ops/cross_entropy.h"
#include "titan/ops/float8.h"
#include "titan/ops/linear.h"

namespace titan::dist {
class Communicator;
}

namespace titan::parallel {

struct TensorParallelOptions {
  bool async = false;         // parallelism.enable_async_tensor_parallel
  bool loss_parallel = true;  // !parallelism.disable_loss_parallel
};

class TensorParallel {
 public:
  // `comm`: the tp group (size > 1).
  TensorParallel(dist::Communicator* comm, TensorParallelOptions options);
  ~TensorParallel();

  int64_t size() const;
  int64_t rank() const;
  const TensorParallelOptions& options() const { return options_; }

  // Token shards [n, ...] -> every rank's, in rank order [size * n, ...].
  at::Tensor gather_tokens(const at::Tensor& shard) const;
  // Partial sums [size * n, ...] -> this rank's rows of their sum over ranks, [n, ...].
  at::Tensor scatter_tokens(const at::Tensor& partial) const;
  // gather_tokens(x) @ b for a 2-D token shard x [n, k] and b [k, m]: [size * n, m]; the
  // gathered x goes to `*gathered` when given. Overlapped chunk by chunk under async TP.
  at::Tensor gather_matmul(const at::Tensor& x, const at::Tensor& b, at::Tensor* gathered) const;
  // scatter_tokens(x @ b) for x [size * n, k], b [k, m]: [n, m]. Overlapped under async TP.
  at::Tensor matmul_scatter(const at::Tensor& x, const at::Tensor& b) const;

  // Column-parallel (gather, then this rank's output rows) and row-parallel (this rank's input
  // columns, then reduce-scatter) projections.
  const ops::Linear& column() const { return *column_; }
  const ops::Linear& row() const { return *row_; }
  // Float8 (tensorwise) column- and row-parallel projections: Float8Linear's GEMMs with every
  // operand cast with the whole tensor's amax (all-reduced MAX over tp), so every cast equals a
  // single process's; token shards (x of column-, dy of row-parallel projections) are gathered
  // as float8 bytes, partial sums reduce-scattered in the compute dtype. Async TP does not
  // overlap these (the gather runs first). Available after enable_float8().
  void enable_float8(bool emulate);
  const ops::Linear& float8_column() const;
  const ops::Linear& float8_row() const;
  // A block on this rank: its share of the heads, token shards, the projections above.
  model::BlockPlan block_plan(const model::LlamaArgs& args) const;

  // Vocabulary-parallel embedding: `table` holds rows [vocab_begin, vocab_begin + rows) of the
  // whole table. tokens [B, S] -> this rank's token shard [B, S / size, D] in `dtype`.
  at::Tensor embedding_forward(const at::Tensor& table, int64_t vocab_begin,
                               const at::Tensor& tokens, at::ScalarType dtype) const;
  // grad_table (fp32, this rank's rows) (+)= the gradient of the token shard dh [B, S/size, D].
  void embedding_backward(const at::Tensor& dh, const at::Tensor& tokens, int64_t vocab_begin,
                          at::Tensor& grad_table, bool accumulate) const;

  // The head on a token shard h [n, D]: norm, gather, this rank's vocabulary rows of the
  // output (out_w [rows, D] from vocab_begin of `vocab`), the loss over the whole vocabulary
  // (loss parallel or gathered logits) for all size * n tokens (targets [size * n]), and with
  // compute_grad the gradient of h's shard and the weights' (norm: this shard's part).
  ops::HeadResult head_forward_backward(const at::Tensor& h, const at::Tensor& norm_w,
                                        const at::Tensor& out_w, int64_t vocab_begin, int64_t vocab,
                                        const at::Tensor& targets, double norm_eps,
                                        double grad_scale, at::Tensor* norm_grad,
                                        at::Tensor* out_grad, bool compute_grad,
                                        bool accumulate) const;

 private:
  dist::Communicator* comm_;
  TensorParallelOptions options_;
  std::unique_ptr<ops::Linear> column_, row_, float8_column_, float8_row_;
};

}  // namespace titan::parallel
