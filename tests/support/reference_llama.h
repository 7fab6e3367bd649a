// An independent Llama 3 written with plain ATen ops and autograd, used by tests as the
// reference for titan's explicit forward/backward (same parameter layout, fp32).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "titan/model/layout.h"
#include "titan/model/llama_args.h"

namespace titan::test {

struct ReferenceResult {
  double loss_mean = 0;                // mean token loss
  std::vector<at::Tensor> unit_grads;  // flat fp32 gradient per unit (same layout as titan)
};

// `flat_params`: one fp32 flat tensor per unit (as FsdpModel stores them), tokens [B, S+1].
ReferenceResult reference_loss_and_grads(const model::LlamaArgs& args,
                                         const std::vector<model::UnitLayout>& units,
                                         const std::vector<at::Tensor>& flat_params,
                                         const at::Tensor& tokens);

// A small model for tests: dim 64, 2 layers, 4 heads, 2 KV heads, vocab 96.
model::LlamaArgs tiny_llama_args();

}  // namespace titan::test
