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

}  // namespace titan::ops
