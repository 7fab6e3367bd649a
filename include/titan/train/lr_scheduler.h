// Learning-rate schedule: linear warm-up, then stable, then decay (linear / sqrt / cosine)
// towards min_lr_factor; torchtitan's warmup-stable-decay (v0.1.0 and later: warm-up reaches the
// peak on its last step, and one virtual step in the stable phase keeps the last lr above the
// floor) with its step conventions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace titan::train {

class LrScheduler {
 public:
  LrScheduler(double peak_lr, int64_t warmup_steps, int64_t training_steps,
              std::optional<double> decay_ratio, std::string decay_type, double min_lr_factor);
  // Learning rate for optimizer step `step` (1-based, as in the log).
  double lr_at(int64_t step) const;
  // Multiplier of the peak lr at `step` (1-based).
  double factor_at(int64_t step) const;
  int64_t warmup_steps() const { return warmup_steps_; }
  int64_t decay_steps() const { return decay_steps_; }

 private:
  double peak_lr_;
  int64_t warmup_steps_;
  int64_t decay_steps_;
  int64_t stable_end_;  // warmup + stable (0-based step index where the decay starts)
  std::string decay_type_;
  double min_lr_factor_;
};

}  // namespace titan::train
