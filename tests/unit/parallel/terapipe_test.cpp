// TeraPipe's pieces: attention of token slices against the cached keys/values equals whole
// causal attention (forward, and the backward run slice by slice in reverse); the dynamic
// program returns the optimum that enumerating every slicing finds; the cost model fit recovers
// its coefficients; TeraPipe schedules are well-formed and the checker rejects slices out of
// order; the simulated bubble of pp 4 with one 8,192-token microbatch, 1F1B against TeraPipe;
// and the errors of parallelism.pipeline_parallel_token_slices.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <random>

#include "support/test_support.h"
#include "titan/model/llama_args.h"
#include "titan/ops/attention.h"
#include "titan/parallel/pipeline/schedule.h"
#include "titan/parallel/pipeline/terapipe.h"

using namespace titan;
using namespace titan::parallel::pipeline;
using titan::test::error_of;

TEST(TokenSliceAttention, SlicesAttendingToTheirPrefixEqualWholeCausalAttention) {
  at::manual_seed(5);
  const int64_t b = 2, seq = 56, h = 4, hkv = 2, hd = 8;
  const at::Tensor q = at::randn({b, seq, h, hd}), k = at::randn({b, seq, hkv, hd}),
                   v = at::randn({b, seq, hkv, hd}), dout = at::randn({b, seq, h, hd});
  // Whole sequences through titan's own causal attention kernels.
  ops::AttentionSaved whole_saved;
  const at::Tensor whole = ops::attention_forward(q, k, v, whole_saved).clone();
  auto [wq, wk, wv] = ops::attention_backward(dout, whole_saved, hkv);
  // ... which equal the textbook computation (softmax of masked scores, autograd).
  const auto textbook = test::causal_attention_reference(q, k, v, dout);
  EXPECT_LT(test::relative_error(whole, textbook.out), 1e-6);
  EXPECT_LT(test::relative_error(wk, textbook.dk), 1e-6);
  for (const std::vector<int64_t>& lengths :
       std::vector<std::vector<int64_t>>{{56}, {16, 40}, {24, 16, 16}, {8, 8, 8, 32}}) {
    SCOPED_TRACE(testing::PrintToString(lengths));
    const auto got = test::sliced_attention(q, k, v, dout, lengths);
    EXPECT_LT(test::relative_error(got.out, whole), 1e-6);
    EXPECT_LT(test::relative_error(got.dq, wq), 1e-6);
    EXPECT_LT(test::relative_error(got.dk, wk), 1e-6);
    EXPECT_LT(test::relative_error(got.dv, wv), 1e-6);
  }
}

namespace {

// The best slicing by enumerating every composition of n quanta.
double brute_force(int64_t n, int64_t quantum, int stages, int microbatches,
                   const std::function<double(int64_t, int64_t)>& cost) {
  double best = std::numeric_limits<double>::infinity();
  for (uint32_t cuts = 0; cuts < (1u << (n - 1)); ++cuts) {
    std::vector<int64_t> lengths;
    int64_t len = 1;
    for (int64_t i = 1; i < n; ++i) {
      if (cuts & (1u << (i - 1))) {
        lengths.push_back(len * quantum);
        len = 0;
      }
      ++len;
    }
    lengths.push_back(len * quantum);
    best = std::min(best, evaluate_slicing(lengths, stages, microbatches, cost).step_s);
  }
  return best;
}

}  // namespace

