// TeraPipe's attention on the GPU: token slices of unequal length, each attending causally to
// itself and to the keys/values cached from the earlier slices (flash kernels in bf16, exact
// math in fp32), with the backward run slice by slice in reverse, against whole causal
// attention computed in fp32 with autograd.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "support/test_support.h"
#include "titan/parallel/pipeline/terapipe.h"

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
  at::Tensor qf = q.to(at::kFloat).transpose(1, 2).set_requires_grad(true);
  at::Tensor kf = k.to(at::kFloat).transpose(1, 2).set_requires_grad(true);
  at::Tensor vf = v.to(at::kFloat).transpose(1, 2).set_requires_grad(true);
  at::Tensor scores = at::matmul(qf, kf.repeat_interleave(h / kv, 1).transpose(-1, -2)) /
                      std::sqrt(static_cast<double>(hd));
  scores = scores.masked_fill(at::ones({s, s}, test::cuda_options(at::kBool)).triu(1), -INFINITY);
  at::Tensor ref =
      at::matmul(at::softmax(scores, -1), vf.repeat_interleave(h / kv, 1)).transpose(1, 2);
  ref.backward(dout.to(at::kFloat));
  const double tol = 2 * test::kernel_tolerance(dt);

  parallel::pipeline::SliceKv cache;
  parallel::pipeline::TokenSliceAttention attention;
  std::vector<ops::AttentionSaved> saved(lengths.size());
  std::vector<int64_t> start;
  int64_t at = 0;
  for (size_t j = 0; j < lengths.size(); ++j) {
    start.push_back(at);
    attention.use(&cache, at, s);
    const at::Tensor out =
        attention.forward(q.narrow(1, at, lengths[j]), k.narrow(1, at, lengths[j]),
                          v.narrow(1, at, lengths[j]), saved[j]);
    EXPECT_LT(relative_error(out, ref.narrow(1, at, lengths[j]).detach()), tol) << "slice " << j;
    at += lengths[j];
  }
  at::Tensor dq = at::empty({b, s, h, hd}, opts), dk = at::empty({b, s, kv, hd}, opts);
  at::Tensor dv = at::empty_like(dk);
  for (size_t j = lengths.size(); j-- > 0;) {
    attention.use(&cache, start[j], s);
    auto [gq, gk, gv] = attention.backward(dout.narrow(1, start[j], lengths[j]), saved[j], kv);
    dq.narrow(1, start[j], lengths[j]).copy_(gq);
    dk.narrow(1, start[j], lengths[j]).copy_(gk);
    dv.narrow(1, start[j], lengths[j]).copy_(gv);
  }
  EXPECT_LT(relative_error(dq, qf.grad().transpose(1, 2)), tol);
  EXPECT_LT(relative_error(dk, kf.grad().transpose(1, 2)), tol);
  EXPECT_LT(relative_error(dv, vf.grad().transpose(1, 2)), tol);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, TokenSliceAttentionGpu,
                         ::testing::Values(at::kBFloat16, at::kFloat), [](const auto& info) {
                           return std::string(info.param == at::kFloat ? "Float" : "BFloat16");
                         });
