// Tensor-parallel building blocks, rank by rank in one process (an in-process thread group):
// the gather/matmul and matmul/reduce-scatter pairs (plain and async ring) equal the whole
// products (fp64), the vocabulary-parallel embedding and the loss-parallel (or gathered-logits)
// head equal the whole model's (fp32, as the head computes its statistics).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <mutex>

#include "support/test_support.h"
#include "support/thread_group.h"
#include "titan/ops/cross_entropy.h"
#include "titan/parallel/tensor_parallel.h"

using namespace titan;

namespace {

struct Case {
  int tp;
  bool async;
  bool loss_parallel;
};

std::string name_of(const Case& c) {
  return "tp " + std::to_string(c.tp) + (c.async ? " async" : "") +
         (c.loss_parallel ? " loss-parallel" : " gathered logits");
}

}  // namespace

TEST(TensorParallelOps, GatherMatmulAndMatmulScatterEqualTheWholeProducts) {
  at::manual_seed(1);
  const int64_t n = 6, k = 10, m = 12;  // per-rank token rows, in and out features
  for (const Case c :
       {Case{2, false, true}, Case{2, true, true}, Case{4, true, true}, Case{3, true, true}}) {
    SCOPED_TRACE(name_of(c));
    const at::Tensor x = at::randn({c.tp * n, k}, at::kDouble);  // every rank's token shards
    const at::Tensor b = at::randn({k, m}, at::kDouble);
    // Per rank: different partial inputs to the reduce-scatter.
    const at::Tensor partial = at::randn({c.tp, c.tp * n, k}, at::kDouble);
    const at::Tensor summed = at::einsum("rnk,km->nm", {partial, b});
    test::run_thread_group(c.tp, [&](int r, dist::Communicator& comm) {
      parallel::TensorParallel tp(&comm, {c.async, c.loss_parallel});
      at::Tensor gathered;
      const at::Tensor y = tp.gather_matmul(x.narrow(0, r * n, n), b, &gathered);
      EXPECT_LT(test::relative_error(y, at::mm(x, b)), 1e-12);
      EXPECT_TRUE(at::equal(gathered, x));
      const at::Tensor z = tp.matmul_scatter(partial[r], b);
      EXPECT_LT(test::relative_error(z, summed.narrow(0, r * n, n)), 1e-12);
    });
  }
}

TEST(TensorParallelOps, VocabularyParallelEmbeddingAndLossParallelHeadEqualTheWholeModel) {
  at::manual_seed(2);
  const int64_t vocab = 24, dim = 8, batch = 2, seq = 8;
  const at::Tensor table = at::randn({vocab, dim}, at::kFloat);
  const at::Tensor out_w = at::randn({vocab, dim}, at::kFloat) * 0.5;
  const at::Tensor norm_w = 1 + 0.1 * at::randn({dim}, at::kFloat);
  const at::Tensor tokens = at::randint(0, vocab, {batch, seq}, at::kLong);
  const at::Tensor targets = at::randint(0, vocab, {batch * seq}, at::kLong);
  const at::Tensor h = at::randn({batch * seq, dim}, at::kFloat);
  const at::Tensor dh_embed = at::randn({batch * seq, dim}, at::kFloat);
  const double scale = 1.0 / static_cast<double>(batch * seq);
  // The whole model on one rank.
  const at::Tensor embedded = at::embedding(table, tokens).view({batch * seq, dim});
  const at::Tensor table_grad = at::zeros_like(table).index_add_(0, tokens.view({-1}), dh_embed);
  at::Tensor norm_grad = at::zeros_like(norm_w), out_grad = at::zeros_like(out_w);
  const ops::HeadResult whole = ops::head_forward_backward(h, norm_w, out_w, targets, 1e-5, scale,
                                                           &norm_grad, &out_grad, true, true);
  for (const Case c :
       {Case{2, false, true}, Case{2, false, false}, Case{4, true, true}, Case{4, false, false}}) {
    SCOPED_TRACE(name_of(c));
    const int64_t rows = vocab / c.tp, tokens_per_rank = batch * seq / c.tp;
    std::mutex mu;
    at::Tensor norm_grad_sum = at::zeros_like(norm_w);
    test::run_thread_group(c.tp, [&](int r, dist::Communicator& comm) {
      parallel::TensorParallel tp(&comm, {c.async, c.loss_parallel});
      const int64_t begin = r * rows, first = r * tokens_per_rank;
      // Embedding: this rank's token shard of the lookup, its rows of the table's gradient.
      const at::Tensor shard =
          tp.embedding_forward(table.narrow(0, begin, rows), begin, tokens, at::kFloat);
      EXPECT_LT(test::relative_error(shard.reshape({-1, dim}),
                                     embedded.narrow(0, first, tokens_per_rank)),
                1e-6);
      at::Tensor grad_rows = at::zeros({rows, dim}, at::kFloat);
      tp.embedding_backward(dh_embed.narrow(0, first, tokens_per_rank).view({batch, -1, dim}),
                            tokens, begin, grad_rows, false);
      EXPECT_LT(test::relative_error(grad_rows, table_grad.narrow(0, begin, rows)), 1e-6);
      // Head: loss over every token, this shard's gradients.
      at::Tensor ng = at::zeros_like(norm_w), og = at::zeros({rows, dim}, at::kFloat);
      const ops::HeadResult part = tp.head_forward_backward(
          h.narrow(0, first, tokens_per_rank), norm_w, out_w.narrow(0, begin, rows), begin, vocab,
          targets, 1e-5, scale, &ng, &og, true, true);
      EXPECT_NEAR(part.loss_sum.item<double>(), whole.loss_sum.item<double>(),
                  1e-6 * whole.loss_sum.item<double>());
      EXPECT_LT(test::relative_error(part.dh, whole.dh.narrow(0, first, tokens_per_rank)), 1e-5);
      EXPECT_LT(test::relative_error(og, out_grad.narrow(0, begin, rows)), 1e-5);
      std::lock_guard<std::mutex> lock(mu);
      norm_grad_sum.add_(ng);  // sequence parallel: each rank's tokens' part of the gradient
    });
    EXPECT_LT(test::relative_error(norm_grad_sum, norm_grad), 1e-5);
  }
}
