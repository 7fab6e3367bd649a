// Causal GQA attention: explicit forward/backward over ATen's fused SDPA kernels.
// CUDA bf16/fp16: flash attention or cuDNN attention, whichever the probe at first use finds
// faster on the run's own shape (both checked against each other; TITAN_ATTENTION=flash|cudnn
// forces one); grouped KV heads are passed natively where the kernel handles them, expanded
// otherwise. CUDA fp32: the memory-efficient kernel. CPU: ATen's flash-for-CPU with KV heads
// expanded (its backward does not take grouped heads).
#include "titan/ops/attention.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <mutex>

#include "titan/util/error.h"
#include "titan/util/log.h"

#ifdef TITAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace titan::ops {
namespace {

// [B, S, Hkv, hd] -> [B, S, Hkv * rep, hd], each KV head repeated for its query group.
at::Tensor expand_kv(const at::Tensor& kv, int64_t rep) {
  if (rep == 1) return kv;
  auto s = kv.sizes();
  return kv.unsqueeze(3)
      .expand({s[0], s[1], s[2], rep, s[3]})
      .reshape({s[0], s[1], s[2] * rep, s[3]});
}

// Sum the gradients of repeated heads back onto their KV head: [B,S,Hkv*rep,hd] -> [B,S,Hkv,hd].
at::Tensor reduce_kv(const at::Tensor& g, int64_t rep) {
  if (rep == 1) return g;
  auto s = g.sizes();
  return g.reshape({s[0], s[1], s[2] / rep, rep, s[3]}).sum(3);
}

double scale_of(int64_t hd) {
  return 1.0 / std::sqrt(static_cast<double>(hd));
}

// Flash and cuDNN return the same 9-tuple: output, logsumexp, sequence bookkeeping, RNG state.
template <typename R>
void keep_flash_like(AttentionSaved& s, const R& r) {
  s.out = std::get<0>(r);
  s.logsumexp = std::get<1>(r);
  s.cum_seq_q = std::get<2>(r);
  s.cum_seq_k = std::get<3>(r);
  s.max_q = std::get<4>(r).guard_int(__FILE__, __LINE__);
  s.max_k = std::get<5>(r).guard_int(__FILE__, __LINE__);
  s.philox_seed = std::get<6>(r);
  s.philox_offset = std::get<7>(r);
}

// Runs the chosen kernel's forward on already bound inputs.
void kernel_forward(AttentionSaved& s) {
  const double scale = scale_of(s.q.size(3));
  switch (s.backend) {
    case AttentionBackend::CudaCudnn: {
      keep_flash_like(s, at::_scaled_dot_product_cudnn_attention(s.q, s.k, s.v, std::nullopt, true,
                                                                 0.0, true, false, scale));
      return;
    }
    case AttentionBackend::CudaFlash: {
      keep_flash_like(
          s, at::_scaled_dot_product_flash_attention(s.q, s.k, s.v, 0.0, true, false, scale));
      return;
    }
    case AttentionBackend::CudaEfficient: {
      auto r = at::_scaled_dot_product_efficient_attention(s.q, s.k, s.v, std::nullopt, true, 0.0,
                                                           true, scale);
      s.out = std::get<0>(r);
      s.logsumexp = std::get<1>(r);
      s.philox_seed = std::get<2>(r);
      s.philox_offset = std::get<3>(r);
      return;
    }
    case AttentionBackend::CpuFlash: {
      auto r = at::_scaled_dot_product_flash_attention_for_cpu(s.q, s.k, s.v, 0.0, true,
                                                               std::nullopt, scale);
      s.out = std::get<0>(r);
      s.logsumexp = std::get<1>(r);
      return;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_backward(const at::Tensor& dout_bhsd,
                                                               const AttentionSaved& s) {
  const double scale = scale_of(s.q.size(3));
  switch (s.backend) {
    case AttentionBackend::CudaCudnn:
      return at::_scaled_dot_product_cudnn_attention_backward(
          dout_bhsd, s.q, s.k, s.v, s.out, s.logsumexp, s.philox_seed, s.philox_offset,
          at::Tensor(), s.cum_seq_q, s.cum_seq_k, s.max_q, s.max_k, 0.0, true, scale);
    case AttentionBackend::CudaFlash:
      return at::_scaled_dot_product_flash_attention_backward(
          dout_bhsd, s.q, s.k, s.v, s.out, s.logsumexp, s.cum_seq_q, s.cum_seq_k, s.max_q, s.max_k,
          0.0, true, s.philox_seed, s.philox_offset, scale);
    case AttentionBackend::CudaEfficient: {
      auto r = at::_scaled_dot_product_efficient_attention_backward(
          dout_bhsd, s.q, s.k, s.v, at::Tensor(), s.out, s.logsumexp, s.philox_seed,
          s.philox_offset, 0.0, {true, true, true, false}, true, scale);
      return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    }
    case AttentionBackend::CpuFlash:
      return at::_scaled_dot_product_flash_attention_for_cpu_backward(
          dout_bhsd, s.q, s.k, s.v, s.out, s.logsumexp, 0.0, true, std::nullopt, scale);
  }
  internal_fail("unknown attention backend");
}

struct Choice {
  AttentionBackend backend = AttentionBackend::CudaFlash;
  bool native_gqa = false;
};

#ifdef TITAN_WITH_CUDA
std::mutex g_mu;
bool g_chosen = false;
Choice g_choice;
std::string g_description = "not chosen yet";

// Times fwd+bwd of a candidate on the real shape; returns ms, or -1 when it fails or disagrees
// with the reference outputs.
double try_candidate(Choice c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& dout, const at::Tensor* ref_out, const at::Tensor* ref_dq,
                     at::Tensor* out_copy, at::Tensor* dq_copy) {
  try {
    const int64_t rep = q.size(2) / k.size(2);
    auto run = [&]() {
      AttentionSaved s;
      s.backend = c.backend;
      s.q = q.transpose(1, 2);
      s.k = expand_kv(k, c.native_gqa ? 1 : rep).transpose(1, 2);
      s.v = expand_kv(v, c.native_gqa ? 1 : rep).transpose(1, 2);
      kernel_forward(s);
      auto g = kernel_backward(dout.transpose(1, 2), s);
      return std::make_pair(s.out.transpose(1, 2), std::get<0>(g).transpose(1, 2));
    };
    auto [o, dq] = run();  // warm-up (and correctness)
    if (ref_out) {
      const double eo =
          ((o.to(at::kFloat) - ref_out->to(at::kFloat)).norm() / ref_out->to(at::kFloat).norm())
              .item<double>();
      const double eg =
          ((dq.to(at::kFloat) - ref_dq->to(at::kFloat)).norm() / ref_dq->to(at::kFloat).norm())
              .item<double>();
      if (!(eo < 2e-2 && eg < 5e-2)) return -1;
    }
    if (out_copy) *out_copy = o.clone();
    if (dq_copy) *dq_copy = dq.clone();
    auto stream = at::cuda::getCurrentCUDAStream();
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    cudaEventRecord(t0, stream);
    for (int i = 0; i < 3; ++i) run();
    cudaEventRecord(t1, stream);
    cudaEventSynchronize(t1);
    float ms = 0;
    cudaEventElapsedTime(&ms, t0, t1);
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    return ms / 3;
  } catch (const std::exception&) {
    return -1;
  }
}

void choose(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  // Candidates on copies of the real inputs (random data of the same shape and dtype).
  at::Tensor qq = at::randn_like(q), kk = at::randn_like(k), vv = at::randn_like(v);
  at::Tensor dout = at::randn_like(qq);
  at::Tensor ref_out, ref_dq;
  const double flash_exp = try_candidate({AttentionBackend::CudaFlash, false}, qq, kk, vv, dout,
                                         nullptr, nullptr, &ref_out, &ref_dq);
  TITAN_INTERNAL_CHECK(flash_exp > 0, "flash attention failed on this GPU");
  std::vector<std::pair<Choice, double>> results = {
      {{AttentionBackend::CudaFlash, false}, flash_exp}};
  const bool gqa = q.size(2) != k.size(2);
  if (gqa) {
    results.push_back({{AttentionBackend::CudaFlash, true},
                       try_candidate({AttentionBackend::CudaFlash, true}, qq, kk, vv, dout,
                                     &ref_out, &ref_dq, nullptr, nullptr)});
    results.push_back({{AttentionBackend::CudaCudnn, true},
                       try_candidate({AttentionBackend::CudaCudnn, true}, qq, kk, vv, dout,
                                     &ref_out, &ref_dq, nullptr, nullptr)});
  }
  results.push_back({{AttentionBackend::CudaCudnn, false},
                     try_candidate({AttentionBackend::CudaCudnn, false}, qq, kk, vv, dout, &ref_out,
                                   &ref_dq, nullptr, nullptr)});
  // The fastest correct candidate, or the fastest of the forced kind (TITAN_ATTENTION).
  const char* force_env = std::getenv("TITAN_ATTENTION");
  const std::string force = force_env ? force_env : "";
  auto name_of = [](AttentionBackend b) {
    return b == AttentionBackend::CudaCudnn ? "cudnn" : "flash";
  };
  Choice best;
  double best_ms = -1;
  std::string report;
  // debug.deterministic: the first correct candidate in this fixed order, never a choice by
  // timing (two runs could pick different kernels, and so differ in their bits).
  const bool fixed = at::globalContext().deterministicAlgorithms();
  for (const auto& [c, ms] : results) {
    report += std::string(name_of(c.backend)) + (c.native_gqa ? "+gqa " : " ") +
              (ms > 0 ? fmt::format("{:.2f}ms", ms) : std::string("n/a")) + "; ";
    if (ms <= 0 || (!force.empty() && force != name_of(c.backend))) continue;
    if (best_ms < 0 || (!fixed && ms < best_ms)) {
      best = c;
      best_ms = ms;
    }
  }
  TITAN_CHECK(best_ms > 0, "TITAN_ATTENTION=", force, ": that attention kernel does not run here (",
              report, ")");
  g_choice = best;
  g_description = std::string(best.backend == AttentionBackend::CudaCudnn ? "cuDNN" : "flash") +
                  (best.native_gqa ? " (native GQA)" : (gqa ? " (expanded KV heads)" : "")) +
                  " [fwd+bwd probe: " + report + "]" +
                  (fixed ? " (debug.deterministic: the first that runs, not the fastest)" : "");
  log::info("attention kernel: {}", g_description);
}
#endif

}  // namespace

std::string attention_backend_name(bool cuda) {
#ifdef TITAN_WITH_CUDA
  if (cuda) return g_description;
#endif
  (void)cuda;
  return "flash-for-CPU (expanded KV heads)";
}

void attention_bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           AttentionSaved& saved) {
  const int64_t rep = q.size(2) / k.size(2);
  bool native = false;
  if (!q.is_cuda()) {
    saved.backend = AttentionBackend::CpuFlash;
  } else if (q.scalar_type() == at::kFloat) {
    saved.backend = AttentionBackend::CudaEfficient;
  } else {
#ifdef TITAN_WITH_CUDA
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_chosen) {
      choose(q, k, v);
      g_chosen = true;
    }
    saved.backend = g_choice.backend;
    native = g_choice.native_gqa;
#endif
  }
  saved.q = q.transpose(1, 2);
  saved.k = expand_kv(k, native ? 1 : rep).transpose(1, 2);
  saved.v = expand_kv(v, native ? 1 : rep).transpose(1, 2);
}

at::Tensor attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             AttentionSaved& saved) {
  attention_bind_inputs(q, k, v, saved);
  kernel_forward(saved);
  return saved.out.transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout,
                                                                  const AttentionSaved& saved,
                                                                  int64_t hkv) {
  const int64_t h = saved.q.size(1);
  const int64_t rep = saved.k.size(1) == hkv ? 1 : h / hkv;
  auto [dq, dk, dv] = kernel_backward(dout.transpose(1, 2), saved);
  return {dq.transpose(1, 2), reduce_kv(dk.transpose(1, 2), rep),
          reduce_kv(dv.transpose(1, 2), rep)};
}

