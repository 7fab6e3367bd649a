// Float8 on the GPU: titan's fused casts (max pass + cast pass; per tensor, per row, per column
// of the transposed operand; odd shapes and 64-multiples) produce the same float8 bytes and scale
// as the ATen path on the CPU (also for a matrix cast from a flat master with a separate amax,
// and its float8 transpose), and every GEMM of a converted linear through cuBLASLt (_scaled_mm)
// matches the same float8 operands multiplied in fp32, for every recipe.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "support/reference_llama.h"
#include "support/test_support.h"
#include "titan/model/layout.h"
#include "titan/ops/float8.h"
#include "titan/parallel/fsdp.h"
#include "titan/train/optimizer.h"

using namespace titan;
using test::relative_error;

namespace {
// titan's fused cast of x on the GPU gives the CPU cast's float8 bytes and inverse scales.
void expect_cpu_cast(const at::Tensor& x, at::ScalarType dtype, bool rowwise, bool transpose) {
  SCOPED_TRACE(testing::Message() << "rowwise " << rowwise << " transpose " << transpose);
  const auto gpu = ops::to_float8(x.cuda(), dtype, rowwise, transpose);
  const auto cpu = ops::to_float8(x, dtype, rowwise, transpose);
  ASSERT_EQ(gpu.data.sizes(), cpu.data.sizes());
  EXPECT_TRUE(at::equal(gpu.data.cpu().view(at::kByte), cpu.data.view(at::kByte)));
  EXPECT_LT(relative_error(gpu.inv_scale.cpu(), cpu.inv_scale), 1e-6);
}
}  // namespace

TEST(Float8Gpu, FusedCastsMatchTheCpuCast) {
  at::manual_seed(4);
  // Odd shapes: partial 32 x 32 tiles, a tail after the 16-byte vectors, and (300 x 200) the
  // vectorized row/column maxima over a partial strip of rows; multiples of 64: the vectorized
  // 64 x 64 tiles (per tensor, row and column scales).
  for (auto [src, rows, cols] :
       {std::tuple{at::kBFloat16, 300, 203}, std::tuple{at::kFloat, 300, 203},
        std::tuple{at::kBFloat16, 300, 200}, std::tuple{at::kBFloat16, 256, 192},
        std::tuple{at::kFloat, 128, 320}}) {
    SCOPED_TRACE(testing::Message() << rows << " x " << cols << " " << src);
    const at::Tensor x = (at::randn({rows, cols}) * 3).to(src);
    for (auto dtype : {at::kFloat8_e4m3fn, at::kFloat8_e5m2}) {
      for (auto [rowwise, transpose] : {std::pair{false, false}, std::pair{false, true},
                                        std::pair{true, false}, std::pair{true, true}}) {
        expect_cpu_cast(x, dtype, rowwise, transpose);
      }
    }
  }
}

// Large enough that every thread of the grid-stride max and cast kernels takes several
// vectors, with a tail after the last whole vector (8191 x 4099 for both dtypes), and
// that the per-row max kernel strides over rows; per row and per column of the transpose too.
TEST(Float8Gpu, FusedCastsOfALargeTensorMatchTheCpuCast) {
  at::manual_seed(5);
  for (auto src : {at::kBFloat16, at::kFloat}) {
    const at::Tensor x = (at::randn({8191, 4099}) * 3).to(src);
    for (auto [rowwise, transpose] :
         {std::pair{false, false}, std::pair{true, false}, std::pair{true, true}}) {
      SCOPED_TRACE(testing::Message() << src);
      expect_cpu_cast(x, at::kFloat8_e4m3fn, rowwise, transpose);
    }
  }
}

