// Float8 linear layers on CPU (emulated float8 arithmetic): the casts round exactly as a
// quantize-dequantize written here from the recipe's definition (also a matrix cast in pieces
// with a given amax), each of the three GEMMs of a
// converted linear equals that reference in fp32 for every recipe, and stays close to the
// unquantized product.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "support/test_support.h"
#include "titan/config/job_config.h"
#include "titan/model/llama_args.h"
#include "titan/ops/float8.h"
#include "titan/parallel/parallelize.h"

using namespace titan;
using ops::Float8Recipe;

namespace {

// Quantize-dequantize of x [rows, cols] in fp32: one scale 448 / amax (e4m3) or 57344 / amax
// (e5m2) per tensor, or per row rounded down to a power of two.
at::Tensor qdq(const at::Tensor& x, at::ScalarType dtype, bool rowwise) {
  const double fmax = dtype == at::kFloat8_e4m3fn ? 448.0 : 57344.0;
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor amax = rowwise ? xf.abs().amax({1}, true) : xf.abs().max();
  at::Tensor scale = fmax / amax.clamp_min(1e-12);
  if (rowwise) scale = at::exp2(at::floor(at::log2(scale)));
  return (xf * scale).clamp(-fmax, fmax).to(dtype).to(at::kFloat) / scale;
}

struct Gemms {
  at::Tensor y, dx, dw;
};

// The three products of y = x W^T from quantize-dequantized operands, as the recipe defines.
Gemms reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy, Float8Recipe r) {
  const bool rw = r != Float8Recipe::Tensorwise;
  const auto grad_type = rw ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
  Gemms g;
  g.y = at::mm(qdq(x, at::kFloat8_e4m3fn, rw), qdq(w, at::kFloat8_e4m3fn, rw).t());
  g.dx = at::mm(qdq(dy, grad_type, rw), qdq(w.t(), at::kFloat8_e4m3fn, rw).t());
  if (r == Float8Recipe::RowwiseWithGwHp) {
    g.dw = at::mm(dy.t(), x);
  } else {
    g.dw = at::mm(qdq(dy.t(), grad_type, rw), qdq(x.t(), at::kFloat8_e4m3fn, rw).t());
    if (rw) g.dw = g.dw.to(at::kBFloat16).to(at::kFloat);  // rowwise dW is a bf16 GEMM output
  }
  return g;
}

}  // namespace

TEST(Float8, CastsRoundAsQuantizeDequantize) {
  at::manual_seed(1);
  const at::Tensor x = at::randn({48, 80}) * at::rand({48, 1}) * 10;
  for (bool rowwise : {false, true}) {
    for (auto dtype : {at::kFloat8_e4m3fn, at::kFloat8_e5m2}) {
      const auto op = ops::to_float8(x, dtype, rowwise);
      EXPECT_EQ(op.data.scalar_type(), dtype);
      const at::Tensor back = op.data.to(at::kFloat) * op.inv_scale;
      // The same float8 values; undoing the scale by a reciprocal rounds once more.
      EXPECT_LT(test::relative_error(back, qdq(x, dtype, rowwise)), 1e-7) << rowwise;
      // Float8 keeps about 2 (e5m2) or 3 (e4m3) mantissa bits.
      EXPECT_LT(test::relative_error(back, x), dtype == at::kFloat8_e4m3fn ? 0.05 : 0.1);
    }
  }
}

// A weight matrix cast in pieces of a flat buffer (a unit cast from its masters): the amax into
// a slot of a buffer, then the cast with that amax, give the bytes and the inverse scale of
// casting the whole matrix; its float8 transpose is the transpose of those bytes.
TEST(Float8, MatrixCastWithAGivenAmaxEqualsTheWholeTensorCast) {
  at::manual_seed(3);
  const at::Tensor flat = at::randn({64 + 48 * 80}) * 0.1;
  const at::Tensor w = flat.narrow(0, 64, 48 * 80);
  const at::Tensor amax = at::zeros({3}), inv = at::zeros({3});
  const at::Tensor out = at::empty({48 * 80}, at::kFloat8_e4m3fn);
  ops::float8_amax_into(w, amax.narrow(0, 1, 1));
  ops::float8_cast_with_amax_into(w, amax.narrow(0, 1, 1), out, inv.narrow(0, 2, 1));
  const auto whole = ops::to_float8(w.view({48, 80}), at::kFloat8_e4m3fn, false);
  EXPECT_EQ(amax[1].item<float>(), w.abs().max().item<float>());
  EXPECT_TRUE(at::equal(out.view(at::kByte).view({48, 80}), whole.data.view(at::kByte)));
  EXPECT_EQ(inv[2].item<float>(), whole.inv_scale.item<float>());
  EXPECT_TRUE(
      at::equal(ops::float8_transpose(whole.data).view(at::kByte), whole.data.view(at::kByte).t()));
}

