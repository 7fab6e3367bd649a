// Activation checkpointing's memory_budget mode: the per-block choice meets the budget at the
// least recompute cost (checked against enumerating every assignment on small cases), spreads
// the policies over the layers, and saves fewer bytes as the budget falls.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "titan/parallel/memory_estimate.h"
#include "titan/parallel/parallelize.h"

using namespace titan;
using model::SavePolicy;

namespace {

size_t index_of(SavePolicy p) {
  return model::save_policy_index(p);
}

}  // namespace

TEST(MemoryBudget, ChoiceIsTheCheapestAssignmentWithinTheBudget) {
  const parallel::PolicyFigures bytes = {10, 6, 3, 1}, cost = {0, 1, 3, 7};
  for (int64_t layers : {1, 3, 5}) {
    for (double budget : {0.0, 0.15, 0.4, 0.55, 0.8, 1.0}) {
      SCOPED_TRACE(std::to_string(layers) + " layers, budget " + std::to_string(budget));
      const auto chosen = parallel::choose_checkpointing(layers, budget, bytes, cost);
      ASSERT_EQ(chosen.size(), static_cast<size_t>(layers));
      double b = 0, t = 0;
      for (auto p : chosen) {
        b += bytes[index_of(p)];
        t += cost[index_of(p)];
      }
      // Every assignment of the 4 policies to the layers, by brute force.
      const double limit = std::max(budget * layers * bytes[0], layers * bytes[3]);
      double best = std::numeric_limits<double>::infinity();
      int64_t total = 1;
      for (int64_t l = 0; l < layers; ++l) total *= 4;
      for (int64_t code = 0; code < total; ++code) {
        double bb = 0, tt = 0;
        for (int64_t l = 0, c = code; l < layers; ++l, c /= 4) {
          bb += bytes[static_cast<size_t>(c % 4)];
          tt += cost[static_cast<size_t>(c % 4)];
        }
        if (bb <= limit + 1e-9) best = std::min(best, tt);
      }
      EXPECT_LE(b, limit + 1e-9);
      EXPECT_DOUBLE_EQ(t, best);
    }
  }
}

TEST(MemoryBudget, SavedBytesFallWithTheBudgetAndTheEndsAreNoneAndFull) {
  const auto args = model::llama_flavor("3B");
  config::ActivationCheckpointSection ac;
  ac.mode = "memory_budget";
  double previous_saved = std::numeric_limits<double>::infinity(), previous_recompute = -1;
  for (double budget = 1.0; budget >= -1e-9; budget -= 0.125) {
    SCOPED_TRACE(budget);
    ac.memory_budget = std::max(0.0, budget);
    const auto policy = parallel::CheckpointPolicy::from_config(ac, args, 4096);
    int64_t saved = 0;
    for (int64_t l = 0; l < args.n_layers; ++l) {
      saved += parallel::saved_bytes_per_token(args, policy.for_layer(l), 2, 1);
    }
    const double all = static_cast<double>(args.n_layers) *
                       parallel::saved_bytes_per_token(args, SavePolicy::All, 2, 1);
    EXPECT_LE(saved, std::max(ac.memory_budget * all,
                              args.n_layers * static_cast<double>(parallel::saved_bytes_per_token(
                                                  args, SavePolicy::InputOnly, 2, 1))) +
                         1);
    EXPECT_LE(saved, previous_saved);
    EXPECT_GE(policy.recompute_fraction, previous_recompute);
    EXPECT_NEAR(policy.saved_fraction, saved / all, 1e-9);
    previous_saved = static_cast<double>(saved);
    previous_recompute = policy.recompute_fraction;
    if (ac.memory_budget == 1.0) {
      for (int64_t l = 0; l < args.n_layers; ++l) EXPECT_EQ(policy.for_layer(l), SavePolicy::All);
    }
    if (ac.memory_budget == 0.0) {
      for (int64_t l = 0; l < args.n_layers; ++l) {
        EXPECT_EQ(policy.for_layer(l), SavePolicy::InputOnly);
      }
    }
  }
  // Half the budget: both halves of the model take part (policies are spread, not stacked).
  ac.memory_budget = 0.5;
  const auto half = parallel::CheckpointPolicy::from_config(ac, args, 4096);
  int64_t kept_first = 0, kept_second = 0;
  for (int64_t l = 0; l < args.n_layers; ++l) {
    const bool kept = half.for_layer(l) != SavePolicy::InputOnly;
    (l < args.n_layers / 2 ? kept_first : kept_second) += kept;
  }
  EXPECT_LE(std::abs(kept_first - kept_second), 1);
  EXPECT_NE(half.describe().find("memory budget 0.50"), std::string::npos) << half.describe();
}

