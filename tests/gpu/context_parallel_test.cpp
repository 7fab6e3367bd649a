// Ring attention's pieces on the GPU: block attention (flash kernels in bf16, exact math in fp32)
// merged through log-sum-exp, and the blocks' gradients given the merged result, against whole
// causal attention computed in fp32 with autograd.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "support/test_support.h"
#include "titan/ops/attention.h"

using namespace titan;
using test::relative_error;

namespace {

class BlockAttentionGpu : public ::testing::TestWithParam<at::ScalarType> {};

}  // namespace

TEST_P(BlockAttentionGpu, MergedBlocksMatchWholeAttentionForwardAndBackward) {
  const auto dt = GetParam();
  const int64_t b = 2, s = 512, h = 8, kv = 2, hd = 64, blocks = 4, c = s / blocks;
  const auto opts = test::cuda_options(dt);
  const at::Tensor q = at::randn({b, s, h, hd}, opts), k = at::randn({b, s, kv, hd}, opts);
  const at::Tensor v = at::randn({b, s, kv, hd}, opts), dout = at::randn({b, s, h, hd}, opts);
  const auto ref = test::causal_attention_reference(q, k, v, dout);
  const double tol = 2 * test::kernel_tolerance(dt);
  at::Tensor dq = at::zeros({b, s, h, hd}, test::cuda_options(at::kFloat));
  at::Tensor dk = at::zeros({b, s, kv, hd}, test::cuda_options(at::kFloat));
  at::Tensor dv = at::zeros_like(dk);
  for (int64_t i = 0; i < blocks; ++i) {
    // Query block i against key blocks 0..i (the diagonal one causal), merged in reverse.
    const at::Tensor qi = q.narrow(1, i * c, c);
    at::Tensor o, lse;
    for (int64_t j = i; j >= 0; --j) {
      auto [po, pl] =
          ops::block_attention_forward(qi, k.narrow(1, j * c, c), v.narrow(1, j * c, c), j == i);
      ops::merge_attention(o, lse, po, pl);
    }
    EXPECT_LT(relative_error(o, ref.out.narrow(1, i * c, c)), tol) << "block " << i;
    const at::Tensor out = o.to(dt);
    for (int64_t j = 0; j <= i; ++j) {
      auto [gq, gk, gv] =
          ops::block_attention_backward(dout.narrow(1, i * c, c), qi, k.narrow(1, j * c, c),
                                        v.narrow(1, j * c, c), out, lse, j == i);
      dq.narrow(1, i * c, c).add_(gq.to(at::kFloat));
      dk.narrow(1, j * c, c).add_(gk.to(at::kFloat));
      dv.narrow(1, j * c, c).add_(gv.to(at::kFloat));
    }
  }
  EXPECT_LT(relative_error(dq, ref.dq), tol);
  EXPECT_LT(relative_error(dk, ref.dk), tol);
  EXPECT_LT(relative_error(dv, ref.dv), tol);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, BlockAttentionGpu, ::testing::Values(at::kBFloat16, at::kFloat),
                         [](const auto& info) {
                           return std::string(info.param == at::kFloat ? "Float" : "BFloat16");
                         });
