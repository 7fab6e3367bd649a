// titan's CUDA kernels against their ATen references, on fresh random inputs each run.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <gtest/gtest.h>

#include <cmath>

#include "support/test_support.h"
#include "titan/kernels/kernels.h"
#include "titan/model/llama_args.h"
#include "titan/ops/attention.h"
#include "titan/ops/cross_entropy.h"
#include "titan/ops/dispatch.h"
#include "titan/ops/linear.h"
#include "titan/ops/rmsnorm.h"
#include "titan/ops/rope.h"
#include "titan/ops/swiglu.h"

using namespace titan;
using test::relative_error;

namespace {

double tol(at::ScalarType t) {
  return test::kernel_tolerance(t);
}

class KernelTest : public ::testing::TestWithParam<at::ScalarType> {};

}  // namespace

TEST_P(KernelTest, RmsNormForwardBackwardMatchReference) {
  const auto dt = GetParam();
  for (int64_t dim : {256, 2048, 4096, 16384}) {
    at::Tensor x = at::randn({3, 37, dim}, test::cuda_options(dt));
    at::Tensor w = (1 + 0.1 * at::randn({dim}, test::cuda_options(at::kFloat))).to(dt);
    auto [y, r] = kernels::rmsnorm_forward(x, w, 1e-5);
    auto [y_ref, r_ref] = ops::rmsnorm_forward_ref(x, w, 1e-5);
    EXPECT_LT(relative_error(y, y_ref), tol(dt)) << dim;
    EXPECT_LT(relative_error(r, r_ref), 1e-5) << dim;
    at::Tensor dy = at::randn_like(x);
    at::Tensor gw = at::randn({dim}, test::cuda_options(at::kFloat));
    at::Tensor gw_ref = gw.clone();
    at::Tensor dx = kernels::rmsnorm_backward(dy, x, w, r, gw, /*accumulate=*/true);
    at::Tensor dx_ref = ops::rmsnorm_backward_ref(dy, x, w, r_ref, gw_ref);
    EXPECT_LT(relative_error(dx, dx_ref), tol(dt)) << dim;
    EXPECT_LT(relative_error(gw, gw_ref), 1e-4) << dim;
  }
}

// The residual adds fused into the norms give exactly what the separate add and norm kernels
// give (the block relies on it: its losses must not depend on the fusion).
TEST_P(KernelTest, RmsNormWithResidualAddsEqualsSeparateOpsBitwise) {
  const auto dt = GetParam();
  for (int64_t dim : {256, 3072, 4096}) {
    at::Tensor x = at::randn({2, 41, dim}, test::cuda_options(dt));
    at::Tensor add = at::randn_like(x);
    at::Tensor w = (1 + 0.1 * at::randn({dim}, test::cuda_options(at::kFloat))).to(dt);
    auto [h, y, r] = kernels::add_rmsnorm_forward(x, add, w, 1e-5);
    at::Tensor h_sep = x + add;
    auto [y_sep, r_sep] = kernels::rmsnorm_forward(h_sep, w, 1e-5);
    EXPECT_TRUE(at::equal(h, h_sep)) << dim;
    EXPECT_TRUE(at::equal(y, y_sep)) << dim;
    EXPECT_TRUE(at::equal(r, r_sep)) << dim;
    at::Tensor dy = at::randn_like(x), residual = at::randn_like(x);
    at::Tensor gw = at::zeros({dim}, test::cuda_options(at::kFloat)), gw_sep = gw.clone();
    at::Tensor dx = kernels::rmsnorm_backward(dy, h, w, r, gw, false, residual);
    at::Tensor dx_sep = residual + kernels::rmsnorm_backward(dy, h, w, r, gw_sep, false);
    EXPECT_TRUE(at::equal(dx, dx_sep)) << dim;
    EXPECT_TRUE(at::equal(gw, gw_sep)) << dim;
    // And the ATen path (CPU) agrees with itself the same way.
    auto [h_ops, y_ops, r_ops] = ops::add_rmsnorm_forward(x.cpu(), add.cpu(), w.cpu(), 1e-5);
    EXPECT_TRUE(at::equal(h_ops, h_sep.cpu())) << dim;
    EXPECT_LT(relative_error(y_ops, y_sep.cpu()), tol(dt)) << dim;
  }
}

