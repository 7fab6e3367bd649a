// Float8 casts with dynamic scales and the three float8 GEMMs of a converted linear layer.
// The weight gradient's operands (x^T and dy^T in float8) are produced where x and dy are
// cast anyway and handed to backward_weight "packed": one byte tensor holding the float8 data
// followed by its fp32 inverse scales (the block code keeps them as opaque tensors).
#include "titan/ops/float8.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "titan/util/error.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {
namespace {

double float8_max(at::ScalarType t) {
  return t == at::kFloat8_e4m3fn ? 448.0 : 57344.0;  // e4m3fn, e5m2
}

bool fused(const at::Tensor& x) {
#ifdef TITAN_WITH_CUDA
  // The kernels read 16-byte vectors from the start of a contiguous tensor (a non-contiguous
  // one is copied into a fresh, aligned buffer first).
  // Their grids put row tiles (32 rows) on the y dimension: at most 65,535 of them.
  return x.is_cuda() && x.dim() == 2 &&
         (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
         (!x.is_contiguous() || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) &&
         x.size(0) < int64_t{65535} * 32;
#else
  (void)x;
  return false;
#endif
}

// Scales that map `amax` to the largest finite value of `dtype` (fp32).
at::Tensor scale_for(const at::Tensor& amax, at::ScalarType dtype) {
  return at::full_like(amax, float8_max(dtype)).div_(amax.clamp_min(1e-12));
}

// x * scale, saturated and rounded to `dtype`, with the inverse scale.
Float8Operand cast_scaled(const at::Tensor& x, const at::Tensor& scale, at::ScalarType dtype) {
  const double fmax = float8_max(dtype);
  return {(x.to(at::kFloat) * scale).clamp_(-fmax, fmax).to(dtype), at::reciprocal(scale)};
}

// The ATen cast (CPU, shapes the kernels do not take, and tensorwise amaxes combined by
// `reduce` first: tensor parallel, where every rank holding part of a tensor casts with the
// whole tensor's scale). `given` (tensorwise): x's amax, taken by its producer.
Float8Operand aten_cast(const at::Tensor& x, at::ScalarType dtype, bool rowwise, bool transpose,
                        const AmaxReduce& reduce = {}, const at::Tensor& given = {}) {
  const at::Tensor xf = (transpose ? x.t() : x).to(at::kFloat).contiguous();
  at::Tensor amax = rowwise           ? at::linalg_vector_norm(xf, INFINITY, {1}, /*keepdim=*/true)
                    : given.defined() ? given.to(xf.device(), at::kFloat).reshape({}).clone()
                                      : at::linalg_vector_norm(xf, INFINITY);
  if (reduce) reduce(amax);
  at::Tensor scale = scale_for(amax, dtype);
  // Rowwise scales are powers of two (exact to apply and to undo): the largest not above the
  // scale, from its exponent bits (as the CUDA kernels take it).
  if (rowwise) scale = scale.contiguous().view(at::kInt).bitwise_and(0x7f800000).view(at::kFloat);
  return cast_scaled(xf, scale, dtype);
}

// A packed operand: rows x cols float8 bytes (a multiple of 4), then `scales` fp32 inverse
// scales.
struct Packed {
  at::Tensor buffer;
  Float8Operand op;
};
Float8Operand packed_view(const at::Tensor& buffer, int64_t rows, int64_t cols, int64_t scales,
                          at::ScalarType dtype) {
  const int64_t bytes = rows * cols;
  Float8Operand op;
  op.data = buffer.narrow(0, 0, bytes).view(dtype).view({rows, cols});
  op.inv_scale = buffer.narrow(0, bytes, 4 * scales).view(at::kFloat);
  // (A bare {} would pick view(ScalarType).)
  op.inv_scale = scales == 1 ? op.inv_scale.view(at::IntArrayRef{})
                             : op.inv_scale.view(at::IntArrayRef{scales, 1});
  return op;
}
Packed make_packed(int64_t rows, int64_t cols, int64_t scales, at::ScalarType dtype,
                   const at::TensorOptions& options) {
  Packed p;
  p.buffer = at::empty({rows * cols + 4 * scales}, options.dtype(at::kByte));
  p.op = packed_view(p.buffer, rows, cols, scales, dtype);
  return p;
}
// The operand in a packed buffer whose data has `rows` rows.
Float8Operand unpack(const at::Tensor& buffer, int64_t rows, bool rowwise, at::ScalarType dtype) {
  const int64_t scales = rowwise ? rows : 1;
  return packed_view(buffer, rows, (buffer.numel() - 4 * scales) / rows, scales, dtype);
}
bool packable(const at::Tensor& x2) {
  return x2.numel() % 4 == 0;
}

// x2 [R, C] (or its transpose) cast into `out` (allocated when undefined), the tensorwise amax
// combined by `reduce` when given; `amax` (tensorwise; else ignored): x2's, from its producer.
Float8Operand cast_into(const at::Tensor& x2, at::ScalarType dtype, bool rowwise, bool transpose,
                        Float8Operand out = {}, const AmaxReduce& reduce = {},
                        const at::Tensor& amax = {}) {
  RECORD_USER_SCOPE("titan/float8_cast");
  const at::Tensor given = rowwise ? at::Tensor() : amax;
  if (!fused(x2) || reduce) {
    Float8Operand op = aten_cast(x2, dtype, rowwise, transpose, reduce, given);
    if (!out.data.defined()) return op;
    out.data.copy_(op.data);
    out.inv_scale.copy_(op.inv_scale.view_as(out.inv_scale));
    return out;
  }
#ifdef TITAN_WITH_CUDA
  const int64_t rows = transpose ? x2.size(1) : x2.size(0);
  const int64_t cols = transpose ? x2.size(0) : x2.size(1);
  if (!out.data.defined()) {
    out.data = at::empty({rows, cols}, x2.options().dtype(dtype));
    const auto f32 = x2.options().dtype(at::kFloat);
    out.inv_scale = rowwise ? at::empty({rows, 1}, f32) : at::empty({}, f32);
  }
  const int mode = !rowwise ? 0 : transpose ? 2 : 1;
  const at::Tensor none;
  kernels::float8_cast(x2, mode, /*pow2=*/rowwise, transpose ? none : out.data,
                       transpose ? out.data : none, out.inv_scale, given);
#endif
  return out;
}

// Tensorwise, one pass: x2 [R, C] as a row-major operand, and x2^T packed; `amax`: x2's, from
// its producer, or undefined.
std::pair<Float8Operand, at::Tensor> cast_with_packed_transpose(const at::Tensor& x2,
                                                                at::ScalarType dtype,
                                                                const at::Tensor& amax) {
  RECORD_USER_SCOPE("titan/float8_cast");
  const int64_t r = x2.size(0), c = x2.size(1);
  Packed p = make_packed(c, r, 1, dtype, x2.options());
  Float8Operand row;
  if (!fused(x2)) {
    row = aten_cast(x2, dtype, /*rowwise=*/false, /*transpose=*/false, {}, amax);
    p.op.data.copy_(row.data.t());
    p.op.inv_scale.copy_(row.inv_scale);
    return {row, p.buffer};
  }
#ifdef TITAN_WITH_CUDA
  row.data = at::empty({r, c}, x2.options().dtype(dtype));
  row.inv_scale = p.op.inv_scale;
  kernels::float8_cast(x2, 0, false, row.data, p.op.data, p.op.inv_scale, amax);
#endif
  return {row, p.buffer};
}

}  // namespace

Float8Linear::Float8Linear(Float8Recipe recipe, bool emulate, Float8TensorParallel tp)
    : recipe_(recipe), emulate_(emulate), tp_(std::move(tp)) {
  TITAN_INTERNAL_CHECK(recipe_ == Float8Recipe::Tensorwise ||
                           (!tp_.weight && !tp_.x && !tp_.dy && !tp_.gather_x && !tp_.gather_dy),
                       "float8 under tensor parallelism takes the tensorwise recipe only");
  TITAN_INTERNAL_CHECK(
      (!tp_.gather_x || tp_.x) && (!tp_.gather_dy || tp_.dy),
      "a float8 token shard is cast with the whole tensor's amax before its gather");
}

namespace {
// The packed transpose of a row-major tensorwise operand (the weight gradient's x^T or dy^T).
at::Tensor packed_transpose(const Float8Operand& row) {
  Packed p = make_packed(row.data.size(1), row.data.size(0), 1, row.data.scalar_type(),
                         row.data.options());
  p.op.data.copy_(row.data.t());
  p.op.inv_scale.copy_(row.inv_scale);
  return p.buffer;
}
}  // namespace

Float8Recipe parse_float8_recipe(const std::string& name) {
  if (name.empty() || name == "tensorwise") return Float8Recipe::Tensorwise;
  if (name == "rowwise") return Float8Recipe::Rowwise;
  if (name == "rowwise_with_gw_hp") return Float8Recipe::RowwiseWithGwHp;
  fail("quantize.linear.float8.recipe_name: unknown recipe \"", name,
       "\"; expected \"tensorwise\" (default), \"rowwise\" or \"rowwise_with_gw_hp\"");
}

const char* float8_recipe_name(Float8Recipe r) {
  switch (r) {
    case Float8Recipe::Tensorwise: return "tensorwise";
    case Float8Recipe::Rowwise: return "rowwise";
    case Float8Recipe::RowwiseWithGwHp: return "rowwise_with_gw_hp";
  }
  return "?";
}

Float8Operand to_float8(const at::Tensor& x, at::ScalarType dtype, bool rowwise, bool transpose) {
  return cast_into(x.dim() == 2 ? x : x.reshape({-1, x.size(-1)}), dtype, rowwise, transpose);
}

at::Tensor float8_mm(const Float8Operand& a, const Float8Operand& bt, at::ScalarType out_dtype,
                     bool emulate, bool fast_accum, const at::Tensor& addend) {
  const int64_t m = a.data.size(0), k = a.data.size(1), n = bt.data.size(0);
  TITAN_INTERNAL_CHECK(bt.data.size(1) == k, "float8_mm: inner dimensions ", k, " and ",
                       bt.data.size(1));
  const bool aligned = m % 16 == 0 && k % 16 == 0 && n % 16 == 0;
  // cuBLASLt answers NOT_SUPPORTED for an operand or a scale that does not start on a 16-byte
  // boundary (a scale viewed 4 bytes into a packed vector did, on an H200). Checked for every
  // shape it would take, emulated or not, so CPU tests catch such views too.
  auto starts_aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  TITAN_INTERNAL_CHECK(!aligned || (starts_aligned(a.data) && starts_aligned(bt.data) &&
                                    starts_aligned(a.inv_scale) && starts_aligned(bt.inv_scale)),
                       "float8_mm: an operand or a scale does not start on a 16-byte boundary");
  TITAN_INTERNAL_CHECK(
      !addend.defined() || (addend.dim() == 2 && addend.size(0) == m && addend.size(1) == n &&
                            addend.scalar_type() == out_dtype),
      "float8_mm: the addend is not the [", m, ", ", n, "] output");
  auto plus_addend = [&](const at::Tensor& y) { return addend.defined() ? addend + y : y; };
  if (emulate || !a.data.is_cuda() || !aligned) {
    const at::Tensor af = a.data.to(at::kFloat) * a.inv_scale;
    const at::Tensor bf = bt.data.to(at::kFloat) * bt.inv_scale;
    return plus_addend(at::mm(af, bf.t()).to(out_dtype));
  }
  const bool rowwise = a.inv_scale.dim() > 0;
#ifdef TITAN_WITH_CUDA
  if (!rowwise && kernels::gemm_tuning_enabled()) {
    at::Tensor y = at::empty({m, n}, a.data.options().dtype(out_dtype));
    const at::Tensor c = addend.defined() && !addend.is_contiguous() ? addend.contiguous() : addend;
    if (kernels::gemm_float8(a.data, bt.data, a.inv_scale, bt.inv_scale, y, fast_accum, c)) {
      return y;
    }
  }
#endif
  const at::Tensor scale_b = rowwise ? bt.inv_scale.reshape({1, n}) : bt.inv_scale;
  // Row-wise scaling writes bf16 only (cuBLASLt); other outputs are converted from it.
  const auto mm_dtype = rowwise ? at::kBFloat16 : out_dtype;
  at::Tensor y = at::_scaled_mm(a.data, bt.data.t(), a.inv_scale, scale_b, std::nullopt,
                                std::nullopt, mm_dtype, fast_accum);
  return plus_addend(mm_dtype == out_dtype ? y : y.to(out_dtype));
}

namespace {
at::ScalarType grad_dtype(Float8Recipe r) {
  return r == Float8Recipe::Tensorwise ? at::kFloat8_e5m2 : at::kFloat8_e4m3fn;
}
}  // namespace

#ifdef TITAN_WITH_CUDA
namespace {
bool fused_flat(const at::Tensor& x) {
  return x.is_cuda() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
         x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}
}  // namespace
#endif

void float8_amax_into(const at::Tensor& x, const at::Tensor& amax) {
#ifdef TITAN_WITH_CUDA
  if (fused_flat(x)) {
    kernels::float8_amax_flat(x, amax);
    return;
  }
#endif
  amax.copy_(abs_max(x).reshape(amax.sizes()));
}

void float8_cast_with_amax_into(const at::Tensor& x, const at::Tensor& amax, const at::Tensor& out,
                                const at::Tensor& inv_scale) {
#ifdef TITAN_WITH_CUDA
  if (fused_flat(x) && out.is_contiguous() &&
      reinterpret_cast<uintptr_t>(out.data_ptr()) % 8 == 0) {
    kernels::float8_cast_flat(x, amax, out, inv_scale);
    return;
  }
#endif
  const at::Tensor scale = scale_for(amax.reshape({}), at::kFloat8_e4m3fn);
  const Float8Operand op = cast_scaled(x, scale, at::kFloat8_e4m3fn);
  out.copy_(op.data);
  inv_scale.copy_(op.inv_scale.reshape(inv_scale.sizes()));
}

at::Tensor float8_transpose(const at::Tensor& x) {
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
#ifdef TITAN_WITH_CUDA
  if (x.is_cuda() && kernels::transpose_float8(x, out)) return out;
#endif
  out.copy_(x.t());
  return out;
}

at::Tensor abs_max(const at::Tensor& x) {
  return at::linalg_vector_norm(x, INFINITY, {}, /*keepdim=*/false, at::kFloat);
}

const at::Tensor& with_abs_max(const at::Tensor& y, at::Tensor* amax) {
  if (amax != nullptr) *amax = abs_max(y);
  return y;
}

bool Float8Linear::takes_amax() const {
  return recipe_ == Float8Recipe::Tensorwise && !tp_.weight && !tp_.x && !tp_.dy && !tp_.gather_x &&
         !tp_.gather_dy;
}

at::Tensor float8_tensorwise_scale(const at::Tensor& amax) {
  return scale_for(amax, at::kFloat8_e4m3fn);
}

at::Tensor Float8Linear::operand_for_weight(const at::Tensor& x2, at::ScalarType dtype,
                                            const AmaxReduce& reduce, const TokenGather& gather,
                                            const at::Tensor& amax) const {
  if (gather) return packed_transpose(cast_operand(x2, dtype, nullptr, reduce, gather, amax));
  if (recipe_ == Float8Recipe::RowwiseWithGwHp || !packable(x2)) return x2;
  const bool rowwise = recipe_ != Float8Recipe::Tensorwise;
  Packed p = make_packed(x2.size(1), x2.size(0), rowwise ? x2.size(1) : 1, dtype, x2.options());
  cast_into(x2, dtype, rowwise, /*transpose=*/true, p.op, reduce, amax);
  return p.buffer;
}

// Casts x2 for a GEMM, and its transpose for the weight gradient into `*for_weight` (packed;
// one pass for tensorwise).
Float8Operand Float8Linear::cast_operand(const at::Tensor& x2, at::ScalarType dtype,
                                         at::Tensor* for_weight, const AmaxReduce& reduce,
                                         const TokenGather& gather, const at::Tensor& amax) const {
  const bool rowwise = recipe_ != Float8Recipe::Tensorwise;
  if (reduce) {
    Float8Operand row =
        cast_into(x2, dtype, /*rowwise=*/false, /*transpose=*/false, {}, reduce, amax);
    if (gather) {
      TITAN_INTERNAL_CHECK(packable(x2), "float8 token gather of ", x2.numel(), " elements");
      row.data = gather(row.data.view(at::kByte)).view(dtype);
    }
    if (for_weight && !packable(x2)) *for_weight = x2;  // cast again in backward_weight
    if (for_weight && packable(x2)) *for_weight = packed_transpose(row);
    return row;
  }
  if (for_weight && recipe_ == Float8Recipe::Tensorwise && packable(x2)) {
    auto [row, packed] = cast_with_packed_transpose(x2, dtype, amax);
    *for_weight = packed;
    return row;
  }
  if (for_weight) *for_weight = operand_for_weight(x2, dtype, reduce, gather, amax);
  return cast_into(x2, dtype, rowwise, /*transpose=*/false, {}, {}, amax);
}

at::Tensor Float8Linear::weight_input(const at::Tensor& x, const at::Tensor& amax) const {
  return operand_for_weight(x.reshape({-1, x.size(-1)}), at::kFloat8_e4m3fn, tp_.x, tp_.gather_x,
                            amax);
}

// The weight as a float8 operand: W itself or (transpose) W^T, row-major. A weight gathered in
// float8 is only re-laid out (the same bytes a cast of the gathered bf16 weight would give).
Float8Operand Float8Linear::weight_operand(const LinearWeight& w, bool transpose) const {
  if (!w.float8()) {
    return cast_into(w.data, at::kFloat8_e4m3fn, recipe_ != Float8Recipe::Tensorwise, transpose, {},
                     tp_.weight);
  }
  TITAN_INTERNAL_CHECK(recipe_ == Float8Recipe::Tensorwise && w.inv_scale.dim() == 0,
                       "a float8-gathered weight needs the tensorwise recipe");
  // Under tensor parallelism its scale is already the whole matrix's (FSDP reduced the amax
  // over tp too).
  return {transpose ? float8_transpose(w.data) : w.data, w.inv_scale};
}

// x W^T as [tokens, out] (plus `addend` [tokens, out], in the GEMM's epilogue where titan's
// float8 GEMM runs it).
at::Tensor Float8Linear::product(const at::Tensor& x, const LinearWeight& w,
                                 at::Tensor* x_for_weight, const at::Tensor& amax,
                                 const at::Tensor& addend) const {
  const Float8Operand xa = cast_operand(x.reshape({-1, x.size(-1)}), at::kFloat8_e4m3fn,
                                        x_for_weight, tp_.x, tp_.gather_x, amax);
  return float8_mm(xa, weight_operand(w, /*transpose=*/false), x.scalar_type(), emulate_,
                   /*fast_accum=*/true, addend);
}

at::Tensor Float8Linear::forward(const at::Tensor& x, const LinearWeight& w,
                                 at::Tensor* x_for_weight, const at::Tensor& amax) const {
  at::Tensor y = product(x, w, x_for_weight, amax, {});
  if (tp_.gather_x) return y;  // [tp * tokens, out]
  auto sizes = x.sizes().vec();
  sizes.back() = w.data.size(0);
  return y.view(sizes);
}

// One rounding and no separate add: the residual is the product's addend.
at::Tensor Float8Linear::forward_add(const at::Tensor& x, const LinearWeight& w,
                                     const at::Tensor& residual, at::Tensor* x_for_weight,
                                     const at::Tensor& amax) const {
  if (tp_.gather_x || residual.scalar_type() != x.scalar_type() ||
      residual.numel() != x.numel() / x.size(-1) * w.data.size(0)) {
    return Linear::forward_add(x, w, residual, x_for_weight, amax);
  }
  return product(x, w, x_for_weight, amax, residual.reshape({-1, w.data.size(0)}))
      .view(residual.sizes());
}

at::Tensor Float8Linear::backward_input(const at::Tensor& dy, const LinearWeight& w,
                                        at::Tensor* dy_for_weight, const at::Tensor& amax) const {
  const at::Tensor dy2 = dy.reshape({-1, dy.size(-1)});
  // dx = dy W: dy in e5m2 (tensorwise) or e4m3 by rows; W's columns as the rows of W^T.
  const Float8Operand da =
      cast_operand(dy2, grad_dtype(recipe_), dy_for_weight, tp_.dy, tp_.gather_dy, amax);
  at::Tensor dx = float8_mm(da, weight_operand(w, /*transpose=*/true), dy.scalar_type(), emulate_);
  if (tp_.gather_dy) return dx;  // [tp * tokens, in]
  auto sizes = dy.sizes().vec();
  sizes.back() = w.data.size(1);
  return dx.view(sizes);
}

void Float8Linear::backward_weight(const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& grad_w, bool accumulate) const {
  if (recipe_ == Float8Recipe::RowwiseWithGwHp) {
    linear_backward_weight(dy, x, grad_w, accumulate);
    return;
  }
  const bool rowwise = recipe_ == Float8Recipe::Rowwise;
  const int64_t n = grad_w.size(0), k = grad_w.size(1);
  // dW = dy^T x, reducing over tokens: the rows of dy^T and x^T carry the scales.
  auto operand = [&](const at::Tensor& t, int64_t rows, at::ScalarType dtype,
                     const AmaxReduce& reduce) {
    if (t.scalar_type() == at::kByte) return unpack(t, rows, rowwise, dtype);
    return cast_into(t.reshape({-1, rows}), dtype, rowwise, /*transpose=*/true, {}, reduce);
  };
  TITAN_INTERNAL_CHECK((!tp_.gather_dy || dy.scalar_type() == at::kByte) &&
                           (!tp_.gather_x || x.scalar_type() == at::kByte),
                       "a gathered float8 operand of the weight gradient comes packed");
  const Float8Operand a = operand(dy, n, grad_dtype(recipe_), tp_.dy);
  const Float8Operand b = operand(x, k, at::kFloat8_e4m3fn, tp_.x);
  const int64_t m = a.data.size(1);
  if (!rowwise && !accumulate && !emulate_ && a.data.is_cuda() && m % 16 == 0 && k % 16 == 0 &&
      n % 16 == 0 && grad_w.is_contiguous()) {
#ifdef TITAN_WITH_CUDA
    if (kernels::gemm_tuning_enabled() &&
        kernels::gemm_float8(a.data, b.data, a.inv_scale, b.inv_scale, grad_w.view({n, k}),
                             /*fast_accum=*/false)) {
      return;
    }
#endif
    at::Tensor out = grad_w;
    at::_scaled_mm_out(out, a.data, b.data.t(), a.inv_scale, b.inv_scale, std::nullopt,
                       std::nullopt, at::kFloat, false);
    return;
  }
  const at::Tensor gw = float8_mm(a, b, rowwise ? at::kBFloat16 : at::kFloat, emulate_);
  if (accumulate) {
    grad_w.add_(gw);
  } else {
    grad_w.copy_(gw);
  }
}

}  // namespace titan::ops
