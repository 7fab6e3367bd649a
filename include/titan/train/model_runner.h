// One micro-batch through the model: forward, fused loss, backward, with the unit gathers,
// releases and gradient reductions FsdpModel provides, and the activation-checkpoint policy.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <vector>

#include "titan/model/llama.h"
#include "titan/model/llama_args.h"
#include "titan/parallel/fsdp.h"

namespace titan::train {

struct ActivationPolicy {
  std::string mode = "none";  // none | selective | full
  std::string option = "2";   // selective: integer k or "op"
  // Policy of block `layer`: torchtitan checkpoints every k-th block counting from one.
  model::SavePolicy for_layer(int64_t layer) const;
};

class ModelRunner {
 public:
  ModelRunner(model::LlamaArgs args, parallel::FsdpModel& fsdp, ActivationPolicy ac);

  // tokens: int64 [B, S + 1] on the compute device. Accumulates gradients (d loss_sum *
  // grad_scale) and returns the fp32 sum of token losses (a device scalar).
  at::Tensor forward_backward(const at::Tensor& tokens, double grad_scale, bool last_microbatch);
  // Loss sum without gradients (validation).
  at::Tensor forward_loss(const at::Tensor& tokens);

  const model::LlamaArgs& args() const { return args_; }

 private:
  const model::Rope& rope_for(int64_t seq_len, const c10::Device& device);
  at::Tensor embed(const at::Tensor& inputs);
  at::Tensor blocks_forward(at::Tensor h, std::vector<model::BlockSaved>* saved);

  model::LlamaArgs args_;
  parallel::FsdpModel& fsdp_;
  ActivationPolicy ac_;
  std::map<int64_t, model::Rope> ropes_;
  at::ScalarType compute_dtype_;
};

}  // namespace titan::train