TEST_P(KernelTest, RopeMatchesReferenceOnStridedViews) {
  const auto dt = GetParam();
  auto args = model::llama_flavor("1B");
  const int64_t b = 2, s = 77, h = 32, kv = 8, hd = 64;
  at::Tensor qkv = at::randn({b, s, h + 2 * kv, hd}, test::cuda_options(dt));
  auto [c, sn] = ops::rope_tables(args, s, at::TensorOptions().device(at::kCUDA));
  for (bool inverse : {false, true}) {
    at::Tensor q = qkv.narrow(2, 0, h), k = qkv.narrow(2, h, kv);
    EXPECT_LT(relative_error(kernels::rope_apply(q, c, sn, inverse),
                             ops::rope_apply_ref(q, c, sn, inverse)),
              tol(dt));
    EXPECT_LT(relative_error(kernels::rope_apply(k, c, sn, inverse),
                             ops::rope_apply_ref(k, c, sn, inverse)),
              tol(dt));
  }
  // Rotating forward then back returns the input.
  at::Tensor q = qkv.narrow(2, 0, h);
  at::Tensor back = kernels::rope_apply(kernels::rope_apply(q, c, sn, false), c, sn, true);
  EXPECT_LT(relative_error(back, q), 2 * tol(dt));
}

TEST_P(KernelTest, SwigluForwardBackwardMatchReference) {
  const auto dt = GetParam();
  at::Tensor ab = at::randn({5, 33, 2 * 1536}, test::cuda_options(dt));
  at::Tensor dg = at::randn({5, 33, 1536}, test::cuda_options(dt));
  EXPECT_LT(relative_error(kernels::swiglu_forward(ab), ops::swiglu_forward_ref(ab)), tol(dt));
  EXPECT_LT(relative_error(kernels::swiglu_backward(dg, ab), ops::swiglu_backward_ref(dg, ab)),
            tol(dt));
}

// The amax the producers take in their own pass (for a float8 cast of their output) is exactly
// max |output| as stored, and asking for it changes no output bit.
TEST_P(KernelTest, ProducersTakeTheExactAmaxOfTheirOutput) {
  const auto dt = GetParam();
  auto max_of = [](const at::Tensor& t) { return t.abs().max().to(at::kFloat); };
  // 16384: the backward kernel's variants with two (bf16) or four (fp32) vectors per thread.
  for (int64_t dim : {256, 3072, 16384}) {
    SCOPED_TRACE(dim);
    at::Tensor x = at::randn({3, 41, dim}, test::cuda_options(dt)) * 3;
    at::Tensor add = at::randn_like(x);
    at::Tensor w = (1 + 0.5 * at::randn({dim}, test::cuda_options(at::kFloat))).to(dt);
    at::Tensor amax;
    auto [y, r] = kernels::rmsnorm_forward(x, w, 1e-5, &amax);
    EXPECT_TRUE(at::equal(y, std::get<0>(kernels::rmsnorm_forward(x, w, 1e-5))));
    EXPECT_EQ(amax.dim(), 0);
    EXPECT_TRUE(at::equal(amax, max_of(y)));
    auto [h, y2, r2] = kernels::add_rmsnorm_forward(x, add, w, 1e-5, &amax);
    EXPECT_TRUE(at::equal(amax, max_of(y2)));
    const auto [h_plain, y2_plain, r2_plain] = kernels::add_rmsnorm_forward(x, add, w, 1e-5);
    EXPECT_TRUE(at::equal(h, h_plain) && at::equal(y2, y2_plain));
    at::Tensor dy = at::randn_like(x), residual = at::randn_like(x);
    at::Tensor gw = at::zeros({dim}, test::cuda_options(at::kFloat)), gw2 = gw.clone();
    at::Tensor dx = kernels::rmsnorm_backward(dy, h, w, r2, gw, false, residual, &amax);
    EXPECT_TRUE(at::equal(dx, kernels::rmsnorm_backward(dy, h, w, r2, gw2, false, residual)));
    EXPECT_TRUE(at::equal(amax, max_of(dx)));
    dx = kernels::rmsnorm_backward(dy, h, w, r2, gw, false, {}, &amax);
    EXPECT_TRUE(at::equal(amax, max_of(dx)));
    // A residual the pass does not take (another dtype): the separate add's amax.
    const auto other = dt == at::kFloat ? at::kBFloat16 : at::kFloat;
    dx = kernels::rmsnorm_backward(dy, h, w, r2, gw, false, residual.to(other), &amax);
    EXPECT_TRUE(at::equal(amax, max_of(dx)));
  }
  at::Tensor ab = at::randn({5, 33, 2 * 1536}, test::cuda_options(dt)) * 4;
  at::Tensor dg = at::randn({5, 33, 1536}, test::cuda_options(dt));
  at::Tensor amax;
  at::Tensor g = kernels::swiglu_forward(ab, &amax);
  EXPECT_TRUE(at::equal(g, kernels::swiglu_forward(ab)));
  EXPECT_TRUE(at::equal(amax, max_of(g)));
  at::Tensor dab = kernels::swiglu_backward(dg, ab, &amax);
  EXPECT_TRUE(at::equal(dab, kernels::swiglu_backward(dg, ab)));
  EXPECT_TRUE(at::equal(amax, max_of(dab)));
  // A shape the kernel does not take (odd width): the ATen path's amax.
  at::Tensor odd = at::randn({7, 2 * 13}, test::cuda_options(dt));
  g = kernels::swiglu_forward(odd, &amax);
  EXPECT_TRUE(at::equal(amax, max_of(g)));
}

