// AdamW: ATen's fused kernel, or the same update in foreach / per-tensor form.
#include "titan/train/optimizer.h"

#include <ATen/ATen.h>

#include <cmath>

#include "titan/util/error.h"

namespace titan::train {

Optimizer::Optimizer(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                     OptimizerOptions options)
    : params_(std::move(params)), grads_(std::move(grads)), options_(std::move(options)) {
  TITAN_CHECK(params_.size() == grads_.size(), "internal: optimizer params/grads mismatch");
  for (const auto& p : params_) {
    exp_avg_.push_back(at::zeros_like(p));
    exp_avg_sq_.push_back(at::zeros_like(p));
    state_steps_.push_back(at::zeros({}, p.options().dtype(at::kFloat)));
  }
}

void Optimizer::set_step_count(int64_t steps) {
  steps_taken_ = steps;
  for (auto& s : state_steps_) s.fill_(static_cast<double>(steps));
}

void Optimizer::step(double lr, const at::Tensor& grad_divisor) {
  ++steps_taken_;
  const auto& o = options_;
  const bool decoupled = o.name == "AdamW";
  if (params_.empty()) return;
  if (o.implementation == "fused") {
    // The fused kernels read the step count but do not advance it (torch.optim does that).
    at::_foreach_add_(state_steps_, 1);
    std::optional<at::Tensor> scale;
    if (grad_divisor.defined()) scale = grad_divisor;
    if (decoupled) {
      at::_fused_adamw_(params_, grads_, exp_avg_, exp_avg_sq_, {}, state_steps_, lr, o.beta1,
                        o.beta2, o.weight_decay, o.eps, false, false, scale, std::nullopt);
    } else {
      at::_fused_adam_(params_, grads_, exp_avg_, exp_avg_sq_, {}, state_steps_, lr, o.beta1,
                       o.beta2, o.weight_decay, o.eps, false, false, scale, std::nullopt);
    }
    return;
  }
  // foreach / for-loop: the textbook update, in fp32.
  const double t = static_cast<double>(steps_taken_);
  const double bc1 = 1.0 - std::pow(o.beta1, t);
  const double bc2 = 1.0 - std::pow(o.beta2, t);
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  for (auto& s : state_steps_) s.add_(1);
  std::vector<at::Tensor> g = grads_;
  if (grad_divisor.defined()) {
    g = at::_foreach_div(grads_, grad_divisor);
  }
  auto update_one = [&](size_t i) {
    at::Tensor& p = params_[i];
    at::Tensor gi = g[i];
    if (decoupled) {
      p.mul_(1.0 - lr * o.weight_decay);
    } else if (o.weight_decay != 0) {
      gi = gi + p * o.weight_decay;
    }
    exp_avg_[i].lerp_(gi, 1.0 - o.beta1);
    exp_avg_sq_[i].mul_(o.beta2).addcmul_(gi, gi, 1.0 - o.beta2);
    at::Tensor denom = (exp_avg_sq_[i].sqrt() / bc2_sqrt).add_(o.eps);
    p.addcdiv_(exp_avg_[i], denom, -step_size);
  };
  if (o.implementation == "foreach" && decoupled) {
    at::_foreach_mul_(params_, 1.0 - lr * o.weight_decay);
    at::_foreach_lerp_(exp_avg_, g, 1.0 - o.beta1);
    at::_foreach_mul_(exp_avg_sq_, o.beta2);
    at::_foreach_addcmul_(exp_avg_sq_, g, g, 1.0 - o.beta2);
    auto denom = at::_foreach_sqrt(exp_avg_sq_);
    at::_foreach_div_(denom, bc2_sqrt);
    at::_foreach_add_(denom, o.eps);
    at::_foreach_addcdiv_(params_, exp_avg_, denom, -step_size);
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) update_one(i);
}

}  // namespace titan::train
