// The warmup-stable-decay learning-rate schedule (torchtitan v0.2.2's values) and the three
// AdamW implementations (fused, foreach, for-loop) giving the same update as the textbook one.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "support/test_support.h"
#include "titan/train/lr_scheduler.h"
#include "titan/train/optimizer.h"

using titan::train::LrScheduler;
using titan::train::Optimizer;
using titan::train::OptimizerOptions;

TEST(LrScheduler, LinearWarmupStableThenDecayToMinimum) {
  // 100 steps, 10 warm-up, last 20% decaying linearly towards 0.1 x peak. The values are
  // torchtitan v0.2.2's LambdaLR factors (its step s, 0-based, is our step - 1).
  LrScheduler s(1.0, 10, 100, 0.2, "linear", 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(1), 0.1);  // warm-up: (s + 1) / warmup
  EXPECT_DOUBLE_EQ(s.lr_at(9), 0.9);
  EXPECT_DOUBLE_EQ(s.lr_at(10), 1.0);  // the peak on the last warm-up step
  EXPECT_DOUBLE_EQ(s.lr_at(11), 1.0);
  // Stable through step 81: 71 stable steps, one of them torchtitan's virtual last step.
  EXPECT_DOUBLE_EQ(s.lr_at(81), 1.0);
  EXPECT_NEAR(s.lr_at(82), 0.1 + 0.9 * (1 - 1.0 / 20), 1e-12);
  EXPECT_NEAR(s.lr_at(90), 0.1 + 0.9 * (1 - 9.0 / 20), 1e-12);
  EXPECT_NEAR(s.lr_at(100), 0.1 + 0.9 * (1 - 19.0 / 20), 1e-12);  // above the floor: 0.145
}

TEST(LrScheduler, ShortRunsAndTheDecayWindowClippedToTheSteps) {
  // torchtitan v0.2.2 with its debug job's warmup 2 and decay_ratio 0.8 over 10 and 3 steps.
  LrScheduler ten(8e-4, 2, 10, 0.8, "linear", 0.0);
  const double want[] = {4e-4, 8e-4, 8e-4, 7e-4, 6e-4, 5e-4, 4e-4, 3e-4, 2e-4, 1e-4};
  for (int step = 1; step <= 10; ++step) EXPECT_NEAR(ten.lr_at(step), want[step - 1], 1e-15);
  LrScheduler three(8e-4, 2, 3, 0.8, "linear", 0.0);  // decay 2 shortened to 1
  EXPECT_EQ(three.decay_steps(), 1);
  EXPECT_NEAR(three.lr_at(1), 4e-4, 1e-15);
  EXPECT_NEAR(three.lr_at(2), 8e-4, 1e-15);
  EXPECT_NEAR(three.lr_at(3), 8e-4, 1e-15);
}

TEST(LrScheduler, SqrtAndCosineShapesAndDefaultDecayWindow) {
  // No warm-up: step 1 at the peak (the virtual stable step), then 10 decay steps of which
  // the run takes 9.
  LrScheduler sq(2.0, 0, 10, std::nullopt, "sqrt", 0.0);
  EXPECT_DOUBLE_EQ(sq.lr_at(1), 2.0);
  EXPECT_NEAR(sq.lr_at(2), 2.0 * (1 - std::sqrt(0.1)), 1e-12);
  EXPECT_NEAR(sq.lr_at(10), 2.0 * (1 - std::sqrt(0.9)), 1e-12);
  LrScheduler cos(1.0, 0, 10, std::nullopt, "cosine", 0.0);
  EXPECT_NEAR(cos.lr_at(6), 0.5, 1e-12);
  EXPECT_NEAR(cos.lr_at(10), 0.5 * (1 + std::cos(M_PI * 0.9)), 1e-12);
  EXPECT_EQ(cos.decay_steps(), 10);
}

TEST(Optimizer, FusedForeachAndLoopGiveTheTextbookAdamWUpdate) {
  at::manual_seed(3);
  std::vector<at::Tensor> p0 = {at::randn({257}), at::randn({64})};
  std::vector<std::vector<at::Tensor>> grads = {{at::randn({257}), at::randn({64})},
                                                {at::randn({257}), at::randn({64})}};
  const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  // Reference: two steps of decoupled AdamW by hand, the second with a clip divisor of 2.
  std::vector<at::Tensor> ref;
  for (size_t i = 0; i < p0.size(); ++i) {
    at::Tensor p = p0[i].clone(), m = at::zeros_like(p), v = at::zeros_like(p);
    for (int t = 1; t <= 2; ++t) {
      at::Tensor g = grads[static_cast<size_t>(t - 1)][i] / (t == 2 ? 2.0 : 1.0);
      m = b1 * m + (1 - b1) * g;
      v = b2 * v + (1 - b2) * g * g;
      p = p * (1 - lr * wd) -
          (lr / (1 - std::pow(b1, t))) * m / (v.sqrt() / std::sqrt(1 - std::pow(b2, t)) + eps);
    }
    ref.push_back(p);
  }
  for (const char* impl : {"fused", "foreach", "for-loop"}) {
    std::vector<at::Tensor> params, g;
    for (const auto& p : p0) {
      params.push_back(p.clone());
      g.push_back(at::empty_like(p));
    }
    OptimizerOptions o;
    o.implementation = impl;
    o.beta1 = b1;
    o.beta2 = b2;
    o.eps = eps;
    o.weight_decay = wd;
    Optimizer opt(params, g, o);
    for (int t = 0; t < 2; ++t) {
      for (size_t i = 0; i < g.size(); ++i) g[i].copy_(grads[static_cast<size_t>(t)][i]);
      opt.step(lr, t == 1 ? at::full({}, 2.0) : at::Tensor());
    }
    EXPECT_EQ(opt.step_count(), 2);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_LT(titan::test::relative_error(params[i], ref[i]), 1e-6) << impl << " " << i;
    }
  }
}
