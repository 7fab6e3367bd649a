// Output head + cross-entropy, forward and backward fused chunk by chunk, on the whole
// vocabulary or on a vocabulary shard (loss parallel, or with gathered logits).
#include "titan/ops/cross_entropy.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "titan/ops/dispatch.h"
#include "titan/ops/linear.h"
#include "titan/ops/rmsnorm.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {

int64_t head_chunk_rows(int64_t n_rows, int64_t vocab, int64_t budget_bytes) {
  // Per row: logits in compute dtype plus two fp32 temporaries.
  const int64_t per_row = vocab * 10;
  int64_t rows = std::max<int64_t>(1, budget_bytes / per_row);
  if (rows >= 128) rows = rows / 128 * 128;
  return std::min(rows, n_rows);
}

namespace {

// Loss sum of a chunk of whole-vocabulary logits; with compute_grad, their gradient
// (softmax - onehot) * grad_scale in `logits`' dtype (in place where the kernel serves).
at::Tensor whole_vocab_loss(at::Tensor& logits, const at::Tensor& tgt, double grad_scale,
                            bool compute_grad, bool fused, at::Tensor* dl) {
#ifdef TITAN_WITH_CUDA
  if (fused) {
    // One pass over the logits: loss and (in place) the gradient of the logits.
    at::Tensor loss = kernels::cross_entropy_fwd_bwd(logits, tgt, grad_scale, compute_grad);
    if (compute_grad) *dl = logits;
    return loss;
  }
#endif
  (void)fused;
  at::Tensor lf = logits.to(at::kFloat);
  at::Tensor lse = at::logsumexp(lf, 1);
  at::Tensor picked = lf.gather(1, tgt.unsqueeze(1)).squeeze(1);
  if (compute_grad) {
    at::Tensor p = (lf - lse.unsqueeze(1)).exp_();
    p.scatter_add_(1, tgt.unsqueeze(1), at::full({lf.size(0), 1}, -1.0, p.options()));
    p.mul_(grad_scale);
    *dl = p.to(logits.scalar_type());
  }
  return (lse - picked).sum();
}

// Loss parallel: the loss sum of a chunk of this shard's logits [len, rows] from every rank's
// statistics, and this shard's part of the logits' gradient (in place where the kernels serve).
at::Tensor shard_loss(at::Tensor& logits, const at::Tensor& tgt, double grad_scale,
                      bool compute_grad, const VocabShard& shard, bool fused, at::Tensor* dl) {
  (void)fused;  // the CUDA kernels only
  const int64_t rows = logits.size(1);
  at::Tensor stats, lf, mine, idx;  // the ATen path's: fp32 logits, own targets, their columns
#ifdef TITAN_WITH_CUDA
  if (fused) stats = kernels::cross_entropy_shard_stats(logits, tgt, shard.begin);
#endif
  if (!stats.defined()) {
    at::Tensor local = tgt - shard.begin;
    mine = at::logical_and(local.ge(0), local.lt(rows));
    idx = at::where(mine, local, at::zeros_like(local)).unsqueeze(1);
    lf = logits.to(at::kFloat);
    at::Tensor m = std::get<0>(lf.max(1));
    at::Tensor s = (lf - m.unsqueeze(1)).exp().sum(1);
    at::Tensor t = at::where(mine, lf.gather(1, idx).squeeze(1), at::zeros_like(m));
    stats = at::stack({m, s, t}, 1);
  }
  at::Tensor all = shard.gather_stats(stats);  // [ranks, len, 3]
  at::Tensor ms = all.select(2, 0), ss = all.select(2, 1);
  at::Tensor gmax = std::get<0>(ms.max(0));
  at::Tensor lse = gmax + (ss * (ms - gmax.unsqueeze(0)).exp()).sum(0).log();
  at::Tensor loss = (lse - all.select(2, 2).sum(0)).sum();
  if (compute_grad) {
#ifdef TITAN_WITH_CUDA
    if (fused) {
      kernels::cross_entropy_shard_grad(logits, tgt, lse, shard.begin, grad_scale);
      *dl = logits;
      return loss;
    }
#endif
    at::Tensor p = (lf - lse.unsqueeze(1)).exp_();
    p.scatter_add_(1, idx, at::neg(mine.to(p.scalar_type())).unsqueeze(1));
    p.mul_(grad_scale);
    *dl = p.to(logits.scalar_type());
  }
  return loss;
}

}  // namespace

at::Tensor output_loss(const at::Tensor& hn, const at::Tensor& out_w, const at::Tensor& targets,
                       double grad_scale, const at::Tensor& dhn, at::Tensor* out_grad,
                       bool compute_grad, bool accumulate, const VocabShard* shard) {
  const int64_t n = hn.size(0);
  const int64_t rows = out_w.size(0);
  const bool gathered = shard && shard->gather_logits;
  const int64_t vocab = shard ? shard->vocab : rows;
  at::Tensor loss_sum = at::zeros({}, hn.options().dtype(at::kFloat));
  // The fused kernels keep only the compute-dtype logits (the gradient overwrites them), so
  // their chunks can be larger: fewer, taller GEMMs. Loss parallel holds [chunk, rows] logits.
  const int64_t width = shard && !gathered ? rows : vocab;
  const bool fused = use_fused(hn) && width % 8 == 0;
  const int64_t chunk =
      fused ? std::min<int64_t>(
                  n, std::max<int64_t>(128, (int64_t(1) << 30) / (width * 2) / 128 * 128))
            : head_chunk_rows(n, width, int64_t(512) << 20);
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t len = std::min(chunk, n - start);
    at::Tensor hc = hn.narrow(0, start, len);
    at::Tensor tgt = targets.narrow(0, start, len);
    at::Tensor logits = tuned_mm(hc, out_w.t());
    at::Tensor dl;
    if (!shard) {
      loss_sum.add_(whole_vocab_loss(logits, tgt, grad_scale, compute_grad, fused, &dl));
    } else if (gathered) {
      at::Tensor whole = shard->gather_logits(logits);
      at::Tensor dwhole;
      loss_sum.add_(whole_vocab_loss(whole, tgt, grad_scale, compute_grad, fused, &dwhole));
      if (compute_grad) dl = dwhole.narrow(1, shard->begin, rows).contiguous();
    } else {
      loss_sum.add_(shard_loss(logits, tgt, grad_scale, compute_grad, *shard, fused, &dl));
    }
    if (compute_grad) {
      at::Tensor dst = dhn.narrow(0, start, len);
      tuned_mm_out(dst, dl, out_w);
      linear_backward_weight(dl, hc, *out_grad, accumulate || start > 0);
    }
  }
  return loss_sum;
}

HeadResult head_forward_backward(const at::Tensor& h, const at::Tensor& norm_w,
                                 const at::Tensor& out_w, const at::Tensor& targets,
                                 double norm_eps, double grad_scale, at::Tensor* norm_grad,
                                 at::Tensor* out_grad, bool compute_grad, bool accumulate) {
  auto [hn, rstd] = rmsnorm_forward(h, norm_w, norm_eps);
  at::Tensor dhn = compute_grad ? at::empty_like(hn) : at::Tensor();
  HeadResult r;
  r.loss_sum = output_loss(hn, out_w, targets, grad_scale, dhn, out_grad, compute_grad, accumulate);
  if (compute_grad) r.dh = rmsnorm_backward(dhn, h, norm_w, rstd, *norm_grad, accumulate);
  return r;
}

}  // namespace titan::ops
