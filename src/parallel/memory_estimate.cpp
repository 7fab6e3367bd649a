// Memory arithmetic of a step: the parameter state, weights, saved activations and the working
// set, from the same save policies the explicit forward follows (model/llama.cpp).
#include "titan/parallel/memory_estimate.h"

#include <fmt/format.h>

#include <algorithm>

namespace titan::parallel {

int64_t saved_bytes_per_token(const model::LlamaArgs& a, model::SavePolicy policy,
                              int64_t dtype_bytes, int64_t tp, const Float8SavedInputs& float8) {
  const int64_t d = a.dim, q = a.n_heads * a.head_dim(), kv = a.n_kv_heads * a.head_dim();
  const int64_t f = a.ffn_hidden_dim();
  // Per token, in elements of the compute dtype (model/llama.h, BlockSaved): the log-sum-exp
  // and the two rstd vectors are fp32 and small (heads + 2 values per token). Under tensor
  // parallel the residual stream (x, h) is a token shard, the normalized inputs of the
  // column-parallel projections are gathered whole, and the projections' outputs hold this
  // rank's heads and FFN columns.
  const int64_t small = (a.n_heads / tp + 2) * 4;
  // The inputs kept for the weight gradients: one byte each where the projection is float8.
  auto input = [&](bool float8_input) { return float8_input ? 1 : dtype_bytes; };
  switch (policy) {
    case model::SavePolicy::All:
      // x, h (shards); xn1, hn2 (gathered); qkv, q, k, attention output, w1|w3 out, swiglu out
      return (2 * d / tp + (3 * q + 3 * kv + 2 * f) / tp) * dtype_bytes +
             d * (input(float8.wqkv) + input(float8.w13)) + f / tp * input(float8.w2) + small;
    case model::SavePolicy::Matmuls:
      // x, qkv, attention output, h, w1|w3 output
      return (2 * d + 2 * q + 2 * kv + 2 * f) / tp * dtype_bytes + a.n_heads / tp * 4;
    case model::SavePolicy::Attention:
      // x, qkv, attention output, h
      return (2 * d + 2 * q + 2 * kv) / tp * dtype_bytes + a.n_heads / tp * 4;
    case model::SavePolicy::InputOnly: return d / tp * dtype_bytes;
  }
  return 0;
}

MemoryEstimate estimate_memory(const model::LlamaArgs& a, const MemoryEstimateInputs& in) {
  MemoryEstimate e;
  if (!in.state_on_host) e.param_state_bytes = in.param_state_elements * 16;
  e.weight_bytes = in.resident_weight_elements * in.compute_dtype_bytes;
  const int64_t tokens = in.microbatch_tokens;
  int64_t per_token = 0;
  for (auto p : in.block_policies) {
    per_token += saved_bytes_per_token(a, p, in.compute_dtype_bytes, in.tp, in.float8);
  }
  e.activation_bytes = per_token * tokens * std::max<int64_t>(1, in.microbatches_in_flight);
  // Working set: one block rebuilt to "All" plus gradients of about the same size while its
  // backward runs, the unit's fp32 gradient (and its reduce copy), and the head's logits chunk
  // (about 1 GiB of compute-dtype logits at most) with its normalized input.
  const int64_t block_all =
      saved_bytes_per_token(a, model::SavePolicy::All, in.compute_dtype_bytes, in.tp, in.float8) *
      tokens;
  e.working_bytes = 2 * block_all + in.gradient_buffer_elements * 4;
  if (in.holds_head) {
    const int64_t logits =
        std::min<int64_t>(int64_t(1) << 30, tokens * a.vocab_size / in.tp * in.compute_dtype_bytes);
    e.working_bytes += logits + 2 * tokens * a.dim * in.compute_dtype_bytes;
  }
  return e;
}

std::string MemoryEstimate::describe() const {
  constexpr double kGiB = 1073741824.0;
  return fmt::format(
      "{:.1f} GiB per rank: parameter state {:.1f} GiB (fp32 weights, gradients, AdamW moments) "
      "+ weights {:.1f} GiB + activations {:.1f} GiB + working set {:.1f} GiB",
      total_bytes() / kGiB, param_state_bytes / kGiB, weight_bytes / kGiB, activation_bytes / kGiB,
      working_bytes / kGiB);
}

}  // namespace titan::parallel
