// Rotary position embedding on interleaved pairs (x[2i], x[2i+1]), Meta/torchtitan layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "titan/model/llama_args.h"

namespace titan::ops {

// cos/sin tables [seq_len, head_dim/2] in fp32 (Llama 3.1 frequency scaling if configured).
std::tuple<at::Tensor, at::Tensor> rope_tables(const model::LlamaArgs& args, int64_t seq_len,
                                               const at::TensorOptions& options);

// x: [B, S, H, hd] (any strides with the last dim contiguous). Returns a contiguous tensor
// [B, S, H, hd] of x's dtype rotated by +angle (inverse=false) or -angle (backward).
at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool inverse = false);
// The same, written into `out` ([B, S, H, hd], any strides with a unit last dim).
void rope_apply_out(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
                    const at::Tensor& out);
at::Tensor rope_apply_ref(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          bool inverse = false);

}  // namespace titan::ops