namespace {

class LocalAttention final : public Attention {
 public:
  at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     AttentionSaved& saved) const override {
    return attention_forward(q, k, v, saved);
  }
  void bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   AttentionSaved& saved) const override {
    attention_bind_inputs(q, k, v, saved);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout,
                                                          const AttentionSaved& saved,
                                                          int64_t n_kv_heads) const override {
    return attention_backward(dout, saved, n_kv_heads);
  }
};

bool flash_block(const at::Tensor& q) {
  return !q.is_cuda() || q.scalar_type() != at::kFloat;
}

// Exact attention of a block in fp32 (CUDA fp32): scores, mask, softmax by hand.
at::Tensor block_scores(const at::Tensor& qh, const at::Tensor& kh, bool causal, double scale) {
  at::Tensor sc = at::matmul(qh.to(at::kFloat), kh.to(at::kFloat).transpose(-1, -2)) * scale;
  if (causal) {
    const int64_t l = sc.size(-1);
    sc.masked_fill_(at::ones({l, l}, sc.options().dtype(at::kBool)).triu(1), -INFINITY);
  }
  return sc;
}

}  // namespace

const Attention& local_attention() {
  static const LocalAttention local;
  return local;
}

std::pair<at::Tensor, at::Tensor> block_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, bool causal) {
  const int64_t rep = q.size(2) / k.size(2);
  const double scale = scale_of(q.size(3));
  const at::Tensor qh = q.transpose(1, 2);
  const at::Tensor kh = expand_kv(k, rep).transpose(1, 2);
  const at::Tensor vh = expand_kv(v, rep).transpose(1, 2);
  if (!flash_block(q)) {
    at::Tensor sc = block_scores(qh, kh, causal, scale);
    at::Tensor lse = at::logsumexp(sc, -1);
    at::Tensor out = at::matmul((sc - lse.unsqueeze(-1)).exp_(), vh.to(at::kFloat));
    return {out.transpose(1, 2).to(q.scalar_type()), lse};
  }
#ifdef TITAN_WITH_CUDA
  if (q.is_cuda()) {
    auto r = at::_scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, false, scale);
    return {std::get<0>(r).transpose(1, 2), std::get<1>(r)};
  }
