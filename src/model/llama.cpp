// Explicit forward/backward of the Llama 3 block, embedding and weight views.
#include "titan/model/llama.h"

#include <ATen/ATen.h>

#include "titan/ops/linear.h"
#include "titan/ops/rmsnorm.h"
#include "titan/ops/rope.h"
#include "titan/ops/swiglu.h"

namespace titan::model {
BlockWeights block_views(const UnitLayout& unit, const at::Tensor& flat) {
  GatheredUnit g;
  g.flat = flat;
  return block_views(unit, g);
}

BlockWeights block_views(const UnitLayout& unit, const GatheredUnit& g) {
  const BlockOffsets o = block_offsets(unit);
  const auto& wq = unit.param("attention.wq.weight");
  const auto& wk = unit.param("attention.wk.weight");
  const auto& wo = unit.param("attention.wo.weight");
  const auto& w1 = unit.param("feed_forward.w1.weight");
  const auto& w2 = unit.param("feed_forward.w2.weight");
  const int64_t dim = wq.shape[1];
  const int64_t qkv_rows = wq.shape[0] + 2 * wk.shape[0];
  auto view2d = [&](int64_t offset, int64_t rows, int64_t cols, at::Tensor* scale) {
    return g.view(unit, offset, rows * cols, scale).view({rows, cols});
  };
  BlockWeights w;
  w.attention_norm = g.view(unit, o.attention_norm, dim, nullptr);
  w.wqkv = view2d(o.wqkv, qkv_rows, dim, &w.wqkv_scale);
  w.wo = view2d(o.wo, wo.shape[0], wo.shape[1], &w.wo_scale);
  w.ffn_norm = g.view(unit, o.ffn_norm, dim, nullptr);
  w.w13 = view2d(o.w13, 2 * w1.shape[0], dim, &w.w13_scale);
  w.w2 = view2d(o.w2, w2.shape[0], w2.shape[1], &w.w2_scale);
  return w;
}

ScratchBlock scratch_block(const UnitLayout& unit, at::ScalarType dtype,
                           const c10::Device& device) {
  const auto opts = at::TensorOptions().device(device);
  ScratchBlock b;
  b.flat = at::randn({unit.numel}, opts.dtype(at::kFloat)).mul_(0.02).to(dtype);
  b.grad = at::zeros({unit.numel}, opts.dtype(at::kFloat));
  b.w = block_views(unit, b.flat);
  b.g = block_views(unit, b.grad);
  b.w.attention_norm.fill_(1);
  b.w.ffn_norm.fill_(1);
  return b;
}

size_t save_policy_index(SavePolicy p) {
  switch (p) {
    case SavePolicy::All: return 0;
    case SavePolicy::Matmuls: return 1;
    case SavePolicy::Attention: return 2;
    case SavePolicy::InputOnly: return 3;
  }
  return 0;
}

BlockPlan BlockPlan::whole(const LlamaArgs& a) {
  BlockPlan p;
  p.n_heads = a.n_heads;
  p.n_kv_heads = a.n_kv_heads;
  p.head_dim = a.head_dim();
  return p;
}

namespace {

// Where a projection casts its input to float8 with one scale, the kernel that writes that input
// takes its amax in the same pass (into *amax); else null, and no amax is taken.
at::Tensor* amax_for(const ops::Linear* projection, at::Tensor* amax) {
  return projection->takes_amax() ? amax : nullptr;
}

// The forward proper; `keep_all` stores every intermediate in `s`, otherwise only what the
// Matmuls policy keeps (the caller drops more for InputOnly). A recompute for the backward
// passes `need_output` false: nothing there reads the block's output, so the last projection
// (w2 and its residual add) is skipped and only its weight-gradient operand is formed, and an
// undefined tensor is returned. Projections go through the
// plan's Linears: under sequence parallel the column-parallel ones (q|k|v, w1|w3) gather the
// token shards and return [B * S, out], the row-parallel ones (wo, w2) return the reduced
// token shard, hence the views.
at::Tensor forward_impl(const LlamaArgs& a, const BlockPlan& p, const BlockWeights& w,
                        const Rope& rope, const at::Tensor& x, bool keep_all, BlockSaved& s,
                        bool need_output = true) {
  const int64_t b = x.size(0), seq = x.size(1) * p.seq_shards;
  const int64_t hd = p.head_dim, nh = p.n_heads, nkv = p.n_kv_heads;
  at::Tensor xn1_amax, hn2_amax, g_amax;
  auto [xn1, rstd1] =
      ops::rmsnorm_forward(x, w.attention_norm, a.norm_eps, amax_for(p.wqkv, &xn1_amax));
  at::Tensor xw;
  at::Tensor qkv = p.wqkv->forward(xn1, {w.wqkv, w.wqkv_scale}, keep_all ? &xw : nullptr, xn1_amax)
                       .view({b, seq, nh + 2 * nkv, hd});
  at::Tensor q = ops::rope_apply(qkv.narrow(2, 0, nh), rope.cos, rope.sin);
  at::Tensor k = ops::rope_apply(qkv.narrow(2, nh, nkv), rope.cos, rope.sin);
  at::Tensor v = qkv.narrow(2, nh + nkv, nkv);
  at::Tensor o = p.attention->forward(q, k, v, s.attn).reshape({b, seq, nh * hd});
  auto [h, hn2, rstd2] =
      ops::add_rmsnorm_forward(x, p.wo->forward(o, {w.wo, w.wo_scale}, nullptr).view_as(x),
                               w.ffn_norm, a.norm_eps, amax_for(p.w13, &hn2_amax));
  at::Tensor hw;
  at::Tensor ab = p.w13->forward(hn2, {w.w13, w.w13_scale}, keep_all ? &hw : nullptr, hn2_amax);
  at::Tensor g = ops::swiglu_forward(ab, amax_for(p.w2, &g_amax));
  at::Tensor gw, out;
  if (need_output) {
    out = p.w2->forward_add(g, {w.w2, w.w2_scale}, h, keep_all ? &gw : nullptr, g_amax);
  } else if (keep_all) {
    gw = p.w2->weight_input(g, g_amax);
  }
  s.x = x;
  s.qkv = qkv;
  s.o = o;
  s.h = h;
  s.ab = ab;
  if (keep_all) {
    s.rstd1 = rstd1;
    s.xn1 = xw;
    s.q = q;
    s.k = k;
    s.rstd2 = rstd2;
    s.hn2 = hw;
    s.g = gw;
  } else {
    // The attention kernel's own references to q/k are dropped too: backward rebuilds them.
    s.attn.q = at::Tensor();
    s.attn.k = at::Tensor();
    s.attn.v = at::Tensor();
  }
  return out;
}

}  // namespace

at::Tensor block_forward(const LlamaArgs& args, const BlockPlan& plan, const BlockWeights& w,
                         const Rope& rope, const at::Tensor& x, SavePolicy policy,
                         BlockSaved& saved) {
  saved.clear();
  saved.policy = policy;
  at::Tensor out = forward_impl(args, plan, w, rope, x, policy == SavePolicy::All, saved);
  if (policy == SavePolicy::InputOnly) {
    at::Tensor input = saved.x;
    saved.clear();
    saved.policy = policy;
    saved.x = input;
  }
  if (policy == SavePolicy::Attention) saved.ab = at::Tensor();
  return out;
}

at::Tensor block_backward(const LlamaArgs& a, const BlockPlan& p, const BlockWeights& w,
                          const Rope& rope, const at::Tensor& dout, BlockSaved& s,
                          const BlockGrads& grads, bool acc, DeferredWeightGrads* deferred) {
  const int64_t b = dout.size(0), seq = dout.size(1) * p.seq_shards;
  const int64_t hd = p.head_dim, nh = p.n_heads, nkv = p.n_kv_heads;
  if (s.policy == SavePolicy::InputOnly) {
    // Recompute the block up to w2's input, keeping every intermediate as the All policy does:
    // the norms, RoPE and SwiGLU run once, and w2's product (the block output) not at all.
    at::Tensor x = s.x;
    s.clear();
    forward_impl(a, p, w, rope, x, /*keep_all=*/true, s, /*need_output=*/false);
    s.policy = SavePolicy::All;
  }
  if (s.policy == SavePolicy::Matmuls || s.policy == SavePolicy::Attention) {
    // Recompute the cheap elementwise parts from the saved matmul outputs (and, keeping only
    // the attention half, the w1|w3 projection).
    at::Tensor xn1, hn2, xn1_amax, hn2_amax, g_amax;
    std::tie(xn1, s.rstd1) =
        ops::rmsnorm_forward(s.x, w.attention_norm, a.norm_eps, amax_for(p.wqkv, &xn1_amax));
    s.xn1 = p.wqkv->weight_input(xn1, xn1_amax);
    s.q = ops::rope_apply(s.qkv.narrow(2, 0, nh), rope.cos, rope.sin);
    s.k = ops::rope_apply(s.qkv.narrow(2, nh, nkv), rope.cos, rope.sin);
    // The kernel's saved output and logsumexp stay; only its input views are rebuilt.
    p.attention->bind_inputs(s.q, s.k, s.qkv.narrow(2, nh + nkv, nkv), s.attn);
    std::tie(hn2, s.rstd2) =
        ops::rmsnorm_forward(s.h, w.ffn_norm, a.norm_eps, amax_for(p.w13, &hn2_amax));
    if (s.policy == SavePolicy::Attention) {
      s.ab = p.w13->forward(hn2, {w.w13, w.w13_scale}, &s.hn2, hn2_amax);
    } else {
      s.hn2 = p.w13->weight_input(hn2, hn2_amax);
    }
    const at::Tensor g = ops::swiglu_forward(s.ab, amax_for(p.w2, &g_amax));
    s.g = p.w2->weight_input(g, g_amax);
  }
  // dW = dy^T x now, or its operands kept for block_backward_weight.
  auto weight_grad = [&](const ops::Linear& lin, const at::Tensor& dy, const at::Tensor& x,
                         const at::Tensor& gw, at::Tensor DeferredWeightGrads::*d,
                         at::Tensor DeferredWeightGrads::*xs) {
    if (deferred) {
      (*deferred).*d = dy;
      (*deferred).*xs = x;
    } else {
      lin.backward_weight(dy, x, gw, acc);
    }
  };
  // Feed-forward: out = h + w2(swiglu(w13(norm(h)))).
  at::Tensor dout_w;
  at::Tensor dg = p.w2->backward_input(dout, {w.w2, w.w2_scale}, &dout_w);
  weight_grad(*p.w2, dout_w, s.g, grads.w2, &DeferredWeightGrads::d_w2, &DeferredWeightGrads::x_w2);
  at::Tensor dab_amax, dab_w;
  at::Tensor dab = ops::swiglu_backward(dg, s.ab, amax_for(p.w13, &dab_amax));
  at::Tensor dhn2 = p.w13->backward_input(dab, {w.w13, w.w13_scale}, &dab_w, dab_amax).view_as(s.h);
  dab = at::Tensor();
  weight_grad(*p.w13, dab_w, s.hn2, grads.w13, &DeferredWeightGrads::d_w13,
              &DeferredWeightGrads::x_w13);
  at::Tensor ffn_norm_grad = grads.ffn_norm;
  // dh = dout + the norm's input gradient (one pass).
  at::Tensor dh_amax;
  at::Tensor dh = ops::rmsnorm_backward(dhn2, s.h, w.ffn_norm, s.rstd2, ffn_norm_grad, acc, dout,
                                        amax_for(p.wo, &dh_amax));
  // Attention: h = x + wo(attn(rope(q), rope(k), v)).
  at::Tensor dh_w;
  at::Tensor d_o =
      p.wo->backward_input(dh, {w.wo, w.wo_scale}, &dh_w, dh_amax).view({b, seq, nh, hd});
  weight_grad(*p.wo, dh_w, s.o, grads.wo, &DeferredWeightGrads::d_wo, &DeferredWeightGrads::x_wo);
  auto [dq, dk, dv] = p.attention->backward(d_o, s.attn, nkv);
  at::Tensor dqkv = at::empty({b, seq, nh + 2 * nkv, hd}, dout.options());
  ops::rope_apply_out(dq, rope.cos, rope.sin, /*inverse=*/true, dqkv.narrow(2, 0, nh));
  ops::rope_apply_out(dk, rope.cos, rope.sin, /*inverse=*/true, dqkv.narrow(2, nh, nkv));
  dqkv.narrow(2, nh + nkv, nkv).copy_(dv);
  at::Tensor dqkv_flat = dqkv.view({b, seq, (nh + 2 * nkv) * hd});
  at::Tensor dqkv_w;
  at::Tensor dxn1 = p.wqkv->backward_input(dqkv_flat, {w.wqkv, w.wqkv_scale}, &dqkv_w).view_as(s.x);
  weight_grad(*p.wqkv, dqkv_w, s.xn1, grads.wqkv, &DeferredWeightGrads::d_wqkv,
              &DeferredWeightGrads::x_wqkv);
  at::Tensor attn_norm_grad = grads.attention_norm;
  at::Tensor dx =
      ops::rmsnorm_backward(dxn1, s.x, w.attention_norm, s.rstd1, attn_norm_grad, acc, dh);
  s.clear();
  return dx;
}

void block_backward_weight(const BlockPlan& p, DeferredWeightGrads& d, const BlockGrads& grads,
                           bool acc) {
  p.w2->backward_weight(d.d_w2, d.x_w2, grads.w2, acc);
  p.w13->backward_weight(d.d_w13, d.x_w13, grads.w13, acc);
  p.wo->backward_weight(d.d_wo, d.x_wo, grads.wo, acc);
  p.wqkv->backward_weight(d.d_wqkv, d.x_wqkv, grads.wqkv, acc);
  d = DeferredWeightGrads{};
}

at::Tensor embedding_forward(const at::Tensor& table, const at::Tensor& tokens,
                             at::ScalarType dtype) {
  at::Tensor rows = at::index_select(table, 0, tokens.reshape({-1}));
  auto sizes = tokens.sizes().vec();
  sizes.push_back(table.size(1));
  return rows.to(dtype).view(sizes);
}

void embedding_backward(const at::Tensor& dh, const at::Tensor& tokens, at::Tensor& grad_table,
                        bool accumulate) {
  if (!accumulate) grad_table.zero_();
  grad_table.index_add_(0, tokens.reshape({-1}),
                        dh.reshape({-1, dh.size(-1)}).to(grad_table.scalar_type()));
}

}  // namespace titan::model