TEST_P(KernelTest, CrossEntropyLossAndGradientMatchReference) {
  const auto dt = GetParam();
  for (int64_t vocab : {2000, 128256}) {
    at::Tensor logits = (3 * at::randn({64, vocab}, test::cuda_options(at::kFloat))).to(dt);
    at::Tensor tgt = at::randint(0, vocab, {64}, test::cuda_options(at::kLong));
    at::Tensor lf = logits.to(at::kFloat);
    at::Tensor lse = at::logsumexp(lf, 1);
    at::Tensor loss_ref = (lse - lf.gather(1, tgt.unsqueeze(1)).squeeze(1)).sum();
    at::Tensor grad_ref = at::softmax(lf, 1);
    grad_ref.scatter_add_(1, tgt.unsqueeze(1), at::full({64, 1}, -1.0, grad_ref.options()));
    grad_ref.mul_(0.125);
    at::Tensor work = logits.clone();
    at::Tensor loss = kernels::cross_entropy_fwd_bwd(work, tgt, 0.125, true);
    EXPECT_LT(relative_error(loss, loss_ref), 1e-5) << vocab;
    EXPECT_LT(relative_error(work, grad_ref), tol(dt)) << vocab;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KernelTest, ::testing::Values(at::kBFloat16, at::kFloat));

TEST(Kernels, WeightGradientGemmAccumulatesOrOverwritesInFp32) {
  at::Tensor dy = at::randn({1000, 384}, test::cuda_options(at::kBFloat16));
  at::Tensor x = at::randn({1000, 256}, test::cuda_options(at::kBFloat16));
  at::Tensor product = at::mm(dy.to(at::kFloat).t(), x.to(at::kFloat));
  at::Tensor grad = at::randn({384, 256}, test::cuda_options(at::kFloat));
  at::Tensor expected = grad + product;
  kernels::gemm_tn_fp32(dy, x, grad, /*accumulate=*/true);
  EXPECT_LT(relative_error(grad, expected), 1e-5);
  grad.fill_(std::nanf(""));  // overwrite must not read the old contents
  kernels::gemm_tn_fp32(dy, x, grad, /*accumulate=*/false);
  EXPECT_LT(relative_error(grad, product), 1e-5);
}

// Every layout the linear layers hand the tuned GEMM (either operand transposed, a row slice
// of a wider matrix, bf16 and fp32 outputs, overwrite and accumulate), against an fp32 product,
// at the first use of each shape (tuning) and the second (the kept algorithm).
TEST(Kernels, TunedGemmMatchesTheFp32ProductInEveryLayout) {
  const auto bf = test::cuda_options(at::kBFloat16);
  for (int64_t m : {256, 200}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        for (at::ScalarType out_type : {at::kBFloat16, at::kFloat}) {
          const int64_t k = 384, n = 136;
          at::Tensor a =
              at::randn(ta ? std::vector<int64_t>{k, m} : std::vector<int64_t>{m, k}, bf);
          // b as a column slice of a wider matrix: its rows are further apart than its width.
          at::Tensor wide =
              at::randn(tb ? std::vector<int64_t>{n, k + 64} : std::vector<int64_t>{k, n + 64}, bf);
          at::Tensor b = tb ? wide.narrow(1, 0, k) : wide.narrow(1, 0, n);
          at::Tensor af = ta ? a.to(at::kFloat).t() : a.to(at::kFloat);
          at::Tensor bfl = tb ? b.to(at::kFloat).t() : b.to(at::kFloat);
          const at::Tensor product = at::mm(af, bfl);
          SCOPED_TRACE(::testing::Message()
                       << "m " << m << " ta " << ta << " tb " << tb << " out " << out_type);
          ASSERT_TRUE(kernels::gemm_supported(a, b, product.to(out_type)));
          const double bound = out_type == at::kFloat ? 1e-5 : tol(at::kBFloat16);
          for (int use = 0; use < 2; ++use) {
            at::Tensor out = at::full({m, n}, std::nanf(""), test::cuda_options(out_type));
            ASSERT_TRUE(kernels::gemm(a, ta, b, tb, out, /*accumulate=*/false));
            EXPECT_LT(relative_error(out, product), bound);
            at::Tensor base = at::randn({m, n}, test::cuda_options(out_type));
            at::Tensor sum = base.clone();
            ASSERT_TRUE(kernels::gemm(a, ta, b, tb, sum, /*accumulate=*/true));
            EXPECT_LT(relative_error(sum, base.to(at::kFloat) + product), bound);
          }
        }
      }
    }
  }
  // The residual read in the epilogue: out = a b + addend, rounded once.
  {
    at::Tensor a = at::randn({256, 384}, bf), b = at::randn({136, 384}, bf);
    at::Tensor addend = at::randn({256, 136}, bf), out = at::empty({256, 136}, bf);
    ASSERT_TRUE(kernels::gemm(a, false, b, true, out, /*accumulate=*/false, addend));
    const at::Tensor expected =
        at::mm(a.to(at::kFloat), b.to(at::kFloat).t()) + addend.to(at::kFloat);
    EXPECT_LT(relative_error(out, expected), tol(at::kBFloat16));
    at::Tensor x3 = a.view({2, 128, 384}), r3 = addend.view({2, 128, 136});
    EXPECT_LT(relative_error(ops::linear_forward_add(x3, b, r3), expected.view({2, 128, 136})),
              tol(at::kBFloat16));
  }
  // The linear layers' entry point routes the same products through it, as ATen would.
  at::Tensor x = at::randn({512, 256}, bf), w = at::randn({192, 256}, bf);
  EXPECT_LT(relative_error(ops::tuned_mm(x, w.t()), at::mm(x.to(at::kFloat), w.to(at::kFloat).t())),
            tol(at::kBFloat16));
}

