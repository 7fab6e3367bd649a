// Causal GQA attention: explicit forward/backward over ATen's fused SDPA kernels.
// CUDA: flash attention with native grouped KV heads (checked once against an expanded-KV
// run; if the kernel disagrees, KV heads are expanded). CPU: ATen's flash-for-CPU with KV
// heads expanded (its backward does not take grouped heads).
#include "titan/ops/attention.h"

#include <ATen/ATen.h>

#include <cmath>
#include <mutex>

#include "titan/util/error.h"

namespace titan::ops {
namespace {

// [B, S, Hkv, hd] -> [B, S, Hkv * rep, hd], each KV head repeated for its query group.
at::Tensor expand_kv(const at::Tensor& kv, int64_t rep) {
  if (rep == 1) return kv;
  auto s = kv.sizes();
  return kv.unsqueeze(3).expand({s[0], s[1], s[2], rep, s[3]}).reshape({s[0], s[1], s[2] * rep, s[3]});
}

// Sum the gradients of repeated heads back onto their KV head: [B,S,Hkv*rep,hd] -> [B,S,Hkv,hd].
at::Tensor reduce_kv(const at::Tensor& g, int64_t rep) {
  if (rep == 1) return g;
  auto s = g.sizes();
  return g.reshape({s[0], s[1], s[2] / rep, rep, s[3]}).sum(3);
}

#ifdef TITAN_WITH_CUDA
std::once_flag g_probe_once;
bool g_flash_native_gqa = false;

void probe_flash_gqa(const at::TensorOptions& opts) {
  // A small causal GQA problem through the native path and through expanded heads.
  at::Tensor q = at::randn({1, 64, 4, 64}, opts);
  at::Tensor k = at::randn({1, 64, 2, 64}, opts);
  at::Tensor v = at::randn({1, 64, 2, 64}, opts);
  try {
    auto native = at::_scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                          v.transpose(1, 2), 0.0, true);
    auto expanded = at::_scaled_dot_product_flash_attention(
        q.transpose(1, 2), expand_kv(k, 2).transpose(1, 2), expand_kv(v, 2).transpose(1, 2), 0.0,
        true);
    double diff = (std::get<0>(native).to(at::kFloat) - std::get<0>(expanded).to(at::kFloat))
                      .abs()
                      .max()
                      .item<double>();
    g_flash_native_gqa = diff < 1e-2;
  } catch (const std::exception&) {
    g_flash_native_gqa = false;
  }
}
#endif

}  // namespace

std::string attention_backend_name(bool cuda) {
#ifdef TITAN_WITH_CUDA
  if (cuda) return g_flash_native_gqa ? "flash (native GQA)" : "flash (expanded KV heads)";
#endif
  (void)cuda;
  return "flash-for-CPU (expanded KV heads)";
}

void attention_bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           AttentionSaved& saved) {
  int64_t rep = q.size(2) / k.size(2);
#ifdef TITAN_WITH_CUDA
  saved.efficient = q.is_cuda() && q.scalar_type() == at::kFloat;
  if (q.is_cuda() && !saved.efficient) {
    std::call_once(g_probe_once, probe_flash_gqa, q.options().dtype(at::kBFloat16));
    if (g_flash_native_gqa) rep = 1;
  }
#endif
  saved.q = q.transpose(1, 2);
  saved.k = expand_kv(k, rep).transpose(1, 2);
  saved.v = expand_kv(v, rep).transpose(1, 2);
}

at::Tensor attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             AttentionSaved& saved) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  attention_bind_inputs(q, k, v, saved);
#ifdef TITAN_WITH_CUDA
  if (saved.efficient) {
    auto res = at::_scaled_dot_product_efficient_attention(saved.q, saved.k, saved.v,
                                                           std::nullopt, true, 0.0, true, scale);
    saved.out = std::get<0>(res);
    saved.logsumexp = std::get<1>(res);
    saved.philox_seed = std::get<2>(res);
    saved.philox_offset = std::get<3>(res);
    return saved.out.transpose(1, 2);
  }
  if (q.is_cuda()) {
    auto res = at::_scaled_dot_product_flash_attention(saved.q, saved.k, saved.v, 0.0, true,
                                                       false, scale);
    saved.out = std::get<0>(res);
    saved.logsumexp = std::get<1>(res);
    saved.cum_seq_q = std::get<2>(res);
    saved.cum_seq_k = std::get<3>(res);
    saved.max_q = std::get<4>(res).guard_int(__FILE__, __LINE__);
    saved.max_k = std::get<5>(res).guard_int(__FILE__, __LINE__);
    saved.philox_seed = std::get<6>(res);
    saved.philox_offset = std::get<7>(res);
    return saved.out.transpose(1, 2);
  }
#endif
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(saved.q, saved.k, saved.v, 0.0,
                                                             true, std::nullopt, scale);
  saved.out = std::get<0>(res);
  saved.logsumexp = std::get<1>(res);
  return saved.out.transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout,
                                                                  const AttentionSaved& saved,
                                                                  int64_t hkv) {
  const int64_t h = saved.q.size(1);
  const int64_t rep = h / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(saved.q.size(3)));
  at::Tensor dq, dk, dv;
#ifdef TITAN_WITH_CUDA
  if (saved.efficient) {
    auto res = at::_scaled_dot_product_efficient_attention_backward(
        dout.transpose(1, 2), saved.q, saved.k, saved.v, at::Tensor(), saved.out,
        saved.logsumexp, saved.philox_seed, saved.philox_offset, 0.0, {true, true, true, false},
        true, scale);
    dq = std::get<0>(res);
    dk = std::get<1>(res);
    dv = std::get<2>(res);
  } else if (dout.is_cuda()) {
    auto res = at::_scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2), saved.q, saved.k, saved.v, saved.out, saved.logsumexp,
        saved.cum_seq_q, saved.cum_seq_k, saved.max_q, saved.max_k, 0.0, true, saved.philox_seed,
        saved.philox_offset, scale);
    dq = std::get<0>(res);
    dk = std::get<1>(res);
    dv = std::get<2>(res);
  } else
#endif
  {
    auto res = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), saved.q, saved.k, saved.v, saved.out, saved.logsumexp, 0.0, true,
        std::nullopt, scale);
    dq = std::get<0>(res);
    dk = std::get<1>(res);
    dv = std::get<2>(res);
  }
  const int64_t r = saved.k.size(1) == hkv ? 1 : rep;
  return {dq.transpose(1, 2), reduce_kv(dk.transpose(1, 2), r), reduce_kv(dv.transpose(1, 2), r)};
}

}  // namespace titan::ops