// The tensorwise forward casts x and writes x^T for the weight gradient in one pass (both
// outputs of the 64 x 64 kernel): the same packed bytes as the CPU cast.
TEST(Float8Gpu, ForwardWritesTheCpuCastsOfXAndItsTranspose) {
  at::manual_seed(6);
  const at::Tensor x = at::randn({2, 128, 192}).to(at::kBFloat16);
  const at::Tensor w = (at::randn({320, 192}) * 0.02).to(at::kBFloat16);
  const ops::Float8Linear real(ops::Float8Recipe::Tensorwise, /*emulate=*/false),
      emulated(ops::Float8Recipe::Tensorwise, /*emulate=*/true);
  at::Tensor packed_gpu, packed_cpu;
  real.forward(x.cuda(), w.cuda(), &packed_gpu);
  emulated.forward(x, w, &packed_cpu);
  ASSERT_EQ(packed_gpu.scalar_type(), at::kByte);
  ASSERT_EQ(packed_gpu.numel(), packed_cpu.numel());
  const int64_t bytes = x.numel();  // the float8 data, then the fp32 inverse scale
  EXPECT_TRUE(at::equal(packed_gpu.cpu().narrow(0, 0, bytes), packed_cpu.narrow(0, 0, bytes)));
  EXPECT_LT(relative_error(packed_gpu.cpu().narrow(0, bytes, 4).view(at::kFloat),
                           packed_cpu.narrow(0, bytes, 4).view(at::kFloat)),
            1e-6);
}

// A weight matrix cast from its place in a unit's flat fp32 master (the single-rank float8
// path with checkpointing): the amax pass and the cast with that amax give the bytes of casting
// the matrix on its own on the CPU; its transpose for the input gradient (the 64 x 64 byte
// kernel, and the fallback for other shapes) is the CPU's transpose.
TEST(Float8Gpu, MatrixCastFromAFlatMasterAndItsTransposeMatchTheCpu) {
  at::manual_seed(7);
  for (auto [src, rows, cols] :
       {std::tuple{at::kFloat, 320, 192}, std::tuple{at::kBFloat16, 320, 192},
        std::tuple{at::kFloat, 100, 72}}) {
    SCOPED_TRACE(testing::Message() << rows << " x " << cols << " " << src);
    const at::Tensor flat = (at::randn({64 + rows * cols + 64}) * 0.05).to(src);
    const at::Tensor w = flat.narrow(0, 64, rows * cols);
    const at::Tensor amax = at::zeros({4}, at::kFloat).cuda();
    const at::Tensor inv = at::zeros({4}, at::kFloat).cuda();
    const at::Tensor out = at::empty({rows * cols}, at::kFloat8_e4m3fn).cuda();
    const at::Tensor w_gpu = flat.cuda().narrow(0, 64, rows * cols);
    ops::float8_amax_into(w_gpu, amax.narrow(0, 1, 1));
    ops::float8_cast_with_amax_into(w_gpu, amax.narrow(0, 1, 1), out, inv.narrow(0, 2, 1));
    const auto cpu = ops::to_float8(w.view({rows, cols}), at::kFloat8_e4m3fn, false, false);
    EXPECT_FLOAT_EQ(amax[1].item<float>(), w.abs().max().item().toFloat());
    EXPECT_TRUE(at::equal(out.cpu().view(at::kByte).view({rows, cols}), cpu.data.view(at::kByte)));
    EXPECT_LT(relative_error(inv.narrow(0, 2, 1).cpu().reshape({}), cpu.inv_scale), 1e-6);
    const at::Tensor t = ops::float8_transpose(out.view({rows, cols}));
    EXPECT_TRUE(at::equal(t.cpu().view(at::kByte), cpu.data.view(at::kByte).t().contiguous()));
  }
}

