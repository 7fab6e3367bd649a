// What a rank's device memory holds during a step, estimated from the model dims and the plan
// before anything is allocated: the out-of-memory warning at start-up, and the numbers an
// out-of-memory error reports.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "titan/model/llama.h"
#include "titan/model/llama_args.h"

namespace titan::parallel {

// Float8 projections whose weight-gradient input a block keeps already cast (x^T in float8,
// one byte per element) rather than in the compute dtype: q|k|v (the attention norm's output),
// w1|w3 (the FFN norm's output), w2 (SwiGLU's output). Every recipe but rowwise_with_gw_hp.
struct Float8SavedInputs {
  bool wqkv = false, w13 = false, w2 = false;
};

struct MemoryEstimateInputs {
  int64_t param_state_elements = 0;  // fp32 elements this rank owns (master, grad, 2 moments)
  bool state_on_host = false;        // CPU offload: the fp32 state lives in host memory
  int64_t compute_dtype_bytes = 2;   // bf16 weights and activations on GPU; 4 on CPU
  // Compute-dtype weights resident on the device: the shards' shadows plus the gathered full
  // units held at once (FSDP: about two units; unsharded: the whole model's shadow).
  int64_t resident_weight_elements = 0;
  // fp32 full-gradient elements alive at the peak: one unit's and its reduction copy, or in a
  // pipeline every unit's (accumulated over the step).
  int64_t gradient_buffer_elements = 0;
  int64_t microbatch_tokens = 0;                  // sequences x seq_len of one microbatch
  int64_t microbatches_in_flight = 1;             // whose activations are alive at once (pipelines)
  std::vector<model::SavePolicy> block_policies;  // one per block this rank holds
  bool holds_head = true;                         // output projection + loss on this rank
  int64_t tp = 1;  // tensor parallel: heads, FFN and vocabulary split; tokens sharded between
                   // blocks (sequence parallel), gathered inside them
  Float8SavedInputs float8;
};

struct MemoryEstimate {
  int64_t param_state_bytes = 0;  // fp32 master + gradient + two AdamW moments on the device
  int64_t weight_bytes = 0;       // compute-dtype weights resident or gathered
  int64_t activation_bytes = 0;   // saved activations of the microbatches in flight
  int64_t working_bytes = 0;      // transient peak of one block's backward, head chunks, grads
  int64_t total_bytes() const {
    return param_state_bytes + weight_bytes + activation_bytes + working_bytes;
  }
  // "parameter state 114.3 GiB + weights 15.0 GiB + activations 20.1 GiB + working 6.0 GiB =
  // 155.4 GiB per rank"
  std::string describe() const;
};

// Bytes one token keeps per block under `policy` (compute dtype) as the explicit forward saves,
// on one of `tp` tensor-parallel ranks (the float8 projections' inputs in one byte).
int64_t saved_bytes_per_token(const model::LlamaArgs& args, model::SavePolicy policy,
                              int64_t dtype_bytes, int64_t tp = 1,
                              const Float8SavedInputs& float8 = {});

MemoryEstimate estimate_memory(const model::LlamaArgs& args, const MemoryEstimateInputs& in);

}  // namespace titan::parallel
