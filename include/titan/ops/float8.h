// Float8 training of the block projections (torchao's recipes, as torchtitan's
// [quantize.linear.float8]): each of the three GEMMs of a linear layer (y = x W^T, dx = dy W,
// dW = dy^T x) runs on float8 operands with fp32 scales through cuBLASLt (ATen's _scaled_mm).
//   tensorwise:          one dynamic scale per tensor; e4m3 for x and W, e5m2 for dy.
//   rowwise:             e4m3 everywhere with a power-of-two scale per row of each operand
//                        along the GEMM's reduction dimension.
//   rowwise_with_gw_hp:  rowwise, with the weight gradient in high precision (bf16 GEMM).
// With `emulate`, the float8 rounding is applied and the products run in fp32 (CPU tests run
// the same casts and scales).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

#include "titan/ops/linear.h"

namespace titan::ops {

enum class Float8Recipe { Tensorwise, Rowwise, RowwiseWithGwHp };
// "tensorwise", "rowwise", "rowwise_with_gw_hp" (empty: tensorwise); throws titan::Error
// naming quantize.linear.float8.recipe_name otherwise.
Float8Recipe parse_float8_recipe(const std::string& name);
const char* float8_recipe_name(Float8Recipe r);

// A float8 operand: data (e4m3 or e5m2) and the fp32 factor that turns it back into the
// original values (x ~ data * inv_scale): a scalar (tensorwise) or one per row ([rows, 1]).
struct Float8Operand {
  at::Tensor data, inv_scale;
};

// x [rows, cols] (any float dtype) cast to `dtype` with a scale per tensor (`rowwise` false) or
// per row (true; rounded down to a power of two); with `transpose`, the operand is x^T
// ([cols, rows] row-major). Tensorwise casts of CUDA tensors run titan's fused kernels (one
// max pass, one cast pass writing the layout asked for).
Float8Operand to_float8(const at::Tensor& x, at::ScalarType dtype, bool rowwise,
                        bool transpose = false);
// a [M, K] @ b [K, N] where `a` is a row-major operand and `bt` is b's transpose as a row-major
// [N, K] operand (scales per row of `bt` = per column of b). Output in `out_dtype`.
// `fast_accum`: cuBLASLt's faster fp8 accumulation (the forward GEMM, as torchao). Emulated
// (dequantized operands, fp32 product) with `emulate`, on CPU, and for shapes cuBLASLt's fp8
// GEMM does not take (dimensions not multiples of 16). With `addend` ([M, N], out_dtype) the
// result is addend + a b, added in the GEMM's epilogue where titan's float8 GEMM runs it.
at::Tensor float8_mm(const Float8Operand& a, const Float8Operand& bt, at::ScalarType out_dtype,
                     bool emulate, bool fast_accum = false, const at::Tensor& addend = {});

// Tensorwise e4m3 scales from absolute maxima (any shape): 448 / max(amax, 1e-12), in fp32 —
// the scale to_float8 computes for a tensor with that amax.
at::Tensor float8_tensorwise_scale(const at::Tensor& amax);
// Tensorwise pieces of a weight matrix (the float8 weights of a unit): the amax of x (any shape)
// into `amax` (one fp32 element, e.g. a slot of a buffer); x cast to e4m3 with the scale of a
// given amax into `out` (e4m3, x's size), 1 / scale into `inv_scale` (one fp32 element). With
// the amax of x's whole matrix, the bytes equal those of to_float8 on that matrix. Fused
// kernels on CUDA (one pass each).
void float8_amax_into(const at::Tensor& x, const at::Tensor& amax);
void float8_cast_with_amax_into(const at::Tensor& x, const at::Tensor& amax, const at::Tensor& out,
                                const at::Tensor& inv_scale);
// The largest |x| over the whole tensor as an fp32 scalar: the amax of a tensorwise cast of x
// (what the producers' fused kernels take in their own pass).
at::Tensor abs_max(const at::Tensor& x);
// y itself, setting *amax = abs_max(y) where amax is given (a producer's output whose kernel did
// not take its amax in its own pass).
const at::Tensor& with_abs_max(const at::Tensor& y, at::Tensor* amax);
// Float8 x [rows, cols] -> contiguous [cols, rows] (a tiled kernel on CUDA).
at::Tensor float8_transpose(const at::Tensor& x);

// The Linear of a converted projection. Its weight comes in the compute dtype (cast here, one
// scale per tensor or per row) or already in float8 (tensorwise; the float8 FSDP all-gather). The
// weight-gradient operands it hands out (x_for_weight, dy_for_weight, weight_input) are x^T and
// dy^T already in float8, packed with their scales in one byte tensor, cast in the same pass as the
// GEMM operand (tensorwise); its backward_weight also takes plain tensors (the block's saved
// activations).
//
// Tensor parallel: an operand each rank holds only part of (its weight rows or columns, or a
// gradient/input split by features or tokens) is cast with the scale of the whole tensor: its
// amax goes through the group's all-reduce (MAX) first, so the bytes equal a single process's.
// A token shard (sequence parallel: x of column-parallel, dy of row-parallel projections) is
// cast so, then its float8 bytes are gathered: half the traffic of gathering bf16, and the same
// operand as casting after the gather. Tensorwise recipe only.
using AmaxReduce = std::function<void(at::Tensor& amax)>;
using TokenGather = std::function<at::Tensor(const at::Tensor& shard)>;  // [n, ...] -> [tp*n, ...]
struct Float8TensorParallel {
  AmaxReduce weight, x, dy;         // empty: the operand is whole on this rank
  TokenGather gather_x, gather_dy;  // empty: the operand arrives whole
};

class Float8Linear final : public Linear {
 public:
  Float8Linear(Float8Recipe recipe, bool emulate, Float8TensorParallel tp = {});
  // Tensorwise with no tensor-parallel hooks: a given amax is the whole operand's.
  bool takes_amax() const override;
  at::Tensor weight_input(const at::Tensor& x, const at::Tensor& amax = {}) const override;
  at::Tensor forward(const at::Tensor& x, const LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& amax = {}) const override;
  at::Tensor forward_add(const at::Tensor& x, const LinearWeight& w, const at::Tensor& residual,
                         at::Tensor* x_for_weight = nullptr,
                         const at::Tensor& amax = {}) const override;
  at::Tensor backward_input(const at::Tensor& dy, const LinearWeight& w, at::Tensor* dy_for_weight,
                            const at::Tensor& amax = {}) const override;
  void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                       bool accumulate) const override;
  Float8Recipe recipe() const { return recipe_; }

 private:
  at::Tensor operand_for_weight(const at::Tensor& x2, at::ScalarType dtype,
                                const AmaxReduce& reduce, const TokenGather& gather,
                                const at::Tensor& amax) const;
  Float8Operand weight_operand(const LinearWeight& w, bool transpose) const;
  at::Tensor product(const at::Tensor& x, const LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& amax, const at::Tensor& addend) const;
  Float8Operand cast_operand(const at::Tensor& x2, at::ScalarType dtype, at::Tensor* for_weight,
                             const AmaxReduce& reduce, const TokenGather& gather,
                             const at::Tensor& amax) const;
  Float8Recipe recipe_;
  bool emulate_;
  Float8TensorParallel tp_;
};

}  // namespace titan::ops