// A producer's amax handed to a tensorwise projection (its casts then skip the max pass) gives
// the bytes of the projection's own casts: forward with x^T, the input gradient with dy^T, the
// weight gradient's x^T alone; on the 64 x 64 tiles and off them.
TEST(Float8Gpu, AGivenAmaxGivesTheBytesOfTheProjectionsOwnCasts) {
  at::manual_seed(8);
  const ops::Float8Linear lin(ops::Float8Recipe::Tensorwise, /*emulate=*/false);
  for (auto [rows, cols] : {std::pair{256, 192}, std::pair{100, 72}}) {
    SCOPED_TRACE(testing::Message() << rows << " x " << cols);
    const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    const at::Tensor x = at::randn({rows, cols}, bf16) * 3;
    const at::Tensor w = at::randn({128, cols}, bf16) * 0.02;
    const at::Tensor dy = at::randn({rows, 128}, bf16) * 1e-3;
    at::Tensor p_self, p_given;
    EXPECT_TRUE(
        at::equal(lin.forward(x, w, &p_self), lin.forward(x, w, &p_given, ops::abs_max(x))));
    EXPECT_TRUE(at::equal(p_self, p_given));
    EXPECT_TRUE(at::equal(lin.weight_input(x), lin.weight_input(x, ops::abs_max(x))));
    EXPECT_TRUE(at::equal(lin.backward_input(dy, w, &p_self),
                          lin.backward_input(dy, w, &p_given, ops::abs_max(dy))));
    EXPECT_TRUE(at::equal(p_self, p_given));
    // The amax given is the one used: twice it, twice the inverse scale (e5m2 for dy).
    at::Tensor p_big;
    lin.backward_input(dy, w, &p_big, ops::abs_max(dy) * 2);
    const int64_t bytes = dy.numel();
    EXPECT_FLOAT_EQ(p_big.narrow(0, bytes, 4).view(at::kFloat).item<float>(),
                    2 * p_self.narrow(0, bytes, 4).view(at::kFloat).item<float>());
  }
}

TEST(Float8Gpu, ScaledMatmulsMatchTheirFloat8OperandsInFp32) {
  at::manual_seed(5);
  const auto opts = test::cuda_options(at::kBFloat16);
  const int64_t m = 512, k = 768, n = 384;
  const at::Tensor x = at::randn({2, m / 2, k}, opts);
  const at::Tensor w = at::randn({n, k}, opts) * 0.02;
  const at::Tensor dy = at::randn({2, m / 2, n}, opts) * 1e-3;
  for (auto r : {ops::Float8Recipe::Tensorwise, ops::Float8Recipe::Rowwise,
                 ops::Float8Recipe::RowwiseWithGwHp}) {
    SCOPED_TRACE(ops::float8_recipe_name(r));
    const ops::Float8Linear real(r, /*emulate=*/false), emulated(r, /*emulate=*/true);
    EXPECT_LT(relative_error(real.forward(x, w, nullptr), emulated.forward(x, w, nullptr)), 1e-2);
    EXPECT_LT(relative_error(real.backward_input(dy, w, nullptr),
                             emulated.backward_input(dy, w, nullptr)),
              1e-2);
    at::Tensor g1 = at::zeros({n, k}, test::cuda_options(at::kFloat)), g2 = at::zeros_like(g1);
    real.backward_weight(dy, x, g1, /*accumulate=*/true);
    emulated.backward_weight(dy, x, g2, /*accumulate=*/true);
    EXPECT_LT(relative_error(g1, g2), 1e-2);
    // And float8 stays close to the bf16 products.
    EXPECT_LT(relative_error(real.forward(x, w, nullptr), at::matmul(x, w.t())), 0.1);
    // forward_add: the residual added to the same product (in the GEMM's epilogue for
    // tensorwise), the weight-gradient operand as forward's, the residual left as it was.
    const at::Tensor residual = at::randn({2, m / 2, n}, opts) * 0.05;
    const at::Tensor kept = residual.clone();
    at::Tensor p_plain, p_add;
    const at::Tensor plain = real.forward(x, w, &p_plain);
    const at::Tensor added = real.forward_add(x, w, residual, &p_add);
    ASSERT_EQ(added.sizes(), residual.sizes());
    EXPECT_LT(relative_error(added, residual.to(at::kFloat) + plain.to(at::kFloat)), 1e-2);
    EXPECT_TRUE(at::equal(p_plain, p_add));
    EXPECT_TRUE(at::equal(residual, kept));
  }
}

