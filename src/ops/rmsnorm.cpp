// RMSNorm: ATen reference and dispatch to the fused CUDA kernel.
#include "titan/ops/rmsnorm.h"

#include <ATen/ATen.h>

#include "titan/ops/dispatch.h"
#include "titan/ops/float8.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {

std::tuple<at::Tensor, at::Tensor> rmsnorm_forward_ref(const at::Tensor& x,
                                                       const at::Tensor& weight, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor rstd = at::rsqrt(xf.pow(2).mean(-1) + eps);
  at::Tensor y = (xf * rstd.unsqueeze(-1) * weight.to(at::kFloat)).to(x.scalar_type());
  return {y, rstd};
}

at::Tensor rmsnorm_backward_ref(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& rstd, const at::Tensor& weight_grad,
                                bool accumulate, const at::Tensor& residual) {
  const int64_t d = x.size(-1);
  at::Tensor xhat = x.to(at::kFloat) * rstd.unsqueeze(-1);
  at::Tensor dyf = dy.to(at::kFloat);
  at::Tensor dw = (dyf * xhat).reshape({-1, d}).sum(0);
  if (accumulate) {
    weight_grad.add_(dw);
  } else {
    weight_grad.copy_(dw);
  }
  at::Tensor dxhat = dyf * weight.to(at::kFloat);
  at::Tensor dot = (dxhat * xhat).mean(-1, /*keepdim=*/true);
  at::Tensor dx = (rstd.unsqueeze(-1) * (dxhat - xhat * dot)).to(x.scalar_type());
  return residual.defined() ? residual + dx : dx;
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                   double eps, at::Tensor* amax) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(x)) return kernels::rmsnorm_forward(x, weight, eps, amax);
#endif
  auto r = rmsnorm_forward_ref(x, weight, eps);
  with_abs_max(std::get<0>(r), amax);
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_forward(const at::Tensor& x,
                                                                   const at::Tensor& add,
                                                                   const at::Tensor& weight,
                                                                   double eps, at::Tensor* amax) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(x)) return kernels::add_rmsnorm_forward(x, add, weight, eps, amax);
#endif
  at::Tensor h = x + add;
  auto [y, rstd] = rmsnorm_forward_ref(h, weight, eps);
  return {h, with_abs_max(y, amax), rstd};
}

at::Tensor rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& rstd, const at::Tensor& weight_grad, bool accumulate,
                            const at::Tensor& residual, at::Tensor* amax) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(x)) {
    return kernels::rmsnorm_backward(dy, x, weight, rstd, weight_grad, accumulate, residual, amax);
  }
#endif
  return with_abs_max(rmsnorm_backward_ref(dy, x, weight, rstd, weight_grad, accumulate, residual),
                      amax);
}

}  // namespace titan::ops