// The amax a producer hands over (taken in its own pass) is the one a tensorwise cast uses: the
// input's own amax gives the bytes of the projection's own cast, a larger one casts with that
// amax's scale. Rowwise and tensor-parallel projections take none.
TEST(Float8, TensorwiseCastsUseTheAmaxTheirProducerGives) {
  at::manual_seed(4);
  const at::Tensor x = at::randn({64, 96}) * 3, w = at::randn({48, 96}) * 0.05;
  const at::Tensor dy = at::randn({64, 48}) * 1e-3;
  const ops::Float8Linear lin(Float8Recipe::Tensorwise, /*emulate=*/true);
  EXPECT_TRUE(lin.takes_amax());
  EXPECT_FALSE(ops::Float8Linear(Float8Recipe::Rowwise, true).takes_amax());
  const ops::AmaxReduce over_tp = [](at::Tensor&) {};
  EXPECT_FALSE(
      ops::Float8Linear(Float8Recipe::Tensorwise, true, {over_tp, over_tp, over_tp, {}, {}})
          .takes_amax());
  const at::Tensor own = ops::abs_max(x);
  EXPECT_EQ(own.dim(), 0);
  EXPECT_EQ(own.item<float>(), x.abs().max().item<float>());
  at::Tensor p_self, p_own, p_big;
  const at::Tensor y = lin.forward(x, w, &p_self);
  EXPECT_TRUE(at::equal(lin.forward(x, w, &p_own, own), y));
  EXPECT_TRUE(at::equal(p_own, p_self));
  EXPECT_TRUE(at::equal(lin.weight_input(x, own), p_self));
  lin.forward(x, w, &p_big, own * 2);
  const int64_t bytes = x.numel();  // packed: x^T in float8, then the fp32 inverse scale
  const at::Tensor scale = at::full({}, 448.0) / (own * 2);
  const at::Tensor want = (x.t().contiguous() * scale).clamp(-448, 448).to(at::kFloat8_e4m3fn);
  EXPECT_TRUE(at::equal(p_big.narrow(0, 0, bytes), want.view(at::kByte).reshape({-1})));
  EXPECT_FLOAT_EQ(p_big.narrow(0, bytes, 4).view(at::kFloat).item<float>(),
                  2 * p_self.narrow(0, bytes, 4).view(at::kFloat).item<float>());
  at::Tensor d_self, d_own;
  const at::Tensor dx = lin.backward_input(dy, w, &d_self);
  EXPECT_TRUE(at::equal(lin.backward_input(dy, w, &d_own, ops::abs_max(dy)), dx));
  EXPECT_TRUE(at::equal(d_own, d_self));
  at::Tensor d_big;
  lin.backward_input(dy, w, &d_big, ops::abs_max(dy) * 2);
  EXPECT_FLOAT_EQ(d_big.narrow(0, dy.numel(), 4).view(at::kFloat).item<float>(),
                  2 * d_self.narrow(0, dy.numel(), 4).view(at::kFloat).item<float>());
  // forward_add: the residual plus forward's product, with forward's weight-gradient operand
  // and the amax it is given (residual [2, 32, 48] for x's 64 tokens).
  const at::Tensor residual = at::randn({2, 32, 48});
  at::Tensor a_big;
  const at::Tensor sum = lin.forward_add(x.view({2, 32, 96}), w, residual, &a_big, own * 2);
  ASSERT_EQ(sum.sizes(), residual.sizes());
  EXPECT_TRUE(at::equal(sum, residual + lin.forward(x, w, nullptr, own * 2).view({2, 32, 48})));
  EXPECT_TRUE(at::equal(a_big, p_big));
}