// The tuned float8 product (every operand pairing the recipes use, fast accumulation on and
// off, bf16 and fp32 outputs, a row slice of a wider matrix) against the fp32 product of its
// dequantized operands, at the first use of each shape (tuning) and the second; shapes cuBLASLt's
// float8 GEMM does not take are declined.
TEST(Kernels, TunedFloat8GemmMatchesTheFp32ProductOfItsOperands) {
  const auto f32 = test::cuda_options(at::kFloat);
  const int64_t m = 256, n = 192, k = 384;
  for (auto [ta, tb] : {std::pair{at::kFloat8_e4m3fn, at::kFloat8_e4m3fn},
                        std::pair{at::kFloat8_e5m2, at::kFloat8_e4m3fn}}) {
    for (bool fast : {false, true}) {
      for (at::ScalarType out_type : {at::kBFloat16, at::kFloat}) {
        SCOPED_TRACE(testing::Message() << ta << " " << fast << " " << out_type);
        const at::Tensor a = at::randn({m, k}, f32).to(ta);
        const at::Tensor wide = at::randn({n, k + 64}, f32).to(tb);
        const at::Tensor bt = wide.narrow(1, 0, k);
        const at::Tensor sa = at::full({}, 0.5, f32), sb = at::full({}, 0.25, f32);
        const at::Tensor want = at::mm(a.to(at::kFloat) * sa, (bt.to(at::kFloat) * sb).t());
        for (int use = 0; use < 2; ++use) {
          at::Tensor out = at::full({m, n}, std::nanf(""), f32).to(out_type);
          ASSERT_TRUE(kernels::gemm_float8(a, bt, sa, sb, out, fast));
          // Hopper's float8 tensor cores keep fewer bits in their running sums than fp32 (1.3e-4
          // measured on an H100 without fast accumulation), fast accumulation fewer still.
          const double tolerance = out_type == at::kFloat && !fast ? 1e-3 : 1e-2;
          EXPECT_LT(relative_error(out.to(at::kFloat), want), tolerance);
        }
        // An addend goes into the epilogue and is left as it was.
        const at::Tensor addend = at::randn({m, n}, f32).to(out_type);
        const at::Tensor kept = addend.clone();
        at::Tensor out = at::full({m, n}, std::nanf(""), f32).to(out_type);
        ASSERT_TRUE(kernels::gemm_float8(a, bt, sa, sb, out, fast, addend));
        EXPECT_LT(relative_error(out.to(at::kFloat), want + addend.to(at::kFloat)), 1e-2);
        EXPECT_TRUE(at::equal(addend, kept));
        EXPECT_FALSE(kernels::gemm_float8(a, bt, sa, sb, out, fast, out));  // not apart from out
        EXPECT_FALSE(kernels::gemm_float8(a, bt, sa, sb, out, fast, addend.t().contiguous().t()));
      }
    }
  }
  const at::Tensor a = at::randn({m, 40}, f32).to(at::kFloat8_e4m3fn);
  const at::Tensor bt = at::randn({n, 40}, f32).to(at::kFloat8_e4m3fn);
  const at::Tensor one = at::ones({}, f32);
  at::Tensor out = at::empty({m, n}, test::cuda_options(at::kBFloat16));
  EXPECT_FALSE(kernels::gemm_float8(a, bt, one, one, out, false));  // k = 40: not a multiple of 16
}

