// Tensor parallelism's single-GPU pieces: the vocabulary-shard cross-entropy kernels against
// ATen, and the async-TP ring (chunked matmuls, partial sums accumulated as they arrive) and the
// loss-parallel head run rank by rank on one GPU (an in-process thread group) against the whole
// computation, in bf16 and fp32.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "support/test_support.h"
#include "support/thread_group.h"
#include "titan/kernels/kernels.h"
#include "titan/ops/cross_entropy.h"
#include "titan/ops/dispatch.h"
#include "titan/parallel/tensor_parallel.h"

using namespace titan;
using test::relative_error;

namespace {

// A little looser than a single kernel's: bf16 results cross several roundings.
double tol(at::ScalarType t) {
  return 2 * test::kernel_tolerance(t);
}

class TpGpuTest : public ::testing::TestWithParam<at::ScalarType> {};

}  // namespace

TEST_P(TpGpuTest, VocabularyShardCrossEntropyKernelsMatchAten) {
  const auto dt = GetParam();
  const int64_t rows = 300, vocab = 4096, shards = 4, cols = vocab / shards;
  const at::Tensor logits = (3 * at::randn({rows, vocab}, test::cuda_options(at::kFloat))).to(dt);
  const at::Tensor tgt = at::randint(0, vocab, {rows}, test::cuda_options(at::kLong));
  const at::Tensor lf = logits.to(at::kFloat);
  const at::Tensor lse = at::logsumexp(lf, 1);
  const double scale = 0.37;
  at::Tensor ref_grad = at::softmax(lf, 1);
  ref_grad.scatter_add_(1, tgt.unsqueeze(1), at::full({rows, 1}, -1.0, ref_grad.options()));
  ref_grad.mul_(scale);
  for (int64_t s = 0; s < shards; ++s) {
    SCOPED_TRACE(s);
    const int64_t begin = s * cols;
    at::Tensor shard = logits.narrow(1, begin, cols).contiguous();
    const at::Tensor stats = kernels::cross_entropy_shard_stats(shard, tgt, begin);
    const at::Tensor sf = shard.to(at::kFloat);
    const at::Tensor m = std::get<0>(sf.max(1));
    EXPECT_TRUE(at::equal(stats.select(1, 0), m));
    EXPECT_LT(relative_error(stats.select(1, 1), (sf - m.unsqueeze(1)).exp().sum(1)), 1e-5);
    const at::Tensor local = tgt - begin;
    const at::Tensor mine = at::logical_and(local.ge(0), local.lt(cols));
    const at::Tensor picked =
        at::where(mine, sf.gather(1, local.clamp(0, cols - 1).unsqueeze(1)).squeeze(1), 0.0);
    EXPECT_TRUE(at::equal(stats.select(1, 2), picked));
    kernels::cross_entropy_shard_grad(shard, tgt, lse, begin, scale);
    EXPECT_LT(relative_error(shard.to(at::kFloat), ref_grad.narrow(1, begin, cols)), tol(dt));
  }
}

TEST_P(TpGpuTest, AsyncRingAndLossParallelHeadMatchTheWholeComputation) {
  const auto dt = GetParam();
  ops::set_fused_kernels(true);
  const int tp = 2;
  const int64_t n = 256, k = 512, m = 384, vocab = 2048, dim = 256;
  const at::Tensor x = at::randn({tp * n, k}, test::cuda_options(dt));
  const at::Tensor b = (0.05 * at::randn({k, m}, test::cuda_options(at::kFloat))).to(dt);
  const at::Tensor partial = at::randn({tp, tp * n, k}, test::cuda_options(dt));
  const at::Tensor whole_mm = at::mm(x.to(at::kFloat), b.to(at::kFloat));
  const at::Tensor summed = at::einsum("rnk,km->nm", {partial.to(at::kFloat), b.to(at::kFloat)});
  const at::Tensor h = at::randn({tp * n, dim}, test::cuda_options(dt));
  const at::Tensor norm_w = at::ones({dim}, test::cuda_options(dt));
  const at::Tensor out_w = (0.05 * at::randn({vocab, dim}, test::cuda_options(at::kFloat))).to(dt);
  const at::Tensor targets = at::randint(0, vocab, {tp * n}, test::cuda_options(at::kLong));
  const double scale = 1.0 / static_cast<double>(tp * n);
  at::Tensor norm_grad = at::zeros({dim}, test::cuda_options(at::kFloat));
  at::Tensor out_grad = at::zeros({vocab, dim}, test::cuda_options(at::kFloat));
  const ops::HeadResult whole = ops::head_forward_backward(h, norm_w, out_w, targets, 1e-5, scale,
                                                           &norm_grad, &out_grad, true, true);
  for (bool loss_parallel : {true, false}) {
    SCOPED_TRACE(loss_parallel ? "loss parallel" : "gathered logits");
    test::run_thread_group(tp, [&](int r, dist::Communicator& comm) {
      parallel::TensorParallel t(&comm, {/*async=*/true, loss_parallel});
      const at::Tensor y = t.gather_matmul(x.narrow(0, r * n, n), b, nullptr);
      EXPECT_LT(relative_error(y.to(at::kFloat), whole_mm), tol(dt));
      const at::Tensor z = t.matmul_scatter(partial[r], b);
      EXPECT_LT(relative_error(z.to(at::kFloat), summed.narrow(0, r * n, n)), tol(dt));
      const int64_t rows = vocab / tp;
      at::Tensor ng = at::zeros({dim}, test::cuda_options(at::kFloat));
      at::Tensor og = at::zeros({rows, dim}, test::cuda_options(at::kFloat));
      const ops::HeadResult part =
          t.head_forward_backward(h.narrow(0, r * n, n), norm_w, out_w.narrow(0, r * rows, rows),
                                  r * rows, vocab, targets, 1e-5, scale, &ng, &og, true, true);
      EXPECT_LT(relative_error(part.loss_sum, whole.loss_sum), 1e-4);
      EXPECT_LT(relative_error(part.dh.to(at::kFloat), whole.dh.narrow(0, r * n, n).to(at::kFloat)),
                tol(dt));
      EXPECT_LT(relative_error(og, out_grad.narrow(0, r * rows, rows)), tol(dt));
    });
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, TpGpuTest, ::testing::Values(at::kBFloat16, at::kFloat),
                         [](const auto& info) {
                           return std::string(info.param == at::kFloat ? "Float" : "BFloat16");
                         });