// Recomputing only the feed-forward's input projection (Attention) is chosen where it frees
// memory more cheaply than recomputing whole blocks: with the FLOP/byte model, some 3B block
// takes it at a budget between op-only and full.
TEST(MemoryBudget, AttentionPolicyFillsTheGapBetweenOpAndFull) {
  const auto args = model::llama_flavor("3B");
  config::ActivationCheckpointSection ac;
  ac.mode = "memory_budget";
  ac.memory_budget = 0.3;
  const auto policy = parallel::CheckpointPolicy::from_config(ac, args, 4096);
  int64_t attention = 0;
  for (int64_t l = 0; l < args.n_layers; ++l)
    attention += policy.for_layer(l) == SavePolicy::Attention;
  EXPECT_GT(attention, 0) << policy.describe();
  EXPECT_LE(policy.saved_fraction, 0.3 + 1e-12);
  // Its saved bytes: the Matmuls policy's without the w1|w3 output.
  const int64_t ffn = args.ffn_hidden_dim();
  EXPECT_EQ(parallel::saved_bytes_per_token(args, SavePolicy::Matmuls, 2, 1) -
                parallel::saved_bytes_per_token(args, SavePolicy::Attention, 2, 1),
            2 * ffn * 2);
}

// Measured recompute costs (as a GPU run times them at start-up) re-choose the blocks: when
// recomputing norms/RoPE/SwiGLU is nearly free, blocks keep their matmul outputs; when it costs
// as much as recomputing the whole block, keeping the matmul outputs buys nothing, so no block
// does. Either way the budget holds.
TEST(MemoryBudget, MeasuredCostsReChooseWithinTheSameBudget) {
  const auto args = model::llama_flavor("3B");
  config::ActivationCheckpointSection ac;
  ac.mode = "memory_budget";
  ac.memory_budget = 0.4;
  auto count = [&](const parallel::CheckpointPolicy& p, SavePolicy kind) {
    int64_t n = 0;
    for (int64_t l = 0; l < args.n_layers; ++l) n += p.for_layer(l) == kind;
    return n;
  };
  auto cheap_ops = parallel::CheckpointPolicy::from_config(ac, args, 4096);
  cheap_ops.set_measured_costs(/*ops_s=*/0.0001, /*attention_s=*/0.010, /*full_s=*/0.010,
                               /*forward_s=*/0.010);
  auto costly_ops = parallel::CheckpointPolicy::from_config(ac, args, 4096);
  costly_ops.set_measured_costs(/*ops_s=*/0.010, /*attention_s=*/0.010, /*full_s=*/0.010,
                                /*forward_s=*/0.010);
  EXPECT_GT(count(cheap_ops, SavePolicy::Matmuls), 0);
  EXPECT_EQ(count(costly_ops, SavePolicy::Matmuls), 0);
  EXPECT_EQ(count(costly_ops, SavePolicy::Attention), 0);
  for (const auto* p : {&cheap_ops, &costly_ops}) {
    EXPECT_LE(p->saved_fraction, 0.4 + 1e-12);
    EXPECT_NE(p->describe().find("recompute times measured on this device"), std::string::npos)
        << p->describe();
  }
  // Recompute: InputOnly blocks x full + Matmuls blocks x ops, over the blocks' forward.
  const double expected = (count(costly_ops, SavePolicy::InputOnly) * 0.010) /
                          (static_cast<double>(args.n_layers) * 0.010);
  EXPECT_NEAR(costly_ops.recompute_fraction, expected, 1e-12);
}
