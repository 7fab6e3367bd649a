// Context parallelism's pieces: block attention merged through log-sum-exp equals whole causal
// attention (forward and backward), ring attention rank by rank (an in-process thread group,
// both rotate methods) equals attention over the whole sequence, and head-tail chunking gives
// every rank the same causal work.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <mutex>

#include "support/test_support.h"
#include "support/thread_group.h"
#include "titan/ops/attention.h"
#include "titan/parallel/context_parallel.h"

using namespace titan;

namespace {

struct Qkv {
  at::Tensor q, k, v, dout;
};

Qkv random_qkv(int64_t b, int64_t s, int64_t h, int64_t hkv, int64_t hd) {
  at::manual_seed(3);
  return {at::randn({b, s, h, hd}), at::randn({b, s, hkv, hd}), at::randn({b, s, hkv, hd}),
          at::randn({b, s, h, hd})};
}

// Whole causal attention and its gradients (the single-rank kernels).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> whole(const Qkv& x) {
  ops::AttentionSaved saved;
  at::Tensor out = ops::attention_forward(x.q, x.k, x.v, saved).clone();
  auto [dq, dk, dv] = ops::attention_backward(x.dout, saved, x.k.size(2));
  return {out, dq.clone(), dk.clone(), dv.clone()};
}

}  // namespace

TEST(BlockAttention, MergedBlocksEqualWholeCausalAttention) {
  const Qkv x = random_qkv(2, 24, 4, 2, 8);
  auto [out, dq, dk, dv] = whole(x);
  // Queries of positions [16, 24) against keys [0, 8), [8, 16) (full) and [16, 24) (causal).
  const at::Tensor q = x.q.narrow(1, 16, 8);
  at::Tensor o, lse;
  for (int64_t first : {8, 0, 16}) {  // any order
    auto [po, pl] = ops::block_attention_forward(q, x.k.narrow(1, first, 8),
                                                 x.v.narrow(1, first, 8), first == 16);
    ops::merge_attention(o, lse, po, pl);
  }
  EXPECT_LT(test::relative_error(o, out.narrow(1, 16, 8)), 1e-5);
  // Gradients: the blocks' contributions given the merged result.
  at::Tensor gq = at::zeros_like(q), gk = at::zeros_like(x.k), gv = at::zeros_like(x.v);
  for (int64_t first : {0, 8, 16}) {
    auto [a, b, c] =
        ops::block_attention_backward(x.dout.narrow(1, 16, 8), q, x.k.narrow(1, first, 8),
                                      x.v.narrow(1, first, 8), o, lse, first == 16);
    gq.add_(a);
    gk.narrow(1, first, 8).add_(b);
    gv.narrow(1, first, 8).add_(c);
  }
  EXPECT_LT(test::relative_error(gq, dq.narrow(1, 16, 8)), 1e-5);
  // The keys' gradients from these queries alone: whole attention with dout zero elsewhere.
  Qkv only = x;
  only.dout = at::zeros_like(x.dout);
  only.dout.narrow(1, 16, 8).copy_(x.dout.narrow(1, 16, 8));
  auto [o2, dq2, dk2, dv2] = whole(only);
  EXPECT_LT(test::relative_error(gk, dk2), 1e-5);
  EXPECT_LT(test::relative_error(gv, dv2), 1e-5);
}

TEST(ContextParallelAttention, RingAttentionEqualsWholeAttentionOnEveryRank) {
  const Qkv x = random_qkv(2, 32, 4, 2, 8);
  auto [out, dq, dk, dv] = whole(x);
  for (int cp : {2, 4}) {
    for (const char* rotate : {"allgather", "alltoall"}) {
      for (const char* balancer : {"headtail", "none"}) {
        SCOPED_TRACE(std::to_string(cp) + " " + rotate + " " + balancer);
        test::run_thread_group(cp, [&](int, dist::Communicator& comm) {
          parallel::ContextParallel ring(&comm, rotate, balancer);
          ops::AttentionSaved saved;
          const at::Tensor o =
              ring.forward(ring.shard(x.q), ring.shard(x.k), ring.shard(x.v), saved);
          EXPECT_LT(test::relative_error(o, ring.shard(out)), 1e-5);
          auto [gq, gk, gv] = ring.backward(ring.shard(x.dout), saved, x.k.size(2));
          EXPECT_LT(test::relative_error(gq, ring.shard(dq)), 1e-5);
          EXPECT_LT(test::relative_error(gk, ring.shard(dk)), 1e-5);
          EXPECT_LT(test::relative_error(gv, ring.shard(dv)), 1e-5);
        });
      }
    }
  }
}

TEST(ContextParallelAttention, HeadTailChunksGiveEveryRankTheSameCausalWork) {
  const int64_t seq = 4096;
  for (int cp : {2, 4, 8}) {
    SCOPED_TRACE(cp);
    std::mutex mu;
    std::vector<int64_t> balanced, contiguous, positions_seen;
    test::run_thread_group(cp, [&](int r, dist::Communicator& comm) {
      parallel::ContextParallel head_tail(&comm, "allgather", "headtail");
      parallel::ContextParallel plain(&comm, "allgather", "none");
      const at::Tensor pos = head_tail.positions(seq, at::kCPU);
      std::lock_guard<std::mutex> lock(mu);
      balanced.push_back(head_tail.causal_pairs(seq, r));
      contiguous.push_back(plain.causal_pairs(seq, r));
      for (int64_t i = 0; i < pos.numel(); ++i) positions_seen.push_back(pos[i].item<int64_t>());
    });
    // Every position on exactly one rank; the causal pairs add up to the whole triangle.
    std::sort(positions_seen.begin(), positions_seen.end());
    ASSERT_EQ(positions_seen.size(), static_cast<size_t>(seq));
    for (int64_t i = 0; i < seq; ++i) EXPECT_EQ(positions_seen[static_cast<size_t>(i)], i);
    int64_t total = 0;
    for (int64_t w : balanced) {
      EXPECT_EQ(w, balanced.front());
      total += w;
    }
    EXPECT_EQ(total, seq * (seq + 1) / 2);
    // Without balancing, the last rank does 2cp - 1 times the first rank's work.
    const auto [lo, hi] = std::minmax_element(contiguous.begin(), contiguous.end());
    EXPECT_GT(*hi, (2 * cp - 2) * *lo);
  }
}
