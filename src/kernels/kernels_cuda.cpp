// Tensor-level entry points of titan's CUDA kernels: checks, allocation, the operands' device and
// its current stream, and the cuBLAS call for fp32-accumulated weight gradients. Falls back to
// the ATen reference when a shape or layout is outside what a kernel handles.
#include "titan/kernels/kernels.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <optional>

#include "cublas_check.h"
#include "launchers.h"
#include "titan/ops/float8.h"
#include "titan/ops/rmsnorm.h"
#include "titan/ops/rope.h"
#include "titan/ops/swiglu.h"
#include "titan/util/error.h"

namespace titan::kernels {
namespace {

bool supported(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat;
}
launch::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? launch::DType::BF16 : launch::DType::F32;
}
int64_t vec_of(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? 8 : 4;
}
bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}
cudaStream_t stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

// A fresh fp32 scalar for a kernel's amax output (`want` null: none).
float* amax_slot(at::Tensor* want, const at::Tensor& like) {
  if (want == nullptr) return nullptr;
  *want = at::empty({}, like.options().dtype(at::kFloat));
  return want->data_ptr<float>();
}

// RMSNorm of x, or (with `add` defined) of h = x + add, returned third; nullopt where the
// kernel does not take the operands.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> rmsnorm_fused(
    const at::Tensor& x_in, const at::Tensor& add_in, const at::Tensor& w, double eps,
    at::Tensor* amax) {
  const int64_t dim = x_in.size(-1);
  at::Tensor x = x_in.contiguous();
  at::Tensor add = add_in.defined() ? add_in.contiguous() : at::Tensor();
  if (!supported(x) || w.scalar_type() != x.scalar_type() || dim % vec_of(x) != 0 ||
      !aligned16(x) || !aligned16(w) ||
      (add.defined() &&
       (add.scalar_type() != x.scalar_type() || add.sizes() != x.sizes() || !aligned16(add)))) {
    return std::nullopt;
  }
  const int64_t rows = x.numel() / dim;
  at::Tensor y = at::empty_like(x);
  at::Tensor sum = add.defined() ? at::empty_like(x) : at::Tensor();
  auto rsizes = x.sizes().vec();
  rsizes.pop_back();
  at::Tensor rstd = at::empty(rsizes, x.options().dtype(at::kFloat));
  launch::rmsnorm_forward(dtype_of(x), x.data_ptr(), add.defined() ? add.data_ptr() : nullptr,
                          sum.defined() ? sum.data_ptr() : nullptr, w.data_ptr(), y.data_ptr(),
                          rstd.data_ptr<float>(), rows, dim, static_cast<float>(eps),
                          amax_slot(amax, x), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(y, rstd, sum);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rmsnorm_forward(const at::Tensor& x, const at::Tensor& w,
                                                   double eps, at::Tensor* amax) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto r = rmsnorm_fused(x, at::Tensor(), w, eps, amax);
  if (!r) {
    auto [y, rstd] = ops::rmsnorm_forward_ref(x, w, eps);
    return {ops::with_abs_max(y, amax), rstd};
  }
  return {std::get<0>(*r), std::get<1>(*r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_forward(const at::Tensor& x,
                                                                   const at::Tensor& add,
                                                                   const at::Tensor& w, double eps,
                                                                   at::Tensor* amax) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto r = rmsnorm_fused(x, add, w, eps, amax);
  if (r) return {std::get<2>(*r), std::get<0>(*r), std::get<1>(*r)};
  // The separate add and norm (the kernel where it takes h), as the fused pass would give.
  at::Tensor h = x + add;
  auto [y, rstd] = rmsnorm_forward(h, w, eps, amax);
  return {h, y, rstd};
}

at::Tensor rmsnorm_backward(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w,
                            const at::Tensor& rstd, const at::Tensor& weight_grad, bool accumulate,
                            const at::Tensor& residual_in, at::Tensor* amax) {
  const c10::cuda::CUDAGuard device_guard(dy_in.device());
  const int64_t dim = x_in.size(-1);
  at::Tensor x = x_in.contiguous();
  at::Tensor dy = dy_in.contiguous();
  at::Tensor residual = residual_in.defined() ? residual_in.contiguous() : at::Tensor();
  if (!supported(x) || dy.scalar_type() != x.scalar_type() || w.scalar_type() != x.scalar_type() ||
      dim % vec_of(x) != 0 || !aligned16(x) || !aligned16(dy) || !aligned16(w) ||
      weight_grad.scalar_type() != at::kFloat || !weight_grad.is_contiguous()) {
    return ops::with_abs_max(
        ops::rmsnorm_backward_ref(dy_in, x_in, w, rstd, weight_grad, accumulate, residual_in),
        amax);
  }
  if (residual.defined() && (residual.scalar_type() != x.scalar_type() ||
                             residual.sizes() != x.sizes() || !aligned16(residual))) {
    // A residual the pass does not take: the kernel's gradient, then a separate add.
    return ops::with_abs_max(
        residual_in + rmsnorm_backward(dy_in, x_in, w, rstd, weight_grad, accumulate), amax);
  }
  const int64_t rows = x.numel() / dim;
  at::Tensor dx = at::empty_like(x);
  const int blocks = launch::rmsnorm_backward_blocks(rows);
  at::Tensor partial = at::empty({blocks, dim}, x.options().dtype(at::kFloat));
  launch::rmsnorm_backward(
      dtype_of(x), dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.contiguous().data_ptr<float>(),
      residual.defined() ? residual.data_ptr() : nullptr, dx.data_ptr(), partial.data_ptr<float>(),
      weight_grad.data_ptr<float>(), rows, dim, accumulate, amax_slot(amax, x), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

void rope_apply_out(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
                    const at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  TITAN_INTERNAL_CHECK(
      x.dim() == 4 && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
      "rope_apply_out needs matching [B, S, H, hd] tensors");
  if (!supported(x) || x.stride(3) != 1 || out.stride(3) != 1 || x.size(3) % 2 != 0 ||
      x.stride(2) % 2 != 0 || out.stride(2) % 2 != 0) {
    out.copy_(ops::rope_apply_ref(x, cos, sin, inverse));
    return;
  }
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  launch::rope(dtype_of(x), x.data_ptr(), xs, out.data_ptr(), os, c.data_ptr<float>(),
               s.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.size(3), inverse, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool inverse) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_apply_out(x, cos, sin, inverse, out);
  return out;
}

at::Tensor swiglu_forward(const at::Tensor& ab_in, at::Tensor* amax) {
  const c10::cuda::CUDAGuard device_guard(ab_in.device());
  const int64_t f = ab_in.size(-1) / 2;
  at::Tensor ab = ab_in.contiguous();
  if (!supported(ab) || f % vec_of(ab) != 0 || !aligned16(ab))
    return ops::with_abs_max(ops::swiglu_forward_ref(ab_in), amax);
  auto sizes = ab.sizes().vec();
  sizes.back() = f;
  at::Tensor g = at::empty(sizes, ab.options());
  launch::swiglu_forward(dtype_of(ab), ab.data_ptr(), g.data_ptr(), ab.numel() / (2 * f), f,
                         amax_slot(amax, ab), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

at::Tensor swiglu_backward(const at::Tensor& dg_in, const at::Tensor& ab_in, at::Tensor* amax) {
  const c10::cuda::CUDAGuard device_guard(dg_in.device());
  const int64_t f = ab_in.size(-1) / 2;
  at::Tensor ab = ab_in.contiguous();
  at::Tensor dg = dg_in.contiguous();
  if (!supported(ab) || dg.scalar_type() != ab.scalar_type() || f % vec_of(ab) != 0 ||
      !aligned16(ab) || !aligned16(dg)) {
    return ops::with_abs_max(ops::swiglu_backward_ref(dg_in, ab_in), amax);
  }
  at::Tensor dab = at::empty_like(ab);
  launch::swiglu_backward(dtype_of(ab), dg.data_ptr(), ab.data_ptr(), dab.data_ptr(),
                          ab.numel() / (2 * f), f, amax_slot(amax, ab), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dab;
}

at::Tensor cross_entropy_fwd_bwd(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                                 bool write_grad) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  TITAN_INTERNAL_CHECK(logits.dim() == 2 && logits.is_contiguous() && supported(logits) &&
                           logits.size(1) % vec_of(logits) == 0 && aligned16(logits),
                       "cross_entropy kernel needs contiguous [rows, V] logits, V % 8 == 0");
  const int64_t rows = logits.size(0);
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor tgt = targets.contiguous().to(at::kLong);
  launch::cross_entropy(dtype_of(logits), logits.data_ptr(), tgt.data_ptr<int64_t>(),
                        losses.data_ptr<float>(), rows, logits.size(1),
                        static_cast<float>(grad_scale), write_grad, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return losses.sum();
}

at::Tensor cross_entropy_shard_stats(const at::Tensor& logits, const at::Tensor& targets,
                                     int64_t begin) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  TITAN_INTERNAL_CHECK(logits.dim() == 2 && logits.is_contiguous() && supported(logits) &&
                           logits.size(1) % vec_of(logits) == 0 && aligned16(logits),
                       "cross_entropy_shard_stats needs contiguous [rows, V] logits, V % 8 == 0");
  const int64_t rows = logits.size(0);
  at::Tensor stats = at::empty({rows, 3}, logits.options().dtype(at::kFloat));
  at::Tensor tgt = targets.contiguous().to(at::kLong);
  launch::cross_entropy_shard_stats(dtype_of(logits), logits.data_ptr(), tgt.data_ptr<int64_t>(),
                                    stats.data_ptr<float>(), rows, logits.size(1), begin, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

void cross_entropy_shard_grad(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              int64_t begin, double grad_scale) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  TITAN_INTERNAL_CHECK(logits.dim() == 2 && logits.is_contiguous() && supported(logits) &&
                           logits.size(1) % vec_of(logits) == 0 && aligned16(logits) &&
                           lse.scalar_type() == at::kFloat && lse.numel() == logits.size(0),
                       "cross_entropy_shard_grad needs contiguous [rows, V] logits, V % 8 == 0, "
                       "and fp32 lse [rows]");
  at::Tensor tgt = targets.contiguous().to(at::kLong);
  at::Tensor l = lse.contiguous();
  launch::cross_entropy_shard_grad(dtype_of(logits), logits.data_ptr(), tgt.data_ptr<int64_t>(),
                                   l.data_ptr<float>(), logits.size(0), logits.size(1), begin,
                                   static_cast<float>(grad_scale), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adamw_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const at::Tensor& shadow, const at::Tensor& hyper,
                const at::Tensor& divisor, bool decoupled, const at::Tensor& amax) {
  const c10::cuda::CUDAGuard device_guard(param.device());
  TITAN_INTERNAL_CHECK(!amax.defined() || (amax.is_cuda() && amax.scalar_type() == at::kFloat &&
                                           amax.numel() == 1 && amax.device() == param.device()),
                       "adamw_step amax must be one fp32 element on the parameter's device");
  for (const at::Tensor* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    TITAN_INTERNAL_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                             aligned16(*t) && t->numel() == param.numel(),
                         "adamw_step needs contiguous aligned fp32 CUDA tensors");
  }
  TITAN_INTERNAL_CHECK(!shadow.defined() || (shadow.scalar_type() == at::kBFloat16 &&
                                             shadow.numel() == param.numel() && aligned16(shadow)),
                       "adamw_step shadow must be bf16 of the parameter's size");
  launch::adamw(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                exp_avg_sq.data_ptr<float>(), shadow.defined() ? shadow.data_ptr() : nullptr,
                param.numel(), hyper.data_ptr<float>(),
                divisor.defined() ? divisor.data_ptr<float>() : nullptr, decoupled,
                amax.defined() ? amax.data_ptr<float>() : nullptr, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sum_of_squares(const std::vector<at::Tensor>& xs) {
  TITAN_INTERNAL_CHECK(!xs.empty(), "sum_of_squares of no tensors");
  const c10::cuda::CUDAGuard device_guard(xs.front().device());
  int64_t blocks = 0;
  for (const auto& x : xs) {
    TITAN_INTERNAL_CHECK(
        x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous() && aligned16(x),
        "sum_of_squares needs contiguous aligned fp32 CUDA tensors");
    blocks += launch::sum_squares_blocks(x.numel());
  }
  // Every block writes its partial, so only an all-empty list needs a zero.
  const auto opts = xs.front().options().dtype(at::kDouble);
  if (blocks == 0) return at::zeros({}, opts.dtype(at::kFloat));
  at::Tensor partials = at::empty({blocks}, opts);
  int64_t at_block = 0;
  for (const auto& x : xs) {
    launch::sum_squares(x.data_ptr<float>(), x.numel(), partials.data_ptr<double>() + at_block,
                        stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at_block += launch::sum_squares_blocks(x.numel());
  }
  return partials.sum().to(at::kFloat);
}

void gemm_tn_fp32(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& grad,
                  bool accumulate) {
  const c10::cuda::CUDAGuard device_guard(dy_in.device());
  TITAN_INTERNAL_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous(),
                       "fp32 contiguous gradient expected");
  at::Tensor dy = dy_in.contiguous();
  at::Tensor x = x_in.contiguous();
  if (dy.scalar_type() == at::kFloat) {
    at::Tensor g = grad.view({dy.size(1), x.size(1)});
    if (accumulate) {
      g.addmm_(dy.t(), x);
    } else {
      at::mm_out(g, dy.t(), x);
    }
    return;
  }
  TITAN_INTERNAL_CHECK(dy.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16,
                       "bf16 operands expected");
  const int64_t n = dy.size(0), out = dy.size(1), in = x.size(1);
  // Row-major grad[out, in] is column-major grad^T[in, out] = x^T[in, N] * dy[N, out].
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TITAN_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(in),
                                  static_cast<int>(out), static_cast<int>(n), &alpha, x.data_ptr(),
                                  CUDA_R_16BF, static_cast<int>(in), dy.data_ptr(), CUDA_R_16BF,
                                  static_cast<int>(out), &beta, grad.data_ptr(), CUDA_R_32F,
                                  static_cast<int>(in), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void float8_cast(const at::Tensor& x_in, int mode, bool pow2, const at::Tensor& out,
                 const at::Tensor& out_t, const at::Tensor& inv_scale,
                 const at::Tensor& given_amax) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto dtype = (out.defined() ? out : out_t).scalar_type();
  TITAN_INTERNAL_CHECK(x.dim() == 2 && supported(x) && aligned16(x) &&
                           (dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2),
                       "float8_cast: unsupported input");
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t scales = mode == 0 ? 1 : mode == 1 ? rows : cols;
  TITAN_INTERNAL_CHECK(inv_scale.numel() == scales && inv_scale.scalar_type() == at::kFloat,
                       "float8_cast: inverse scales");
  at::Tensor amax = given_amax;
  if (amax.defined()) {
    TITAN_INTERNAL_CHECK(amax.numel() == scales && amax.scalar_type() == at::kFloat &&
                             amax.is_contiguous() && amax.device() == x.device(),
                         "float8_cast: the given amax");
  } else {
    amax = at::empty({scales}, x.options().dtype(at::kFloat));
    launch::float8_amax(dtype_of(x), x.data_ptr(), rows, cols, mode, amax.data_ptr<float>(),
                        stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch::float8_cast(dtype_of(x), x.data_ptr(), rows, cols, amax.data_ptr<float>(), mode, pow2,
                      dtype == at::kFloat8_e4m3fn, out.defined() ? out.data_ptr() : nullptr,
                      out_t.defined() ? out_t.data_ptr() : nullptr, inv_scale.data_ptr<float>(),
                      stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void float8_amax_flat(const at::Tensor& x, const at::Tensor& amax) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  TITAN_INTERNAL_CHECK(x.is_cuda() && supported(x) && x.is_contiguous() && aligned16(x) &&
                           amax.scalar_type() == at::kFloat && amax.numel() == 1,
                       "float8_amax_flat: unsupported operands");
  launch::float8_amax(dtype_of(x), x.data_ptr(), 1, x.numel(), 0, amax.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void float8_cast_flat(const at::Tensor& x, const at::Tensor& amax, const at::Tensor& out,
                      const at::Tensor& inv_scale) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  TITAN_INTERNAL_CHECK(x.is_cuda() && supported(x) && x.is_contiguous() && aligned16(x) &&
                           out.scalar_type() == at::kFloat8_e4m3fn && out.is_contiguous() &&
                           out.numel() == x.numel() &&
                           reinterpret_cast<uintptr_t>(out.data_ptr()) % 8 == 0 &&
                           amax.scalar_type() == at::kFloat && amax.numel() == 1 &&
                           inv_scale.scalar_type() == at::kFloat && inv_scale.numel() == 1,
                       "float8_cast_flat: unsupported operands");
  launch::float8_cast(dtype_of(x), x.data_ptr(), 1, x.numel(), amax.data_ptr<float>(), 0, false,
                      true, out.data_ptr(), nullptr, inv_scale.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool transpose_float8(const at::Tensor& x, const at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  TITAN_INTERNAL_CHECK(x.is_cuda() && x.dim() == 2 && x.element_size() == 1 &&
                           out.element_size() == 1 && out.dim() == 2 && out.size(0) == x.size(1) &&
                           out.size(1) == x.size(0),
                       "transpose_float8: unsupported operands");
  if (!x.is_contiguous() || !out.is_contiguous()) return false;
  const bool done =
      launch::transpose_bytes(x.data_ptr(), x.size(0), x.size(1), out.data_ptr(), stream());
  if (done) C10_CUDA_KERNEL_LAUNCH_CHECK();
  return done;
}

}  // namespace titan::kernels