// A rank's tensors live on its own GPU whatever the thread's current device is (start-up
// timings ran rank 1's kernels on GPU 0's stream: an illegal address on 2 H200s).
TEST(Kernels, RunOnTheOperandsGpuNotTheCurrentOne) {
  if (c10::cuda::device_count() < 2) GTEST_SKIP() << "needs 2 GPUs";
  const c10::cuda::CUDAGuard current(0);
  const auto on1 = at::TensorOptions().device(at::Device(at::kCUDA, 1));
  at::Tensor x = at::randn({4, 33, 2048}, on1.dtype(at::kBFloat16));
  at::Tensor w = (1 + 0.1 * at::randn({2048}, on1)).to(at::kBFloat16);
  auto [y, r] = kernels::rmsnorm_forward(x, w, 1e-5);
  EXPECT_EQ(y.device(), x.device());
  EXPECT_LT(relative_error(y, std::get<0>(ops::rmsnorm_forward_ref(x, w, 1e-5))),
            tol(at::kBFloat16));
  at::Tensor ab = at::randn({4, 33, 2 * 1024}, on1.dtype(at::kBFloat16));
  EXPECT_LT(relative_error(kernels::swiglu_forward(ab), ops::swiglu_forward_ref(ab)),
            tol(at::kBFloat16));
  at::Tensor g = at::randn({1000, 64}, on1.dtype(at::kFloat));
  EXPECT_NEAR(kernels::sum_of_squares({g}).item<double>(), g.square().sum().item<double>(),
              1e-3 * g.square().sum().item<double>());
  EXPECT_EQ(c10::cuda::current_device(), 0);
}

