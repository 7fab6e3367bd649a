// Matrix products of the explicit forward/backward: y = x W^T, dx = dy W, and weight
// gradients accumulated straight into fp32 buffers (cuBLAS bf16 x bf16 -> fp32 on CUDA), plus
// the Linear interface through which block code runs every projection.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace titan::ops {

// a [M, K] @ b [K, N] as at::mm, where either may be a transposed view of a row-major matrix:
// on CUDA (bf16) titan's tuned cuBLASLt GEMM (kernels::gemm), elsewhere ATen. tuned_mm_out writes
// (or, with `accumulate`, adds) into out [M, N].
at::Tensor tuned_mm(const at::Tensor& a, const at::Tensor& b);
void tuned_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  bool accumulate = false);

// x: [..., in], w: [out, in] -> [..., out]
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w);
// residual + x W^T with residual: [..., out]; on CUDA the add is the GEMM's epilogue (one
// rounding instead of two).
at::Tensor linear_forward_add(const at::Tensor& x, const at::Tensor& w, const at::Tensor& residual);
// dy: [..., out], w: [out, in] -> dx [..., in]
at::Tensor linear_backward_input(const at::Tensor& dy, const at::Tensor& w);
// grad_w (fp32 [out, in]) += dy^T x (accumulate) or = dy^T x, with dy: [N, out], x: [N, in]
// (compute dtype).
void linear_backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                            bool accumulate);

// A projection's weight as the block hands it over: the matrix in the compute dtype, or (the
// float8 FSDP all-gather) already in float8 e4m3 with its fp32 inverse scale (W ~ data *
// inv_scale), which only the float8 Linear takes.
struct LinearWeight {
  LinearWeight(const at::Tensor& w) : data(w) {}  // NOLINT: implicit from a plain weight
  LinearWeight(at::Tensor w, at::Tensor scale) : data(std::move(w)), inv_scale(std::move(scale)) {}
  bool float8() const { return inv_scale.defined(); }
  // data, after checking it is a plain weight (`who` names the Linear in the error).
  const at::Tensor& plain(const char* who) const;
  at::Tensor data, inv_scale;
};

// How one projection computes y = x W^T and its backward. Block code calls only this, never
// a collective: the plain product is here; column- and row-parallel products with
// sequence-parallel all-gathers and reduce-scatters (synchronous or overlapped, async TP)
// are in parallel/tensor_parallel.h.
//
// `amax` arguments: the largest |value| of the whole input (x or dy; fp32 scalar), taken by the
// kernel that wrote it, or undefined. Only a projection whose takes_amax() is true uses it (a
// float8 tensorwise cast then skips its own pass over the input); block code asks its
// producers for it only then.
class Linear {
 public:
  virtual ~Linear() = default;
  virtual bool takes_amax() const { return false; }
  // The x operand of the weight gradient, from the forward's input (the sequence-parallel
  // gather of it for column-parallel projections); forward() returns it too, and a block
  // that recomputes instead of keeping it calls this.
  virtual at::Tensor weight_input(const at::Tensor& x, const at::Tensor& amax = {}) const;
  // y from x; stores weight_input(x) in `*x_for_weight` when given.
  virtual at::Tensor forward(const at::Tensor& x, const LinearWeight& w, at::Tensor* x_for_weight,
                             const at::Tensor& amax = {}) const;
  // residual + y (the block's residual stream), y and `*x_for_weight` as forward() gives them.
  virtual at::Tensor forward_add(const at::Tensor& x, const LinearWeight& w,
                                 const at::Tensor& residual, at::Tensor* x_for_weight = nullptr,
                                 const at::Tensor& amax = {}) const;
  // dx from dy; stores the dy operand of the weight gradient (the gather of dy for
  // row-parallel projections) in `*dy_for_weight` when given.
  virtual at::Tensor backward_input(const at::Tensor& dy, const LinearWeight& w,
                                    at::Tensor* dy_for_weight, const at::Tensor& amax = {}) const;
  // grad_w (+)= dy^T x from the operands above.
  virtual void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                               bool accumulate) const {
    linear_backward_weight(dy, x, grad_w, accumulate);
  }
};

// The plain product (no tensor parallelism).
const Linear& plain_linear();

}  // namespace titan::ops
