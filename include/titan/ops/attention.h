// Causal grouped-query attention with explicit forward/backward through ATen's fused SDPA
// kernels (flash / cuDNN on CUDA, flash-for-CPU on CPU).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace titan::ops {

enum class AttentionBackend { CpuFlash, CudaFlash, CudaCudnn, CudaEfficient };

// What forward must keep for backward.
struct AttentionSaved {
  AttentionBackend backend = AttentionBackend::CpuFlash;
  at::Tensor q, k, v;    // [B, H(q)/Hkv(k,v), S, hd] views as passed to the kernel
  at::Tensor out;        // [B, H, S, hd] view
  at::Tensor logsumexp;  // kernel-specific
  // flash (CUDA) bookkeeping
  at::Tensor cum_seq_q, cum_seq_k, philox_seed, philox_offset;
  int64_t max_q = 0, max_k = 0;
};

// q: [B, S, H, hd], k/v: [B, S, Hkv, hd] (last dim contiguous). Returns out [B, S, H, hd].
at::Tensor attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             AttentionSaved& saved);
// Sets saved.q/k/v to the views the kernel takes, as attention_forward does; lets a
// recomputation rebuild the inputs without rerunning attention.
void attention_bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           AttentionSaved& saved);

// dout: [B, S, H, hd]. Returns (dq [B,S,H,hd], dk [B,S,Hkv,hd], dv [B,S,Hkv,hd]) (views).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout,
                                                                  const AttentionSaved& saved,
                                                                  int64_t n_kv_heads);

// The kernel chosen for CUDA (after the first call), or the CPU kernel.
std::string attention_backend_name(bool cuda);

// How a block computes attention over its tokens: causal over the microbatch's own sequence
// (local_attention), or over a sequence split across ranks (context parallel). The three calls
// mirror attention_forward / attention_bind_inputs / attention_backward.
class Attention {
 public:
  virtual ~Attention() = default;
  virtual at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             AttentionSaved& saved) const = 0;
  virtual void bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           AttentionSaved& saved) const = 0;
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout,
                                                                  const AttentionSaved& saved,
                                                                  int64_t n_kv_heads) const = 0;
};
const Attention& local_attention();

// Blocks of attention (ring attention's pieces). A query block q [B, Lq, H, hd] against a
// key/value block k, v [B, Lk, Hkv, hd]: `causal` when they are the same positions (Lq == Lk),
// otherwise every key precedes every query. Returns the block's output [B, Lq, H, hd] (q's
// dtype) and its log-sum-exp [B, H, Lq] (fp32). Flash kernels on CUDA bf16/fp16 and on CPU,
// exact math on CUDA fp32.
std::pair<at::Tensor, at::Tensor> block_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal);
// The block's contribution to (dq, dk, dv) given the attention's final output `out` and
// log-sum-exp `lse` over all blocks (as block_attention_forward returns them, merged).
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal);
// Merges a block's (part_out, part_lse) into the running (out, lse) (fp32, in place; an
// undefined `out` takes the part).
void merge_attention(at::Tensor& out, at::Tensor& lse, const at::Tensor& part_out,
                     const at::Tensor& part_lse);

}  // namespace titan::ops
