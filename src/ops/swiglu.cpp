// SwiGLU gate: ATen reference and dispatch to the fused CUDA kernel.
#include "titan/ops/swiglu.h"

#include <ATen/ATen.h>

#include "titan/ops/dispatch.h"
#include "titan/ops/float8.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {

at::Tensor swiglu_forward_ref(const at::Tensor& ab) {
  const int64_t f = ab.size(-1) / 2;
  at::Tensor a = ab.narrow(-1, 0, f);
  at::Tensor b = ab.narrow(-1, f, f);
  return (at::silu(a.to(at::kFloat)) * b.to(at::kFloat)).to(ab.scalar_type());
}

at::Tensor swiglu_backward_ref(const at::Tensor& dg, const at::Tensor& ab) {
  const int64_t f = ab.size(-1) / 2;
  at::Tensor a = ab.narrow(-1, 0, f).to(at::kFloat);
  at::Tensor b = ab.narrow(-1, f, f).to(at::kFloat);
  at::Tensor g = dg.to(at::kFloat);
  at::Tensor sig = at::sigmoid(a);
  at::Tensor silu = a * sig;
  at::Tensor da = g * b * sig * (1 + a * (1 - sig));
  at::Tensor db = g * silu;
  return at::cat({da, db}, -1).to(ab.scalar_type());
}

at::Tensor swiglu_forward(const at::Tensor& ab, at::Tensor* amax) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(ab)) return kernels::swiglu_forward(ab, amax);
#endif
  return with_abs_max(swiglu_forward_ref(ab), amax);
}

at::Tensor swiglu_backward(const at::Tensor& dg, const at::Tensor& ab, at::Tensor* amax) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(ab)) return kernels::swiglu_backward(dg, ab, amax);
#endif
  return with_abs_max(swiglu_backward_ref(dg, ab), amax);
}

}  // namespace titan::ops
