// TeraPipe (token-level pipeline parallelism): each microbatch's sequence is cut into token
// slices that enter the pipeline one after another. A stage keeps the keys and values of the
// earlier slices of a sequence, so slice k attends to every earlier token (TokenSliceAttention);
// the backward runs the slices in reverse, adding each slice's key/value gradients for earlier
// positions into accumulators that those slices' backward then includes. The slicing minimizes
// the pipeline's step time, microbatches x (sum of slice times) + (stages - 1) x (largest slice
// time), by TeraPipe's dynamic program over slice times measured on this machine
// (SliceCostModel).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "titan/model/llama.h"
#include "titan/ops/attention.h"

namespace titan::parallel::pipeline {

// The shortest token slice titan runs: attention kernels work on query tiles of at least 16
// rows, so shorter slices leave them mostly idle.
constexpr int64_t kMinTokenSlice = 16;

// Keys and values of one block for one sequence, filled slice by slice, and the gradients that
// later slices send back to earlier positions.
struct SliceKv {
  at::Tensor k, v;    // [B, S, Hkv, hd] in compute dtype (after RoPE for k)
  at::Tensor dk, dv;  // fp32 [B, S, Hkv, hd]; allocated by the first backward that needs them
};

// ops::Attention for a token slice at positions [offset, offset + L) of a sequence: causal
// attention within the slice merged (log-sum-exp) with attention to the cached keys/values of
// [0, offset). The caller selects the block's SliceKv before each forward and backward; with
// none selected it is plain causal attention (validation runs whole sequences).
class TokenSliceAttention final : public ops::Attention {
 public:
  void use(SliceKv* kv, int64_t offset, int64_t seq_len) {
    kv_ = kv;
    offset_ = offset;
    seq_len_ = seq_len;
  }
  at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     ops::AttentionSaved& saved) const override;
  void bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   ops::AttentionSaved& saved) const override;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout,
                                                          const ops::AttentionSaved& saved,
                                                          int64_t n_kv_heads) const override;

 private:
  SliceKv* kv_ = nullptr;
  int64_t offset_ = 0, seq_len_ = 0;
};

// Forward + backward time of one slice of `len` tokens after `prefix` earlier tokens, per
// block: fixed + per_token x len + per_pair x (len x prefix + len^2 / 2) (the last term counts
// the causal (query, key) pairs attention computes).
struct SliceCostModel {
  double fixed_s = 0, per_token_s = 0, per_pair_s = 0;
  double time_s(int64_t len, int64_t prefix) const;
  // Least-squares fit to measured (len, prefix, seconds) samples; coefficients kept >= 0.
  static SliceCostModel fit(const std::vector<int64_t>& lens, const std::vector<int64_t>& prefixes,
                            const std::vector<double>& seconds);
  // From the block's FLOPs at `flops_per_s` (no measurement: the schedule command's model).
  static SliceCostModel from_flops(const model::LlamaArgs& args, int64_t microbatch_size,
                                   double flops_per_s, double fixed_s);
  std::string describe() const;
};

struct TokenSlicing {
  std::vector<int64_t> lengths;  // sum to the sequence length
  double sum_s = 0;              // sum of slice times (one microbatch)
  double max_s = 0;              // the largest slice time
  // microbatches x sum_s + (stages - 1) x max_s: the pipeline's step time in the model.
  double step_s = 0;
};

// Evaluates a slicing under `cost(len, prefix)`.
TokenSlicing evaluate_slicing(const std::vector<int64_t>& lengths, int stages, int microbatches,
                              const std::function<double(int64_t, int64_t)>& cost);

// TeraPipe's dynamic program: the slicing of seq_len into multiples of `quantum` (which must
// divide seq_len) minimizing microbatches x sum + (stages - 1) x max of the slice times. For
// each candidate largest slice time t (every slice's time), f(i) = the least sum of times
// covering tokens [i, seq_len) with slices no slower than t; the best t wins. Exact for
// `quantum`-multiples; O(n^4) in n = seq_len / quantum (titan keeps n <= 64).
TokenSlicing optimal_token_slices(int64_t seq_len, int64_t quantum, int stages, int microbatches,
                                  const std::function<double(int64_t, int64_t)>& cost);

// The slice quantum "auto" searches over: the smallest multiple of kMinTokenSlice and `tp`
// dividing seq_len into at most 64 parts. Throws titan::Error (naming the keys) when none does.
int64_t token_slice_quantum(int64_t seq_len, int64_t tp);

// Parses parallelism.pipeline_parallel_token_slices: empty when "auto", else the lengths,
// checked (each >= kMinTokenSlice and a multiple of `tp`, summing to seq_len). Throws
// titan::Error naming the key.
std::vector<int64_t> parse_token_slices(const std::vector<std::string>& value, int64_t seq_len,
                                        int64_t tp);
bool token_slices_auto(const std::vector<std::string>& value);

// Times one block's forward + backward (random weights, the given plan and policy, through
// TokenSliceAttention) for slices of several lengths and prefixes on `device`, in `dtype`, for
// microbatches of `batch` sequences of seq_len; returns the samples as (len, prefix, seconds).
// Every rank must call it the same way (tensor-parallel collectives run inside).
struct SliceSample {
  int64_t len = 0, prefix = 0;
  double seconds = 0;
};
std::vector<SliceSample> measure_slice_times(const model::LlamaArgs& args, model::BlockPlan plan,
                                             const model::UnitLayout& block, int64_t batch,
                                             int64_t seq_len, int64_t quantum,
                                             model::SavePolicy policy, at::ScalarType dtype,
                                             const c10::Device& device);

}  // namespace titan::parallel::pipeline
