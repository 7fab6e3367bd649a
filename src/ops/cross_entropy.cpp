// Output head + cross-entropy, forward and backward fused chunk by chunk.
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

HeadResult head_forward_backward(const at::Tensor& h, const at::Tensor& norm_w,
                                 const at::Tensor& out_w, const at::Tensor& targets,
                                 double norm_eps, double grad_scale, at::Tensor* norm_grad,
                                 at::Tensor* out_grad, bool compute_grad, bool accumulate) {
  const int64_t n = h.size(0);
  const int64_t vocab = out_w.size(0);
  auto [hn, rstd] = rmsnorm_forward(h, norm_w, norm_eps);
  at::Tensor dhn = compute_grad ? at::empty_like(hn) : at::Tensor();
  at::Tensor loss_sum = at::zeros({}, h.options().dtype(at::kFloat));
  // The fused kernel keeps only the compute-dtype logits (its gradient overwrites them), so
  // its chunks can be larger: fewer, taller GEMMs.
  const bool fused = use_fused(h) && vocab % 8 == 0;
  (void)fused;
  const int64_t chunk =
      fused ? std::min<int64_t>(
                  n, std::max<int64_t>(128, (int64_t(1) << 30) / (vocab * 2) / 128 * 128))
            : head_chunk_rows(n, vocab, int64_t(512) << 20);
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t len = std::min(chunk, n - start);
    at::Tensor hc = hn.narrow(0, start, len);
    at::Tensor tgt = targets.narrow(0, start, len);
    at::Tensor logits = at::mm(hc, out_w.t());
#ifdef TITAN_WITH_CUDA
    if (fused) {
      // One pass over the logits: loss and (in place) the gradient of the logits.
      loss_sum.add_(kernels::cross_entropy_fwd_bwd(logits, tgt, grad_scale, compute_grad));
      if (compute_grad) {
        at::Tensor dst = dhn.narrow(0, start, len);
        at::mm_out(dst, logits, out_w);
        linear_backward_weight(logits, hc, *out_grad, accumulate || start > 0);
      }
      continue;
    }
#endif
    at::Tensor lf = logits.to(at::kFloat);
    at::Tensor lse = at::logsumexp(lf, 1);
    at::Tensor picked = lf.gather(1, tgt.unsqueeze(1)).squeeze(1);
    loss_sum.add_((lse - picked).sum());
    if (compute_grad) {
      at::Tensor p = (lf - lse.unsqueeze(1)).exp_();
      p.scatter_add_(1, tgt.unsqueeze(1), at::full({len, 1}, -1.0, p.options()));
      p.mul_(grad_scale);
      at::Tensor dl = p.to(h.scalar_type());
      dhn.narrow(0, start, len).copy_(at::mm(dl, out_w));
      linear_backward_weight(dl, hc, *out_grad, accumulate || start > 0);
    }
  }
  HeadResult r;
  r.loss_sum = loss_sum;
  if (compute_grad) r.dh = rmsnorm_backward(dhn, h, norm_w, rstd, *norm_grad, accumulate);
  return r;
}

}  // namespace titan::ops
