// Linear-layer products for the explicit forward/backward.
#include "titan/ops/linear.h"

#include "titan/util/error.h"

#include <ATen/ATen.h>

#include "titan/ops/dispatch.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w) {
  auto sizes = x.sizes().vec();
  at::Tensor y = at::mm(x.reshape({-1, x.size(-1)}), w.t());
  sizes.back() = w.size(0);
  return y.view(sizes);
}

at::Tensor linear_backward_input(const at::Tensor& dy, const at::Tensor& w) {
  auto sizes = dy.sizes().vec();
  at::Tensor dx = at::mm(dy.reshape({-1, dy.size(-1)}), w);
  sizes.back() = w.size(1);
  return dx.view(sizes);
}

void linear_backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                            bool accumulate) {
  at::Tensor dy2 = dy.reshape({-1, dy.size(-1)});
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
#ifdef TITAN_WITH_CUDA
  if (dy2.is_cuda()) {
    kernels::gemm_tn_fp32(dy2, x2, grad_w, accumulate);
    return;
  }
#endif
  if (dy2.scalar_type() == grad_w.scalar_type()) {
    if (accumulate) {
      grad_w.addmm_(dy2.t(), x2);
    } else {
      at::mm_out(const_cast<at::Tensor&>(grad_w), dy2.t(), x2);
    }
  } else if (accumulate) {
    grad_w.add_(at::mm(dy2.t(), x2).to(grad_w.scalar_type()));
  } else {
    grad_w.copy_(at::mm(dy2.t(), x2));
  }
}

const at::Tensor& LinearWeight::plain(const char* who) const {
  TITAN_INTERNAL_CHECK(!float8(), who, " was handed a float8 weight");
  return data;
}

at::Tensor Linear::forward(const at::Tensor& x, const LinearWeight& w,
                           at::Tensor* x_for_weight) const {
  if (x_for_weight) *x_for_weight = x;
  return linear_forward(x, w.plain("the plain Linear"));
}

at::Tensor Linear::backward_input(const at::Tensor& dy, const LinearWeight& w,
                                  at::Tensor* dy_for_weight) const {
  if (dy_for_weight) *dy_for_weight = dy;
  return linear_backward_input(dy, w.plain("the plain Linear"));
}

const Linear& plain_linear() {
  static const Linear plain;
  return plain;
}

}  // namespace titan::ops
