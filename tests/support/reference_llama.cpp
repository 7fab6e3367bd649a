// Autograd reference Llama 3 (textbook formulation: complex-free RoPE on pairs, repeat_kv,
// softmax attention with a causal mask, SwiGLU, log_softmax cross-entropy).
#include "support/reference_llama.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>

namespace titan::test {

model::LlamaArgs tiny_llama_args() {
  model::LlamaArgs a;
  a.dim = 64;
  a.n_layers = 2;
  a.n_heads = 4;
  a.n_kv_heads = 2;
  a.vocab_size = 96;
  a.multiple_of = 32;
  return a;
}

namespace {

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x * at::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

at::Tensor rope(const at::Tensor& x, const model::LlamaArgs& a) {
  // x: [B, S, H, hd]; pairs (2i, 2i+1) rotated by t * theta^(-2i/hd).
  const int64_t s = x.size(1), hd = x.size(3);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor inv = at::pow(a.rope_theta, -at::arange(0, hd, 2, opts) / double(hd));
  at::Tensor ang = at::outer(at::arange(s, opts), inv).to(at::kFloat);
  at::Tensor c = at::cos(ang).view({1, s, 1, hd / 2});
  at::Tensor sn = at::sin(ang).view({1, s, 1, hd / 2});
  at::Tensor xr = x.reshape({x.size(0), s, x.size(2), hd / 2, 2});
  at::Tensor x0 = xr.select(-1, 0), x1 = xr.select(-1, 1);
  return at::stack({x0 * c - x1 * sn, x0 * sn + x1 * c}, -1).reshape(x.sizes());
}

}  // namespace

ReferenceResult reference_loss_and_grads(const model::LlamaArgs& a,
                                         const std::vector<model::UnitLayout>& units,
                                         const std::vector<at::Tensor>& flat_params,
                                         const at::Tensor& tokens) {
  std::vector<at::Tensor> leaves;
  for (const auto& f : flat_params) leaves.push_back(f.detach().clone().set_requires_grad(true));
  auto P = [&](size_t unit, const std::string& suffix) {
    const auto& slot = units[unit].param(suffix);
    return leaves[unit].narrow(0, slot.offset, slot.numel).view(slot.shape);
  };
  const int64_t b = tokens.size(0), s = tokens.size(1) - 1;
  const int64_t hd = a.head_dim(), nh = a.n_heads, nkv = a.n_kv_heads;
  at::Tensor inputs = tokens.narrow(1, 0, s), labels = tokens.narrow(1, 1, s);
  at::Tensor h = at::embedding(P(0, "tok_embeddings.weight"), inputs);
  at::Tensor mask = at::ones({s, s}, at::kBool).triu(1);
  for (int64_t l = 0; l < a.n_layers; ++l) {
    const size_t u = static_cast<size_t>(l + 1);
    at::Tensor xn = rmsnorm(h, P(u, "attention_norm.weight"), a.norm_eps);
    at::Tensor q = at::matmul(xn, P(u, "attention.wq.weight").t()).view({b, s, nh, hd});
    at::Tensor k = at::matmul(xn, P(u, "attention.wk.weight").t()).view({b, s, nkv, hd});
    at::Tensor v = at::matmul(xn, P(u, "attention.wv.weight").t()).view({b, s, nkv, hd});
    q = rope(q, a);
    k = rope(k, a);
    k = k.repeat_interleave(nh / nkv, 2);
    v = v.repeat_interleave(nh / nkv, 2);
    at::Tensor qt = q.transpose(1, 2), kt = k.transpose(1, 2), vt = v.transpose(1, 2);
    at::Tensor scores = at::matmul(qt, kt.transpose(-1, -2)) / std::sqrt(double(hd));
    scores = scores.masked_fill(mask, -INFINITY);
    at::Tensor o = at::matmul(at::softmax(scores, -1), vt).transpose(1, 2).reshape({b, s, nh * hd});
    h = h + at::matmul(o, P(u, "attention.wo.weight").t());
    at::Tensor hn = rmsnorm(h, P(u, "ffn_norm.weight"), a.norm_eps);
    at::Tensor g = at::silu(at::matmul(hn, P(u, "feed_forward.w1.weight").t())) *
                   at::matmul(hn, P(u, "feed_forward.w3.weight").t());
    h = h + at::matmul(g, P(u, "feed_forward.w2.weight").t());
  }
  const size_t head = units.size() - 1;
  at::Tensor logits =
      at::matmul(rmsnorm(h, P(head, "norm.weight"), a.norm_eps), P(head, "output.weight").t());
  at::Tensor loss =
      at::nll_loss(at::log_softmax(logits.reshape({b * s, -1}), -1), labels.reshape({-1}));
  loss.backward();
  ReferenceResult r;
  r.loss_mean = loss.item<double>();
  for (auto& leaf : leaves) r.unit_grads.push_back(leaf.grad().clone());
  return r;
}

}  // namespace titan::test
