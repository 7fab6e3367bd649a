// The output head fused with its loss: RMSNorm -> output projection -> cross-entropy, and the
// backward of all three, computed chunk by chunk so fp32 logits never exist for the batch.
#pragma once

#include <ATen/core/Tensor.h>

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

// Rows of logits processed at once: bounds the fp32 scratch to about `budget_bytes`.
int64_t head_chunk_rows(int64_t n_rows, int64_t vocab, int64_t budget_bytes);

}  // namespace titan::ops