#endif
  auto r =
      at::_scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, std::nullopt, scale);
  return {std::get<0>(r).transpose(1, 2), std::get<1>(r).to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal) {
  const int64_t rep = q.size(2) / k.size(2);
  const double scale = scale_of(q.size(3));
  const at::Tensor qh = q.transpose(1, 2);
  const at::Tensor kh = expand_kv(k, rep).transpose(1, 2);
  const at::Tensor vh = expand_kv(v, rep).transpose(1, 2);
  const at::Tensor doh = dout.transpose(1, 2);
  const at::Tensor oh = out.transpose(1, 2);
  at::Tensor dq, dk, dv;
  if (!flash_block(q)) {
    // P = exp(S - lse); dV = P^T dO; dS = P (dO V^T - rowsum(dO o O)); dQ = dS K s; dK = dS^T Q s.
    at::Tensor p = (block_scores(qh, kh, causal, scale) - lse.unsqueeze(-1)).exp_();
    at::Tensor dof = doh.to(at::kFloat);
    at::Tensor d = (dof * oh.to(at::kFloat)).sum(-1, true);
    at::Tensor ds = p * (at::matmul(dof, vh.to(at::kFloat).transpose(-1, -2)) - d);
    dv = at::matmul(p.transpose(-1, -2), dof);
    dq = at::matmul(ds, kh.to(at::kFloat)) * scale;
    dk = at::matmul(ds.transpose(-1, -2), qh.to(at::kFloat)) * scale;
  } else {
#ifdef TITAN_WITH_CUDA
    if (q.is_cuda()) {
      const at::Tensor none;
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_backward(
          doh, qh, kh, vh, oh, lse.contiguous(), none, none, q.size(1), k.size(1), 0.0, causal,
          at::empty({2}, q.options().dtype(at::kLong)), at::empty({}, q.options().dtype(at::kLong)),
          scale);
    }
#endif
    if (!dq.defined()) {
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          doh, qh, kh, vh, oh, lse.contiguous(), 0.0, causal, std::nullopt, scale);
    }
  }
  const auto dt = q.scalar_type();
  return {dq.transpose(1, 2).to(dt), reduce_kv(dk.transpose(1, 2), rep).to(dt),
          reduce_kv(dv.transpose(1, 2), rep).to(dt)};
}

void merge_attention(at::Tensor& out, at::Tensor& lse, const at::Tensor& part_out,
                     const at::Tensor& part_lse) {
  if (!out.defined()) {
    out = part_out.to(at::kFloat);
    lse = part_lse.to(at::kFloat);
    return;
  }
  at::Tensor merged = at::logaddexp(lse, part_lse);
  // [B, H, L] weights onto [B, L, H, hd] outputs.
  at::Tensor w_old = (lse - merged).exp().transpose(1, 2).unsqueeze(-1);
  at::Tensor w_new = (part_lse - merged).exp().transpose(1, 2).unsqueeze(-1);
  out.mul_(w_old).add_(part_out.to(at::kFloat) * w_new);
  lse = merged;
}

}  // namespace titan::ops
