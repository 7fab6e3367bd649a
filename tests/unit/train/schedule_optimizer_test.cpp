// The warmup-stable-decay learning-rate schedule (torchtitan's step conventions) and the three
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
  // 100 steps, 10 warm-up, last 20% decaying linearly to 0.1 x peak.
  LrScheduler s(1.0, 10, 100, 0.2, "linear", 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(1), 1.0 / 11);  // torchtitan: (step + 1) / (warmup + 1), 0-based
  EXPECT_DOUBLE_EQ(s.lr_at(10), 10.0 / 11);
  EXPECT_DOUBLE_EQ(s.lr_at(11), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(80), 1.0);  // stable until the decay window (steps 81..100)
  EXPECT_NEAR(s.lr_at(81), 0.1 + 0.9 * (1 - 1.0 / 20), 1e-12);
  EXPECT_NEAR(s.lr_at(90), 0.1 + 0.9 * (1 - 10.0 / 20), 1e-12);
  EXPECT_NEAR(s.lr_at(100), 0.1, 1e-12);
}

TEST(LrScheduler, SqrtAndCosineShapesAndDefaultDecayWindow) {
  LrScheduler sq(2.0, 0, 10, std::nullopt, "sqrt", 0.0);  // decay over all 10 steps
  EXPECT_NEAR(sq.lr_at(1), 2.0 * (1 - std::sqrt(0.1)), 1e-12);
  EXPECT_NEAR(sq.lr_at(10), 0.0, 1e-12);
  LrScheduler cos(1.0, 0, 10, std::nullopt, "cosine", 0.0);
  EXPECT_NEAR(cos.lr_at(5), 0.5 * (1 + std::cos(M_PI * 0.5)), 1e-12);
  EXPECT_NEAR(cos.lr_at(10), 0.0, 1e-12);
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
