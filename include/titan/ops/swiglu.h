// SwiGLU gate: g = silu(a) * b, where [a | b] is the fused w1|w3 projection output.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace titan::ops {

// ab: [..., 2F] holding a = ab[..., :F] and b = ab[..., F:]. Returns g: [..., F].
// `amax` (optional): set to the largest |value| of the output as an fp32 scalar (for a float8
// tensorwise cast of it; taken in the kernel's own pass on CUDA).
at::Tensor swiglu_forward(const at::Tensor& ab, at::Tensor* amax = nullptr);
// Returns d(ab): [..., 2F].
at::Tensor swiglu_backward(const at::Tensor& dg, const at::Tensor& ab, at::Tensor* amax = nullptr);

at::Tensor swiglu_forward_ref(const at::Tensor& ab);
at::Tensor swiglu_backward_ref(const at::Tensor& dg, const at::Tensor& ab);

}  // namespace titan::ops
