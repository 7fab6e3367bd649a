// Matrix products of the explicit forward/backward: y = x W^T, dx = dy W, and weight
// gradients accumulated straight into fp32 buffers (cuBLAS bf16 x bf16 -> fp32 on CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace titan::ops {

// x: [..., in], w: [out, in] -> [..., out]
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w);
// dy: [..., out], w: [out, in] -> dx [..., in]
at::Tensor linear_backward_input(const at::Tensor& dy, const at::Tensor& w);
// grad_w (fp32 [out, in]) += dy^T x (accumulate) or = dy^T x, with dy: [N, out], x: [N, in]
// (compute dtype).
void linear_backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                            bool accumulate);

}  // namespace titan::ops
