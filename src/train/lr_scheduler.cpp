// Warmup-stable-decay learning-rate schedule, as torchtitan v0.1.0 and later define it.
#include "titan/train/lr_scheduler.h"

#include <algorithm>
#include <cmath>

#include "titan/util/error.h"
#include "titan/util/log.h"

namespace titan::train {

LrScheduler::LrScheduler(double peak_lr, int64_t warmup_steps, int64_t training_steps,
                         std::optional<double> decay_ratio, std::string decay_type,
                         double min_lr_factor)
    : peak_lr_(peak_lr),
      warmup_steps_(warmup_steps),
      decay_type_(std::move(decay_type)),
      min_lr_factor_(min_lr_factor) {
  if (warmup_steps_ > training_steps) {
    log::warn(
        "lr_scheduler.warmup_steps ({}) exceeds the schedule's {} steps "
        "(lr_scheduler.total_steps, else training.steps); warming up over all of them",
        warmup_steps_, training_steps);
    warmup_steps_ = training_steps;
  }
  if (decay_ratio) {
    decay_steps_ = static_cast<int64_t>(std::llround(training_steps * *decay_ratio));
    if (warmup_steps_ + decay_steps_ > training_steps) {
      log::warn(
          "lr_scheduler: warmup ({}) + decay ({}) steps exceed the schedule's {} steps "
          "(lr_scheduler.total_steps, else training.steps); decay shortened to {}",
          warmup_steps_, decay_steps_, training_steps, training_steps - warmup_steps_);
      decay_steps_ = training_steps - warmup_steps_;
    }
  } else {
    decay_steps_ = training_steps - warmup_steps_;
  }
  // torchtitan adds a virtual last step to the stable phase, so the last step's learning rate
  // is one decay step above the floor rather than on it (never 0 with the default floor).
  stable_end_ = training_steps + 1 - decay_steps_;
}

double LrScheduler::factor_at(int64_t step) const {
  // torchtitan's LambdaLR counts from 0; our steps are 1-based.
  const int64_t s = step - 1;
  if (s < warmup_steps_) {
    return static_cast<double>(s + 1) / static_cast<double>(warmup_steps_);
  }
  if (s < stable_end_) return 1.0;
  const double progress =
      decay_steps_ > 0 ? static_cast<double>(s + 1 - stable_end_) / decay_steps_ : 1.0;
  const double p = std::clamp(progress, 0.0, 1.0);
  double adj = 1.0;
  if (decay_type_ == "linear") {
    adj = 1.0 - p;
  } else if (decay_type_ == "sqrt") {
    adj = 1.0 - std::sqrt(p);
  } else if (decay_type_ == "cosine") {
    adj = 0.5 * (1.0 + std::cos(M_PI * p));
  } else {
    fail("lr_scheduler.decay_type: unknown \"", decay_type_, "\"");
  }
  return min_lr_factor_ + (1.0 - min_lr_factor_) * adj;
}

double LrScheduler::lr_at(int64_t step) const {
  return peak_lr_ * factor_at(step);
}

}  // namespace titan::train
