// titan's fused CUDA kernels, tensor-level entry points (CUDA builds only). Each family has
// an ATen reference in src/ops/ and a test comparing the two (tests/gpu/).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace titan::kernels {

// An `amax` argument (optional) receives the largest |value| of the output as stored (fp32,
// 0-dim), taken in the kernel's own pass: the amax a float8 tensorwise cast of it needs.

// RMSNorm over the last dim. x: [..., D] bf16/fp32 contiguous, weight [D] same dtype.
std::tuple<at::Tensor, at::Tensor> rmsnorm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                   double eps, at::Tensor* amax = nullptr);
// The residual add before a norm in the same pass: h = x + add, then RMSNorm(h); returns
// (h, y, rstd); `amax` is y's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_forward(const at::Tensor& x,
                                                                   const at::Tensor& add,
                                                                   const at::Tensor& weight,
                                                                   double eps,
                                                                   at::Tensor* amax = nullptr);
// Returns dx (plus `residual` where defined, in the same pass); adds dweight into weight_grad
// (fp32 [D]).
at::Tensor rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& rstd, const at::Tensor& weight_grad, bool accumulate,
                            const at::Tensor& residual = {}, at::Tensor* amax = nullptr);

// RoPE on interleaved pairs; x: [B, S, H, hd] with unit stride in the last dim.
at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool inverse);
// The same into `out` (any strides with a unit last dim, e.g. a slice of dqkv).
void rope_apply_out(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
                    const at::Tensor& out);

// SwiGLU: ab [..., 2F] -> silu(a) * b [..., F]; backward -> d(ab).
at::Tensor swiglu_forward(const at::Tensor& ab, at::Tensor* amax = nullptr);
at::Tensor swiglu_backward(const at::Tensor& dg, const at::Tensor& ab, at::Tensor* amax = nullptr);

// Cross-entropy over logits [rows, V] (bf16/fp32): returns the fp32 loss sum; when
// `write_grad`, overwrites logits with (softmax - onehot) * grad_scale in place.
at::Tensor cross_entropy_fwd_bwd(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                                 bool write_grad);
// Loss parallel on a vocabulary shard: logits [rows, cols] hold columns [begin, begin + cols)
// of the whole vocabulary. Returns fp32 [rows, 3]: max, sum of exp(x - max), the target's logit
// (0 where the target is another shard's).
at::Tensor cross_entropy_shard_stats(const at::Tensor& logits, const at::Tensor& targets,
                                     int64_t begin);
// Overwrites the shard's logits with (softmax - onehot) * grad_scale given each row's
// log-sum-exp over the whole vocabulary (fp32 [rows]).
void cross_entropy_shard_grad(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                              int64_t begin, double grad_scale);

// grad (fp32 [out, in]) (+)= dy^T x with dy [N, out], x [N, in] in bf16: cuBLAS with fp32
// accumulation and an fp32 output, so weight gradients never round to bf16. Without
// `accumulate` the old contents are neither read nor kept (beta = 0).
void gemm_tn_fp32(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad,
                  bool accumulate);

// out[M, N] = op(a) op(b) (+ out when `accumulate`, + `addend` where defined: read in the
// epilogue, rounded once) for bf16 a, b and a bf16 or fp32 out, all 2-D with unit column stride
// (op transposes where asked; an addend is laid out as out): cuBLASLt with fp32 accumulation
// and, per shape, the fastest of its candidate algorithms, timed at the shape's first use
// (src/kernels/gemm_cuda.cpp). gemm_supported says whether a, b and out qualify; gemm returns
// false, having done nothing, where cuBLASLt still offers no algorithm (the caller uses ATen).
// A shape first met accumulating or inside a CUDA graph capture runs cuBLASLt's first pick
// until an ordinary call times it (a graph keeps the pick it captured).
bool gemm_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);
bool gemm(const at::Tensor& a, bool transpose_a, const at::Tensor& b, bool transpose_b,
          const at::Tensor& out, bool accumulate, const at::Tensor& addend = {});
// out[M, N] = (a[M, K] * scale_a) (bt[N, K] * scale_b)^T for row-major float8 a and bt (e4m3
// or e5m2, not both e5m2; dimensions and row strides multiples of 16) with fp32 scalar scales on
// the device, into a bf16 or fp32 out (overwritten): the tensorwise float8 product, tuned as
// gemm is, with cuBLASLt's fast accumulation where asked; plus `addend` (laid out as out, apart
// from it) where given, in the epilogue (one rounding). False, with nothing done, where the
// operands do not qualify or cuBLASLt offers nothing (the caller uses ATen's _scaled_mm).
bool gemm_float8(const at::Tensor& a, const at::Tensor& bt, const at::Tensor& scale_a,
                 const at::Tensor& scale_b, const at::Tensor& out, bool fast_accum,
                 const at::Tensor& addend = {});
// TITAN_GEMM_TUNING: unset or 1 (linear layers use gemm and gemm_float8), 0 (they use ATen,
// cuBLAS's own pick). Off under ATen's deterministic mode (debug.deterministic).
bool gemm_tuning_enabled();

// AdamW (decoupled) or Adam (L2) step of one flat fp32 parameter with its state; writes the
// bf16 `shadow` (if defined). hyper: device fp32 [7] (see launchers.h); divisor: device fp32
// scalar or undefined. `amax` (one fp32 element, optional) receives the largest |value| of the
// new parameter (of the shadow where written): a float8 weight's tensorwise amax.
void adamw_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const at::Tensor& shadow, const at::Tensor& hyper,
                const at::Tensor& divisor, bool decoupled, const at::Tensor& amax = {});

// Sum of the squares of every element of fp32 CUDA tensors, as an fp32 scalar on the device;
// accumulated in fp64 per fixed chunk, so deterministic.
at::Tensor sum_of_squares(const std::vector<at::Tensor>& xs);

// Float8: x [rows, cols] (bf16 or fp32, 16-byte aligned) scaled by fmax / max|x| over the
// tensor (mode 0), each row (1) or each column (2), rounded down to a power of two with `pow2`,
// into `out` ([rows, cols]) and/or `out_t` ([cols, rows]) of float8 dtype (either may be
// undefined), with the inverse scales in `inv_scale` (fp32, 1, rows or cols elements). A given
// `amax` (fp32, as many as scales, on x's device) skips the pass that takes it.
void float8_cast(const at::Tensor& x, int mode, bool pow2, const at::Tensor& out,
                 const at::Tensor& out_t, const at::Tensor& inv_scale, const at::Tensor& amax = {});
// Tensorwise e4m3 of a flat range (a weight matrix in a unit's flat buffer): its amax into
// `amax` (one fp32), and its cast with the scale of a given amax into `out` (e4m3, x's size, 8-byte
// aligned), writing 1 / scale into `inv_scale` (one fp32). x: bf16 or fp32, contiguous,
// 16-byte aligned.
void float8_amax_flat(const at::Tensor& x, const at::Tensor& amax);
void float8_cast_flat(const at::Tensor& x, const at::Tensor& amax, const at::Tensor& out,
                      const at::Tensor& inv_scale);
// One-byte x [rows, cols] -> out [cols, rows] (both contiguous). False, with nothing done, where
// the kernel does not take the shape (rows or cols not a multiple of 64, unaligned).
bool transpose_float8(const at::Tensor& x, const at::Tensor& out);

}  // namespace titan::kernels