// The fused AdamW takes each float8 matrix's amax as it writes the new weights (of the bf16
// shadow where there is one): the next materialization's float8 weights and scales are bitwise
// those of a pass over the new weights, and the update itself is the one without it. The scales
// do come from the optimizer's amaxes (doubled, they double), and a load (refresh_shadows)
// drops them.
TEST(Float8Gpu, OptimizerTakesTheFloat8WeightsAmaxAsItWritesThem) {
  const auto args = test::tiny_llama_args();
  const auto units = model::llama_units(args);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(dtype);
    parallel::FsdpOptions opts;
    opts.param_dtype = dtype;  // bf16: the optimizer writes a bf16 shadow the casts read
    for (const auto& u : units) {
      opts.float8_ranges.push_back(u.kind == model::UnitKind::Block
                                       ? model::block_float8_ranges(u, true, true, true, true)
                                       : std::vector<model::ElementRange>{});
    }
    const c10::Device gpu(c10::kCUDA, 0);
    parallel::FsdpModel taken(units, nullptr, nullptr, gpu, opts);
    parallel::FsdpModel passed(units, nullptr, nullptr, gpu, opts);
    taken.init_weights(3);
    passed.init_weights(3);
    for (size_t i = 0; i < units.size(); ++i) {
      at::manual_seed(static_cast<uint64_t>(10 + i));
      taken.unit(i).grad.copy_(at::randn_like(taken.unit(i).grad));
      passed.unit(i).grad.copy_(taken.unit(i).grad);
    }
    train::Optimizer opt_taken(taken.master_shards(), taken.grad_shards(), {}, taken.shadows());
    train::Optimizer opt_passed(passed.master_shards(), passed.grad_shards(), {}, passed.shadows());
    std::vector<size_t> with_amax;
    for (size_t i = 0; i < units.size(); ++i) {
      std::vector<train::AmaxRange> ranges;
      for (const auto& p : taken.float8_pieces(i)) ranges.push_back({p.offset, p.numel, p.matrix});
      if (ranges.empty()) continue;
      ASSERT_TRUE(opt_taken.take_amax(i, ranges, taken.stepped_float8_amax(i))) << i;
      with_amax.push_back(i);
    }
    ASSERT_FALSE(with_amax.empty());
    opt_taken.step(1e-2, at::Tensor());
    opt_passed.step(1e-2, at::Tensor());
    taken.weights_changed();
    passed.weights_changed();
    for (size_t i : with_amax) {
      ASSERT_TRUE(opt_taken.wrote_amax(i));
      taken.float8_amax_stepped(i, true);
    }
    // The float8 matrices' bytes of a gathered unit (the rest of its buffer is never read).
    auto matrices = [&](const model::GatheredUnit& g, size_t i) {
      std::vector<at::Tensor> parts;
      for (const auto& r : opts.float8_ranges[i]) {
        parts.push_back(g.flat8.view(at::kByte).narrow(0, r.offset, r.numel));
      }
      return at::cat(parts);
    };
    for (size_t i : with_amax) {
      SCOPED_TRACE(i);
      EXPECT_TRUE(at::equal(taken.unit(i).master, passed.unit(i).master));
      const at::Tensor& weights = dtype == at::kFloat ? taken.unit(i).master : taken.unit(i).shadow;
      for (const auto& p : taken.float8_pieces(i)) {
        EXPECT_EQ(taken.unit(i).stepped_amax[p.matrix].item<float>(),
                  weights.narrow(0, p.offset, p.numel).abs().max().item().toFloat());
      }
      ASSERT_TRUE(taken.unit(i).stepped_amax_fresh);
      const auto a = taken.gathered(i), b = passed.gathered(i);
      EXPECT_TRUE(at::equal(a.inv_scales, b.inv_scales));
      EXPECT_TRUE(at::equal(matrices(a, i), matrices(b, i)));
      taken.release(i, false);
      passed.release(i, false);
    }
    // The scales come from the stepped amaxes: doubled, the inverse scales double.
    const size_t first = with_amax.front();
    const at::Tensor before = taken.gathered(first).inv_scales.clone();
    taken.release(first, false);
    taken.weights_changed();
    taken.unit(first).stepped_amax.mul_(2);
    EXPECT_TRUE(at::allclose(taken.gathered(first).inv_scales, before * 2));
    taken.release(first, false);
    // Masters rewritten outside the optimizer: a pass over them again.
    taken.unit(first).master.mul_(2);
    taken.refresh_shadows();
    EXPECT_FALSE(taken.unit(first).stepped_amax_fresh);
    passed.unit(first).master.mul_(2);
    passed.refresh_shadows();
    EXPECT_TRUE(at::equal(taken.gathered(first).inv_scales, passed.gathered(first).inv_scales));
  }
}
