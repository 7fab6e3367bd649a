// RMSNorm forward/backward over the last dimension. Statistics in fp32; output in x's dtype.
// CUDA builds dispatch to the fused kernel in src/kernels/rmsnorm.cu; elsewhere ATen ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace titan::ops {

// `amax` (optional): set to the largest |value| of the output (y, dx) as an fp32 scalar, the
// amax a float8 tensorwise cast of it needs (taken in the kernel's own pass on CUDA).

// y = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps). x: [..., D]; weight: [D].
// Returns (y, rstd [...] fp32).
std::tuple<at::Tensor, at::Tensor> rmsnorm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                   double eps, at::Tensor* amax = nullptr);

// The residual add and the norm after it: h = x + add, y = RMSNorm(h); returns (h, y, rstd),
// bit for bit what the two ops give (one pass on CUDA).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_forward(const at::Tensor& x,
                                                                   const at::Tensor& add,
                                                                   const at::Tensor& weight,
                                                                   double eps,
                                                                   at::Tensor* amax = nullptr);

// Returns dx (x's dtype), plus `residual` where defined (the residual stream's gradient: the
// sum rounds as a separate add would); adds d(weight) into `weight_grad` (fp32 [D]), or
// overwrites it when `accumulate` is false.
at::Tensor rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& rstd, const at::Tensor& weight_grad,
                            bool accumulate = true, const at::Tensor& residual = {},
                            at::Tensor* amax = nullptr);

// ATen reference versions (used by tests and as the CPU path).
std::tuple<at::Tensor, at::Tensor> rmsnorm_forward_ref(const at::Tensor& x,
                                                       const at::Tensor& weight, double eps);
at::Tensor rmsnorm_backward_ref(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& rstd, const at::Tensor& weight_grad,
                                bool accumulate = true, const at::Tensor& residual = {});

}  // namespace titan::ops