TEST(TokenSlicing, DynamicProgramFindsTheOptimumOfEverySlicing) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  int cases = 0;
  for (int64_t n : {1, 2, 5, 8, 11}) {
    for (int stages : {1, 2, 4, 8}) {
      for (int microbatches : {1, 3}) {
        // Random models of the TeraPipe form, and arbitrary (non-smooth) positive costs.
        SliceCostModel m{u(rng) * 3, u(rng), u(rng) * 0.05};
        std::vector<double> table(static_cast<size_t>(n * (n + 1)));
        for (auto& t : table) t = 0.1 + u(rng);
        const int64_t q = 16;
        const std::function<double(int64_t, int64_t)> costs[] = {
            [&](int64_t len, int64_t prefix) { return m.time_s(len, prefix); },
            [&](int64_t len, int64_t prefix) {
              return table[static_cast<size_t>((prefix / q) * (n + 1) + len / q)];
            }};
        for (const auto& cost : costs) {
          const TokenSlicing dp = optimal_token_slices(n * q, q, stages, microbatches, cost);
          int64_t sum = 0;
          for (int64_t l : dp.lengths) sum += l;
          EXPECT_EQ(sum, n * q);
          EXPECT_NEAR(dp.step_s, brute_force(n, q, stages, microbatches, cost), 1e-12)
              << "n " << n << " stages " << stages << " microbatches " << microbatches;
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 5 * 4 * 2 * 2);
}

TEST(TokenSlicing, CostModelFitRecoversItsCoefficients) {
  const SliceCostModel truth{2e-4, 3e-6, 4e-9};
  std::vector<int64_t> lens, prefixes;
  std::vector<double> secs;
  for (int64_t len : {128, 256, 512, 1024, 2048, 4096}) {
    for (int64_t prefix : {int64_t{0}, 4096 - len}) {
      lens.push_back(len);
      prefixes.push_back(prefix);
      secs.push_back(truth.time_s(len, prefix));
    }
  }
  const SliceCostModel fit = SliceCostModel::fit(lens, prefixes, secs);
  EXPECT_NEAR(fit.fixed_s, truth.fixed_s, 1e-6 * truth.fixed_s);
  EXPECT_NEAR(fit.per_token_s, truth.per_token_s, 1e-6 * truth.per_token_s);
  EXPECT_NEAR(fit.per_pair_s, truth.per_pair_s, 1e-6 * truth.per_pair_s);
  // Timings where a negative fixed cost would fit best still give a non-negative model.
  for (auto& s : secs) s -= 5e-4;
  for (auto& s : secs) s = std::max(s, 1e-5);
  const SliceCostModel clipped = SliceCostModel::fit(lens, prefixes, secs);
  EXPECT_GE(clipped.fixed_s, 0);
  EXPECT_GE(clipped.per_token_s, 0);
  EXPECT_GE(clipped.per_pair_s, 0);
}

TEST(TeraPipeSchedule, WellFormedAndTheCheckerRejectsSlicesOutOfOrder) {
  for (int pp : {2, 3, 4}) {
    for (int m : {1, 2, 3}) {
      for (const std::vector<int64_t>& slices :
           std::vector<std::vector<int64_t>>{{}, {64}, {32, 32}, {16, 16, 32}, {16, 16, 16, 16}}) {
        const Schedule s = build_schedule(ScheduleKind::TeraPipe, pp, pp, m, slices);
        EXPECT_EQ(s.microbatches, m * std::max<int>(1, static_cast<int>(slices.size())));
        EXPECT_EQ(error_of([&] { check_schedule(s); }), "") << pp << " " << m;
      }
    }
  }
  // Slices forward out of order: slice 1 before slice 0 on the first stage.
  Schedule bad = build_schedule(ScheduleKind::TeraPipe, 2, 2, 1, {16, 16});
  Schedule fwd = bad;
  auto& r0 = fwd.actions[0];
  std::swap(r0[0], r0[2]);  // 0F0, 0SEND_F0, 0F1 -> 0F1 first
  EXPECT_NE(error_of([&] { check_schedule(fwd); }).find("before the forward of the token slice"),
            std::string::npos)
      << error_of([&] { check_schedule(fwd); });
  // Backward in forward order: slice 0 before slice 1 on the last stage.
  Schedule bwd = build_schedule(ScheduleKind::GPipe, 2, 2, 2);
  bwd.slices = 2;
  bwd.slice_lengths = {16, 16};
  EXPECT_NE(error_of([&] { check_schedule(bwd); }).find("before the backward of the token slice"),
            std::string::npos)
      << error_of([&] { check_schedule(bwd); });
}

TEST(TeraPipeSchedule, BubbleOfOneLongSequenceOnFourStages) {
  // pp 4, one microbatch of 8,192 tokens, llama3 8B blocks at 400 TFLOP/s, 50 us per slice.
  const auto model = SliceCostModel::from_flops(model::llama_flavor("8B"), 1, 400e12, 50e-6);
  const auto cost = [&](int64_t len, int64_t prefix) { return model.time_s(len, prefix); };
  const int64_t seq = 8192;
  auto idle = [&](ScheduleKind kind, const std::vector<int64_t>& slices) {
    const Schedule s = build_schedule(
        kind, 4, 4, 1, kind == ScheduleKind::TeraPipe ? slices : std::vector<int64_t>{});
    ActionCosts c;
    c.forward = c.backward_input = c.backward_weight = 1.0 / 3;
    int64_t prefix = 0;
    for (int64_t len : slices) {
      c.microbatch_scale.push_back(cost(len, prefix));
      prefix += len;
    }
    return simulate(s, c).step_idle;
  };
  const double one_f_one_b = idle(ScheduleKind::OneFOneB, {seq});
  const TokenSlicing best = optimal_token_slices(seq, token_slice_quantum(seq, 1), 4, 1, cost);
  const double terapipe = idle(ScheduleKind::TeraPipe, best.lengths);
  std::cout << "pp 4, one microbatch of 8192 tokens (8B blocks): 1F1B idle " << 100 * one_f_one_b
            << "%, TeraPipe with " << best.lengths.size() << " slices idle " << 100 * terapipe
            << "%\n";
  EXPECT_NEAR(one_f_one_b, 0.75, 1e-9);
  EXPECT_LT(terapipe, 0.15);
  // Later slices attend to more keys, so the chosen slices shrink along the sequence.
  EXPECT_GE(best.lengths.front(), best.lengths.back());
  // The step time the simulator measures is what the dynamic program predicts.
  const Schedule s = build_schedule(ScheduleKind::TeraPipe, 4, 4, 1, best.lengths);
  ActionCosts c;
  c.forward = c.backward_input = c.backward_weight = 1.0 / 3;
  int64_t prefix = 0;
  for (int64_t len : best.lengths) {
    c.microbatch_scale.push_back(cost(len, prefix));
    prefix += len;
  }
  const double makespan = simulate(s, c).makespan;
  EXPECT_LE(makespan, best.step_s * (1 + 1e-9));
  EXPECT_GE(makespan, best.sum_s);
}

TEST(TokenSlicing, TokenSliceErrorsNameTheKey) {
  EXPECT_EQ(parse_token_slices({"auto"}, 64, 1), std::vector<int64_t>{});
  EXPECT_EQ(parse_token_slices({"16", "48"}, 64, 1), (std::vector<int64_t>{16, 48}));
  EXPECT_NE(error_of([] {
              parse_token_slices({"16", "32"}, 64, 1);
            })
                .find("parallelism.pipeline_parallel_token_slices: the slices [16, 32] sum to 48 "
                      "tokens, but training.seq_len is 64"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              parse_token_slices({"8", "56"}, 64, 1);
            }).find("slice of 8 tokens is shorter than 16"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              parse_token_slices({"18", "46"}, 64, 4);
            }).find("not divisible by parallelism.tensor_parallel_degree (4)"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              parse_token_slices({"half"}, 64, 1);
            }).find("expected \"auto\" or a list of positive slice lengths"),
            std::string::npos);
  EXPECT_EQ(token_slice_quantum(8192, 1), 128);
  EXPECT_EQ(token_slice_quantum(64, 1), 16);
  EXPECT_EQ(token_slice_quantum(96, 3), 48);
  EXPECT_NE(error_of([] { token_slice_quantum(40, 1); }).find("training.seq_len (40)"),
            std::string::npos);
}
