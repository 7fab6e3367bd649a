// AdamW: ATen's fused kernel, or the same update in foreach / per-tensor form.
#include "titan/train/optimizer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "titan/ops/dispatch.h"
#include "titan/util/error.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::train {

Optimizer::Optimizer(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                     OptimizerOptions options, std::vector<at::Tensor> shadows)
    : params_(std::move(params)),
      grads_(std::move(grads)),
      shadows_(std::move(shadows)),
      options_(std::move(options)) {
  TITAN_INTERNAL_CHECK(shadows_.empty() || shadows_.size() == params_.size(),
                       "optimizer shadows/params mismatch");
  TITAN_INTERNAL_CHECK(params_.size() == grads_.size(), "optimizer params/grads mismatch");
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
  prepare(lr);
  apply(grad_divisor);
}

namespace {
bool cuda_fused(const std::vector<at::Tensor>& params, const OptimizerOptions& o) {
#ifdef TITAN_WITH_CUDA
  return o.implementation == "fused" && !params.empty() && params.front().is_cuda() &&
         ops::fused_kernels_enabled();
#else
  (void)params;
  (void)o;
  return false;
#endif
}
}  // namespace

void Optimizer::prepare(double lr) {
  ++steps_taken_;
  lr_ = lr;
  if (!cuda_fused(params_, options_)) return;
  const auto& o = options_;
  const double t = static_cast<double>(steps_taken_);
  const double bc1 = 1.0 - std::pow(o.beta1, t);
  const double bc2 = 1.0 - std::pow(o.beta2, t);
  // A fresh pinned host tensor per step: the caching host allocator keeps it until the
  // asynchronous copy has read it.
  at::Tensor h = at::empty({8}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
  float* hp = h.data_ptr<float>();
  hp[0] = static_cast<float>(lr);
  hp[1] = static_cast<float>(o.beta1);
  hp[2] = static_cast<float>(o.beta2);
  hp[3] = static_cast<float>(o.eps);
  hp[4] = static_cast<float>(o.weight_decay);
  hp[5] = static_cast<float>(lr / bc1);
  hp[6] = static_cast<float>(1.0 / std::sqrt(bc2));
  hp[7] = 0.f;
  if (!hyper_.defined()) hyper_ = at::empty({8}, params_.front().options());
  hyper_.copy_(h, /*non_blocking=*/true);
}

void Optimizer::apply(const at::Tensor& grad_divisor) {
  std::vector<size_t> all(params_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  apply_to(all, grad_divisor);
}

void Optimizer::apply_to(const std::vector<size_t>& which, const at::Tensor& grad_divisor) {
  const auto& o = options_;
  const bool decoupled = o.name == "AdamW";
  const double lr = lr_;
  if (which.empty()) return;
  amax_written_.resize(params_.size(), false);
  for (size_t i : which) amax_written_[i] = false;
#ifdef TITAN_WITH_CUDA
  if (cuda_fused(params_, o)) {
    at::Tensor divisor = grad_divisor.defined() ? grad_divisor.to(at::kFloat) : at::Tensor();
    for (size_t i : which) {
      const at::Tensor shadow = shadows_.empty() ? at::Tensor() : shadows_[i];
      const bool bf16 = shadow.defined() && shadow.scalar_type() == at::kBFloat16;
      const at::Tensor written = bf16 ? shadow : at::Tensor();  // by the kernel itself
      // The stretch [begin, begin + n) in one launch, its amax into `amax` where defined.
      auto update = [&](int64_t begin, int64_t n, const at::Tensor& amax) {
        if (n == 0) return;
        kernels::adamw_step(params_[i].narrow(0, begin, n), grads_[i].narrow(0, begin, n),
                            exp_avg_[i].narrow(0, begin, n), exp_avg_sq_[i].narrow(0, begin, n),
                            written.defined() ? written.narrow(0, begin, n) : at::Tensor(), hyper_,
                            divisor, decoupled, amax);
      };
      if (i < amax_targets_.size() && !amax_targets_[i].ranges.empty()) {
        int64_t at_elem = 0;
        for (const auto& r : amax_targets_[i].ranges) {
          update(at_elem, r.offset - at_elem, at::Tensor());
          update(r.offset, r.numel, amax_targets_[i].amax.narrow(0, r.slot, 1));
          at_elem = r.offset + r.numel;
        }
        update(at_elem, params_[i].numel() - at_elem, at::Tensor());
        amax_written_[i] = true;
      } else {
        update(0, params_[i].numel(), at::Tensor());
      }
      if (shadow.defined() && !bf16) shadow.copy_(params_[i], true);
    }
    return;
  }
#endif
  update_aten(which, lr, grad_divisor, decoupled);
  // These paths do not write the compute copies themselves.
  for (size_t i : which) {
    if (!shadows_.empty() && shadows_[i].defined()) {
      shadows_[i].copy_(params_[i], /*non_blocking=*/true);
    }
  }
}

void Optimizer::update_aten(const std::vector<size_t>& which, double lr,
                            const at::Tensor& grad_divisor, bool decoupled) {
  const auto& o = options_;
  // The tensors stepped now (every parameter's update depends on its own tensors only).
  std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq, steps;
  for (size_t i : which) {
    params.push_back(params_[i]);
    grads.push_back(grads_[i]);
    exp_avg.push_back(exp_avg_[i]);
    exp_avg_sq.push_back(exp_avg_sq_[i]);
    steps.push_back(state_steps_[i]);
  }
  if (o.implementation == "fused") {
    // The fused kernels read the step count but do not advance it (torch.optim does that).
    for (auto& st : steps) st.fill_(static_cast<double>(steps_taken_));
    std::optional<at::Tensor> scale;
    if (grad_divisor.defined()) scale = grad_divisor;
    if (decoupled) {
      at::_fused_adamw_(params, grads, exp_avg, exp_avg_sq, {}, steps, lr, o.beta1, o.beta2,
                        o.weight_decay, o.eps, false, false, scale, std::nullopt);
    } else {
      at::_fused_adam_(params, grads, exp_avg, exp_avg_sq, {}, steps, lr, o.beta1, o.beta2,
                       o.weight_decay, o.eps, false, false, scale, std::nullopt);
    }
    return;
  }
  // foreach / for-loop: the textbook update, in fp32.
  const double t = static_cast<double>(steps_taken_);
  const double bc1 = 1.0 - std::pow(o.beta1, t);
  const double bc2 = 1.0 - std::pow(o.beta2, t);
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  for (auto& st : steps) st.fill_(t);
  std::vector<at::Tensor> g = grads;
  if (grad_divisor.defined()) {
    g = at::_foreach_div(grads, grad_divisor);
  }
  auto update_one = [&](size_t i) {
    at::Tensor& p = params[i];
    at::Tensor gi = g[i];
    if (decoupled) {
      p.mul_(1.0 - lr * o.weight_decay);
    } else if (o.weight_decay != 0) {
      gi = gi + p * o.weight_decay;
    }
    exp_avg[i].lerp_(gi, 1.0 - o.beta1);
    exp_avg_sq[i].mul_(o.beta2).addcmul_(gi, gi, 1.0 - o.beta2);
    at::Tensor denom = (exp_avg_sq[i].sqrt() / bc2_sqrt).add_(o.eps);
    p.addcdiv_(exp_avg[i], denom, -step_size);
  };
  if (o.implementation == "foreach" && decoupled) {
    at::_foreach_mul_(params, 1.0 - lr * o.weight_decay);
    at::_foreach_lerp_(exp_avg, g, 1.0 - o.beta1);
    at::_foreach_mul_(exp_avg_sq, o.beta2);
    at::_foreach_addcmul_(exp_avg_sq, g, g, 1.0 - o.beta2);
    auto denom = at::_foreach_sqrt(exp_avg_sq);
    at::_foreach_div_(denom, bc2_sqrt);
    at::_foreach_add_(denom, o.eps);
    at::_foreach_addcdiv_(params, exp_avg, denom, -step_size);
    return;
  }
  for (size_t i = 0; i < params.size(); ++i) update_one(i);
}

bool Optimizer::take_amax(size_t i, std::vector<AmaxRange> ranges, const at::Tensor& amax) {
  TITAN_INTERNAL_CHECK(i < params_.size(), "take_amax: parameter ", i, " of ", params_.size());
  const at::Tensor shadow = shadows_.empty() ? at::Tensor() : shadows_[i];
  if (!cuda_fused(params_, options_) || ranges.empty() || !amax.defined() ||
      amax.scalar_type() != at::kFloat || amax.device() != params_[i].device() ||
      (shadow.defined() && shadow.scalar_type() != at::kBFloat16)) {
    return false;
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const AmaxRange& a, const AmaxRange& b) { return a.offset < b.offset; });
  int64_t end = 0;
  std::vector<bool> slot_used(static_cast<size_t>(amax.numel()), false);
  for (const auto& r : ranges) {
    const int64_t stop = r.offset + r.numel;
    // Each range and the stretch after it are launches of their own, on views that must start
    // on 16 bytes (fp32 and the bf16 shadow); a launch zeroes its slot first, so two ranges
    // cannot share one.
    if (r.offset < end || r.numel <= 0 || stop > params_[i].numel() || r.offset % 8 != 0 ||
        (stop % 8 != 0 && stop != params_[i].numel()) || r.slot < 0 || r.slot >= amax.numel() ||
        slot_used[static_cast<size_t>(r.slot)]) {
      return false;
    }
    slot_used[static_cast<size_t>(r.slot)] = true;
    end = stop;
  }
  if (amax_targets_.size() < params_.size()) amax_targets_.resize(params_.size());
  amax_targets_[i] = {std::move(ranges), amax};
  return true;
}

}  // namespace titan::train