TEST(Kernels, RopeWritesIntoStridedOutput) {
  auto args = model::llama_flavor("8B");
  at::Tensor dq = at::randn({2, 64, 32, 128}, test::cuda_options(at::kBFloat16));
  at::Tensor dqkv = at::full({2, 64, 48, 128}, std::nanf(""), test::cuda_options(at::kBFloat16));
  auto [c, sn] = ops::rope_tables(args, 64, at::TensorOptions().device(at::kCUDA));
  kernels::rope_apply_out(dq, c, sn, true, dqkv.narrow(2, 0, 32));
  EXPECT_LT(relative_error(dqkv.narrow(2, 0, 32), ops::rope_apply_ref(dq, c, sn, true)), 1e-2);
  EXPECT_TRUE(dqkv.narrow(2, 32, 16).isnan().all().item<bool>());  // nothing else touched
}

TEST(Kernels, FusedAdamWMatchesReferenceUpdate) {
  const int64_t n = 100003;  // not a multiple of 4: the tail path runs too
  at::Tensor p = at::randn({n}, test::cuda_options(at::kFloat)),
             g = at::randn({n}, test::cuda_options(at::kFloat));
  at::Tensor m = at::randn({n}, test::cuda_options(at::kFloat)).abs() * 0.1,
             v = at::rand({n}, test::cuda_options(at::kFloat));
  at::Tensor p2 = p.clone(), m2 = m.clone(), v2 = v.clone();
  at::Tensor shadow = at::empty({n}, test::cuda_options(at::kBFloat16));
  const double lr = 1e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, t = 7, div = 2.5;
  const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
  at::Tensor hyper = at::tensor({float(lr), float(b1), float(b2), float(eps), float(wd),
                                 float(lr / bc1), float(1 / std::sqrt(bc2)), 0.f},
                                test::cuda_options(at::kFloat));
  at::Tensor divisor = at::full({}, div, test::cuda_options(at::kFloat));
  kernels::adamw_step(p, g, m, v, shadow, hyper, divisor, /*decoupled=*/true);
  at::Tensor gd = g / div;
  m2 = b1 * m2 + (1 - b1) * gd;
  v2 = b2 * v2 + (1 - b2) * gd * gd;
  p2 = p2 * (1 - lr * wd) - (lr / bc1) * m2 / (v2.sqrt() / std::sqrt(bc2) + eps);
  EXPECT_LT(relative_error(p, p2), 1e-6);
  EXPECT_LT(relative_error(m, m2), 1e-6);
  EXPECT_LT(relative_error(v, v2), 1e-6);
  EXPECT_LT(relative_error(shadow, p2), 1e-2);
  // The amax of the values written (the bf16 copy's where there is one), in the same pass, and
  // the same update as without it.
  // The largest value in the tail (elements past the last float4), then in the vectors.
  at::Tensor amax = at::full({1}, -1.0, test::cuda_options(at::kFloat));
  for (int64_t largest_at : {n - 1, int64_t{5}}) {
    for (bool with_shadow : {false, true}) {
      SCOPED_TRACE(testing::Message() << largest_at << " " << with_shadow);
      at::Tensor q = p.clone(), qm = m.clone(), qv = v.clone();
      q[largest_at] = -40.0;
      at::Tensor q2 = q.clone(), qm2 = m.clone(), qv2 = v.clone();
      at::Tensor s = with_shadow ? at::empty_like(shadow) : at::Tensor();
      at::Tensor s2 = with_shadow ? at::empty_like(shadow) : at::Tensor();
      kernels::adamw_step(q, g, qm, qv, s, hyper, divisor, true, amax);
      kernels::adamw_step(q2, g, qm2, qv2, s2, hyper, divisor, true);
      EXPECT_TRUE(at::equal(q, q2) && at::equal(qm, qm2) && at::equal(qv, qv2));
      if (with_shadow) {
        EXPECT_TRUE(at::equal(s, s2));
      }
      const at::Tensor written = with_shadow ? s.to(at::kFloat) : q;
      EXPECT_EQ(amax.item<float>(), written.abs().max().item<float>());
      EXPECT_EQ(amax.item<float>(), written[largest_at].abs().item<float>());
    }
  }
}

