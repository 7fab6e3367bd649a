// The output head fused with its loss: RMSNorm -> output projection -> cross-entropy, and the
// backward of all three, computed chunk by chunk so fp32 logits never exist for the batch.
// The projection + loss part also runs on a vocabulary shard (tensor parallel): each rank
// holds a range of the vocabulary's rows and the ranks combine per-token statistics (loss
// parallel) or their logits.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

namespace titan::ops {

struct HeadResult {
  at::Tensor loss_sum;  // fp32 scalar: sum over tokens of -log p(target)
  at::Tensor dh;        // gradient w.r.t. the head input h (h's dtype), scaled by grad_scale
};

// h: [N, D] (compute dtype), norm_w: [D], out_w: [V, D], targets: [N] int64.
// grad_scale multiplies d(loss_sum) (e.g. 1/total_tokens). Adds weight gradients into
// norm_grad (fp32 [D]) and out_grad (fp32 [V, D]) (overwrites them when !accumulate). With
// compute_grad=false only the loss.
HeadResult head_forward_backward(const at::Tensor& h, const at::Tensor& norm_w,
                                 const at::Tensor& out_w, const at::Tensor& targets,
                                 double norm_eps, double grad_scale, at::Tensor* norm_grad,
                                 at::Tensor* out_grad, bool compute_grad = true,
                                 bool accumulate = true);

// An output projection holding rows [begin, begin + rows) of the vocabulary; the other rows
// live on other ranks, met through one of the two hooks.
struct VocabShard {
  int64_t begin = 0;
  int64_t vocab = 0;  // the whole vocabulary
  // Loss parallel: this rank's per-token statistics [len, 3] fp32 (max logit, sum of
  // exp(logit - max), target logit or 0 where the target is another rank's) -> every rank's,
  // [ranks, len, 3]. Never moves [tokens, vocab] logits.
  std::function<at::Tensor(const at::Tensor&)> gather_stats;
  // Without loss parallel: this rank's logits [len, rows] -> the whole rows [len, V] in
  // vocabulary order (every rank then computes the whole loss).
  std::function<at::Tensor(const at::Tensor&)> gather_logits;
};

// The projection and loss of already normalized hn [N, D]: returns the loss sum over the N
// tokens (the whole vocabulary's, also on a shard); with compute_grad writes d(hn) into `dhn`
// ([N, D], hn's dtype; on a shard the part through this rank's rows, to be summed over ranks)
// and adds (or writes) out_w's gradient into out_grad.
at::Tensor output_loss(const at::Tensor& hn, const at::Tensor& out_w, const at::Tensor& targets,
                       double grad_scale, const at::Tensor& dhn, at::Tensor* out_grad,
                       bool compute_grad, bool accumulate, const VocabShard* shard = nullptr);

// Rows of logits processed at once: bounds the fp32 scratch to about `budget_bytes`.
int64_t head_chunk_rows(int64_t n_rows, int64_t vocab, int64_t budget_bytes);

}  // namespace titan::ops
