// TeraPipe's attention on the GPU: token slices of unequal length, each attending causally to
// itself and to the keys/values cached from the earlier slices (flash kernels in bf16, exact
// math in fp32), with the backward run slice by slice in reverse, against whole causal
// attention computed in fp32 with autograd.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "support/test_support.h"

using namespace titan;
using test::relative_error;

namespace {

class TokenSliceAttentionGpu : public ::testing::TestWithParam<at::ScalarType> {};

}  // namespace

TEST_P(TokenSliceAttentionGpu, SlicesMatchWholeAttentionForwardAndBackward) {
  const auto dt = GetParam();
  const int64_t b = 2, s = 1024, h = 8, kv = 2, hd = 64;
  const std::vector<int64_t> lengths = {384, 256, 128, 256};
  const auto opts = test::cuda_options(dt);
  const at::Tensor q = at::randn({b, s, h, hd}, opts), k = at::randn({b, s, kv, hd}, opts);
  const at::Tensor v = at::randn({b, s, kv, hd}, opts), dout = at::randn({b, s, h, hd}, opts);
  const auto want = test::causal_attention_reference(q, k, v, dout);
  const auto got = test::sliced_attention(q, k, v, dout, lengths);
  const double tol = 2 * test::kernel_tolerance(dt);
  EXPECT_LT(relative_error(got.out, want.out), tol);
  EXPECT_LT(relative_error(got.dq, want.dq), tol);
  EXPECT_LT(relative_error(got.dk, want.dk), tol);
  EXPECT_LT(relative_error(got.dv, want.dv), tol);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, TokenSliceAttentionGpu,
                         ::testing::Values(at::kBFloat16, at::kFloat), [](const auto& info) {
                           return std::string(info.param == at::kFloat ? "Float" : "BFloat16");
                         });
