// Linear-layer products for the explicit forward/backward.
#include "titan/ops/linear.h"

#include "titan/util/error.h"

#include <ATen/ATen.h>

#include "titan/ops/dispatch.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {
namespace {

#ifdef TITAN_WITH_CUDA
// The row-major matrix behind a 2-D operand and whether the operand is its transpose; false
// where neither dimension has unit stride.
bool row_major_of(const at::Tensor& t, at::Tensor* base, bool* transposed) {
  if (t.dim() != 2) return false;
  if (t.stride(1) == 1) {
    *base = t;
    *transposed = false;
    return true;
  }
  if (t.stride(0) == 1) {
    *base = t.t();
    *transposed = true;
    return true;
  }
  return false;
}

// out (+)= a b (+ addend) through kernels::gemm when the operands qualify; false otherwise.
bool try_tuned_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                    bool accumulate, const at::Tensor& addend = {}) {
  if (!a.is_cuda() || !kernels::gemm_tuning_enabled()) return false;
  at::Tensor ab, bb;
  bool ta = false, tb = false;
  if (!row_major_of(a, &ab, &ta) || !row_major_of(b, &bb, &tb) ||
      !kernels::gemm_supported(ab, bb, out)) {
    return false;
  }
  return kernels::gemm(ab, ta, bb, tb, out, accumulate, addend);
}
#endif

}  // namespace

at::Tensor tuned_mm(const at::Tensor& a, const at::Tensor& b) {
#ifdef TITAN_WITH_CUDA
  if (a.is_cuda() && a.scalar_type() == at::kBFloat16) {
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    if (try_tuned_gemm(out, a, b, false)) return out;
  }
#endif
  return at::mm(a, b);
}

void tuned_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  bool accumulate) {
#ifdef TITAN_WITH_CUDA
  if (try_tuned_gemm(out, a, b, accumulate)) return;
#endif
  auto& o = const_cast<at::Tensor&>(out);
  if (a.scalar_type() != out.scalar_type()) {
    if (accumulate) {
      o.add_(at::mm(a, b).to(out.scalar_type()));
    } else {
      o.copy_(at::mm(a, b));
    }
  } else if (accumulate) {
    o.addmm_(a, b);
  } else {
    at::mm_out(o, a, b);
  }
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w) {
  auto sizes = x.sizes().vec();
  at::Tensor y = tuned_mm(x.reshape({-1, x.size(-1)}), w.t());
  sizes.back() = w.size(0);
  return y.view(sizes);
}

at::Tensor linear_forward_add(const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& residual) {
#ifdef TITAN_WITH_CUDA
  if (x.is_cuda() && residual.is_contiguous() && residual.scalar_type() == x.scalar_type() &&
      residual.size(-1) == w.size(0) && residual.numel() / w.size(0) == x.numel() / x.size(-1)) {
    at::Tensor out = at::empty_like(residual, at::MemoryFormat::Contiguous);
    if (try_tuned_gemm(out.view({-1, w.size(0)}), x.reshape({-1, x.size(-1)}), w.t(), false,
                       residual.view({-1, w.size(0)}))) {
      return out;
    }
  }
#endif
  return residual + linear_forward(x, w).view_as(residual);
}

at::Tensor linear_backward_input(const at::Tensor& dy, const at::Tensor& w) {
  auto sizes = dy.sizes().vec();
  at::Tensor dx = tuned_mm(dy.reshape({-1, dy.size(-1)}), w);
  sizes.back() = w.size(1);
  return dx.view(sizes);
}

void linear_backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                            bool accumulate) {
  at::Tensor dy2 = dy.reshape({-1, dy.size(-1)});
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
#ifdef TITAN_WITH_CUDA
  if (dy2.is_cuda()) {
    const bool tuned =
        grad_w.is_contiguous() &&
        try_tuned_gemm(grad_w.view({dy2.size(1), x2.size(1)}), dy2.t(), x2, accumulate);
    if (!tuned) kernels::gemm_tn_fp32(dy2, x2, grad_w, accumulate);
    return;
  }
#endif
  tuned_mm_out(grad_w, dy2.t(), x2, accumulate);
}

const at::Tensor& LinearWeight::plain(const char* who) const {
  TITAN_INTERNAL_CHECK(!float8(), who, " was handed a float8 weight");
  return data;
}

at::Tensor Linear::weight_input(const at::Tensor& x, const at::Tensor& /*amax*/) const {
  return x;
}

at::Tensor Linear::forward(const at::Tensor& x, const LinearWeight& w, at::Tensor* x_for_weight,
                           const at::Tensor& /*amax*/) const {
  if (x_for_weight) *x_for_weight = x;
  return linear_forward(x, w.plain("the plain Linear"));
}

at::Tensor Linear::forward_add(const at::Tensor& x, const LinearWeight& w,
                               const at::Tensor& residual, at::Tensor* x_for_weight,
                               const at::Tensor& amax) const {
  return residual + forward(x, w, x_for_weight, amax).view_as(residual);
}

at::Tensor Linear::backward_input(const at::Tensor& dy, const LinearWeight& w,
                                  at::Tensor* dy_for_weight, const at::Tensor& /*amax*/) const {
  if (dy_for_weight) *dy_for_weight = dy;
  return linear_backward_input(dy, w.plain("the plain Linear"));
}

namespace {

// The plain product, which can add the residual in its GEMM.
class PlainLinear final : public Linear {
 public:
  at::Tensor forward_add(const at::Tensor& x, const LinearWeight& w, const at::Tensor& residual,
                         at::Tensor* x_for_weight, const at::Tensor& /*amax*/) const override {
    if (x_for_weight) *x_for_weight = x;
    return linear_forward_add(x, w.plain("the plain Linear"), residual);
  }
};

}  // namespace

const Linear& plain_linear() {
  static const PlainLinear plain;
  return plain;
}

}  // namespace titan::ops