TEST(Kernels, SumOfSquaresMatchesDoubleReference) {
  // Sizes cover: a single element, several chunks with a ragged end, empty, and unaligned tails.
  std::vector<at::Tensor> xs;
  double expected = 0;
  for (int64_t n : {int64_t{1}, int64_t{262144 * 3 + 7}, int64_t{0}, int64_t{1001}}) {
    xs.push_back(at::randn({n}, test::cuda_options(at::kFloat)) * 3.0);
    expected += xs.back().to(at::kDouble).square().sum().item<double>();
  }
  const double got = kernels::sum_of_squares(xs).item<double>();
  EXPECT_NEAR(got, expected, 1e-6 * expected);
  // Deterministic: the same bits every time.
  EXPECT_EQ(kernels::sum_of_squares(xs).item<float>(), kernels::sum_of_squares(xs).item<float>());
}

TEST(Kernels, HeadLossFusedMatchesUnfused) {
  const int64_t n = 300, d = 256, v = 2000;
  at::Tensor h = at::randn({n, d}, test::cuda_options(at::kBFloat16));
  at::Tensor nw = at::ones({d}, test::cuda_options(at::kBFloat16));
  at::Tensor ow = (0.05 * at::randn({v, d}, test::cuda_options(at::kFloat))).to(at::kBFloat16);
  at::Tensor tgt = at::randint(0, v, {n}, test::cuda_options(at::kLong));
  at::Tensor ng1 = at::zeros({d}, test::cuda_options(at::kFloat)),
             og1 = at::zeros({v, d}, test::cuda_options(at::kFloat));
  at::Tensor ng2 = ng1.clone(), og2 = og1.clone();
  ops::set_fused_kernels(true);
  auto fused = ops::head_forward_backward(h, nw, ow, tgt, 1e-5, 1.0 / n, &ng1, &og1);
  ops::set_fused_kernels(false);
  auto plain = ops::head_forward_backward(h, nw, ow, tgt, 1e-5, 1.0 / n, &ng2, &og2);
  ops::set_fused_kernels(true);
  EXPECT_LT(relative_error(fused.loss_sum, plain.loss_sum), 1e-4);
  EXPECT_LT(relative_error(fused.dh, plain.dh), 2e-2);
  EXPECT_LT(relative_error(og1, og2), 2e-2);
  EXPECT_LT(relative_error(ng1, ng2), 2e-2);
}

TEST(Kernels, AttentionBackwardMatchesAutograd) {
  const int64_t b = 2, s = 128, h = 8, kv = 2, hd = 64;
  at::Tensor q = at::randn({b, s, h, hd}, test::cuda_options(at::kBFloat16));
  at::Tensor k = at::randn({b, s, kv, hd}, test::cuda_options(at::kBFloat16));
  at::Tensor v = at::randn({b, s, kv, hd}, test::cuda_options(at::kBFloat16));
  ops::AttentionSaved saved;
  at::Tensor out = ops::attention_forward(q, k, v, saved);
  at::Tensor dout = at::randn_like(out);
  auto [dq, dk, dv] = ops::attention_backward(dout, saved, kv);
  // Reference: math attention in fp32 with autograd.
  at::Tensor qf = q.to(at::kFloat).transpose(1, 2).set_requires_grad(true);
  at::Tensor kf = k.to(at::kFloat).transpose(1, 2).set_requires_grad(true);
  at::Tensor vf = v.to(at::kFloat).transpose(1, 2).set_requires_grad(true);
  at::Tensor ke = kf.repeat_interleave(h / kv, 1), ve = vf.repeat_interleave(h / kv, 1);
  at::Tensor scores = at::matmul(qf, ke.transpose(-1, -2)) / std::sqrt(double(hd));
  scores = scores.masked_fill(at::ones({s, s}, test::cuda_options(at::kBool)).triu(1), -INFINITY);
  at::Tensor ref = at::matmul(at::softmax(scores, -1), ve).transpose(1, 2);
  ref.backward(dout.to(at::kFloat));
  EXPECT_LT(relative_error(out, ref), 2e-2);
  EXPECT_LT(relative_error(dq, qf.grad().transpose(1, 2)), 3e-2);
  EXPECT_LT(relative_error(dk, kf.grad().transpose(1, 2)), 3e-2);
  EXPECT_LT(relative_error(dv, vf.grad().transpose(1, 2)), 3e-2);
  std::printf("attention backend: %s\n", ops::attention_backend_name(true).c_str());
}