TEST(Float8, EveryGemmOfEveryRecipeMatchesTheReference) {
  at::manual_seed(2);
  const int64_t tokens = 64, in = 96, out = 48;
  const at::Tensor x = at::randn({2, tokens / 2, in});
  const at::Tensor w = at::randn({out, in}) * 0.05;
  const at::Tensor dy = at::randn({2, tokens / 2, out}) * 1e-3;
  for (auto r : {Float8Recipe::Tensorwise, Float8Recipe::Rowwise, Float8Recipe::RowwiseWithGwHp}) {
    SCOPED_TRACE(ops::float8_recipe_name(r));
    const ops::Float8Linear lin(r, /*emulate=*/true);
    const Gemms want = reference(x.reshape({tokens, in}), w, dy.reshape({tokens, out}), r);
    at::Tensor x_for_weight, dy_for_weight;
    const at::Tensor y = lin.forward(x, w, &x_for_weight);
    EXPECT_EQ(y.sizes(), (at::IntArrayRef{2, tokens / 2, out}));
    EXPECT_LT(test::relative_error(y.reshape({tokens, out}), want.y), 1e-6);
    const at::Tensor dx = lin.backward_input(dy, w, &dy_for_weight);
    EXPECT_LT(test::relative_error(dx.reshape({tokens, in}), want.dx), 1e-6);
    at::Tensor gw = at::full({out, in}, 1.0);
    lin.backward_weight(dy_for_weight, x_for_weight, gw, /*accumulate=*/true);
    EXPECT_LT(test::relative_error(gw - 1.0, want.dw), 1e-5);
    lin.backward_weight(dy_for_weight, x_for_weight, gw, /*accumulate=*/false);
    EXPECT_LT(test::relative_error(gw, want.dw), 1e-6);
    // And close to the unquantized products.
    EXPECT_LT(test::relative_error(y, at::matmul(x, w.t())), 0.1);
    EXPECT_LT(test::relative_error(dx, at::matmul(dy, w)), 0.15);
    EXPECT_LT(
        test::relative_error(gw, at::mm(dy.reshape({tokens, out}).t(), x.reshape({tokens, in}))),
        0.15);
  }
}

TEST(Float8, RecipeNames) {
  EXPECT_EQ(ops::parse_float8_recipe(""), Float8Recipe::Tensorwise);
  EXPECT_EQ(ops::parse_float8_recipe("rowwise_with_gw_hp"), Float8Recipe::RowwiseWithGwHp);
  EXPECT_NE(test::error_of([] {
              ops::parse_float8_recipe("mxfp8");
            }).find("quantize.linear.float8.recipe_name: unknown recipe \"mxfp8\""),
            std::string::npos);
}

// auto_filter_small_kn: the measured rule picks, per flavor, the projections whose GEMMs gain.
TEST(Float8, AutoFilterKeepsProjectionsThatDoNotGainInBf16) {
  EXPECT_TRUE(parallel::float8_gains(4096, 4096));
  EXPECT_TRUE(parallel::float8_gains(2048, 8192));
  EXPECT_TRUE(parallel::float8_gains(3072, 3072));
  EXPECT_FALSE(parallel::float8_gains(2048, 3072));
  EXPECT_FALSE(parallel::float8_gains(1024, 14336));
  config::JobConfig c;
  c.model.converters = {"float8"};
  c.float8.filter_fqns = {"output", "auto_filter_small_kn"};
  const auto one = parallel::plan_float8(model::llama_flavor("1B"), c, /*cuda=*/true, 1);
  EXPECT_FALSE(one.wqkv);  // 2048 -> 3072
  EXPECT_FALSE(one.wo);    // 2048 -> 2048
  EXPECT_TRUE(one.w13);    // 2048 -> 16384
  EXPECT_TRUE(one.w2);     // 8192 -> 2048
  const auto three = parallel::plan_float8(model::llama_flavor("3B"), c, /*cuda=*/true, 1);
  EXPECT_TRUE(three.wqkv && three.wo && three.w13 && three.w2);
  const auto eight = parallel::plan_float8(model::llama_flavor("8B"), c, /*cuda=*/true, 1);
  EXPECT_TRUE(eight.wqkv && eight.wo && eight.w13 && eight.w2);
  // Without the filter every projection is converted.
  c.float8.filter_fqns = {"output"};
  const auto all = parallel::plan_float8(model::llama_flavor("3B"), c, /*cuda=*/true, 1);
  EXPECT_TRUE(all.wqkv && all.wo && all.w13 && all.w2);
}
