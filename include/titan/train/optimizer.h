// AdamW / Adam over flat fp32 parameter tensors (one per unit, or one per local shard), with
// the gradient-norm clip folded into the update as a device-side scale (no host sync).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace titan::train {

// A range of a parameter (elements [offset, offset + numel)) whose largest |new value| the
// update writes into one fp32 element of a buffer (`slot`): a float8 weight's amax.
struct AmaxRange {
  int64_t offset = 0, numel = 0, slot = 0;
};

struct OptimizerOptions {
  std::string name = "AdamW";            // AdamW (decoupled decay) or Adam (L2 in the gradient)
  std::string implementation = "fused";  // fused | foreach | for-loop: same update
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

class Optimizer {
 public:
  // params/grads: parallel lists of fp32 tensors (same shapes), updated in place. `shadows`
  // (empty, or one per parameter, undefined where unused): lower-precision copies of the
  // parameters rewritten after every step (the compute weights; CUDA writes them in the same
  // kernel as the update).
  Optimizer(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, OptimizerOptions options,
            std::vector<at::Tensor> shadows = {});

  // One update with learning rate `lr`. `grad_divisor` (fp32 scalar tensor on the params'
  // device, or undefined) divides every gradient first: the clip coefficient's inverse.
  void step(double lr, const at::Tensor& grad_divisor);
  // The same in two halves, for CUDA graphs: prepare() advances the step count and stages the
  // step's hyper-parameters on the device (host work, outside a graph); apply() launches the
  // update (device work only, capturable, reading the staged values).
  void prepare(double lr);
  void apply(const at::Tensor& grad_divisor);
  // apply() for the listed parameters only (optimizer.early_step_in_backward: each unit as
  // soon as its gradient is final); each parameter's update is the one apply() makes.
  void apply_to(const std::vector<size_t>& which, const at::Tensor& grad_divisor);

  // From now on, every update of parameter i writes the amax of each range into its slot of
  // `amax` (fp32, on the parameter's device), as it writes the new values (of the shadow where
  // there is one), in the same pass. False, and nothing is kept, where the update cannot (not
  // the CUDA fused kernel, a shadow in another dtype than bf16, ranges not 8-element aligned).
  bool take_amax(size_t i, std::vector<AmaxRange> ranges, const at::Tensor& amax);
  // Whether the last update of parameter i wrote its amaxes (false where it ran another path).
  bool wrote_amax(size_t i) const { return i < amax_written_.size() && amax_written_[i]; }

  int64_t step_count() const { return steps_taken_; }
  // State for checkpoints: exp_avg and exp_avg_sq per parameter, and the step count.
  std::vector<at::Tensor>& exp_avg() { return exp_avg_; }
  std::vector<at::Tensor>& exp_avg_sq() { return exp_avg_sq_; }
  void set_step_count(int64_t steps);

 private:
  void update_aten(const std::vector<size_t>& which, double lr, const at::Tensor& grad_divisor,
                   bool decoupled);
  double lr_ = 0;
  std::vector<at::Tensor> params_, grads_, exp_avg_, exp_avg_sq_, state_steps_, shadows_;
  struct AmaxTargets {
    std::vector<AmaxRange> ranges;  // ascending, disjoint
    at::Tensor amax;
  };
  std::vector<AmaxTargets> amax_targets_;  // per parameter; empty ranges: none
  std::vector<bool> amax_written_;         // per parameter, by its last update
  at::Tensor hyper_;  // device copy of the step's hyper-parameters (CUDA fused path)
  OptimizerOptions options_;
  int64_t steps_taken_ = 0;
};

}  // namespace titan::train
