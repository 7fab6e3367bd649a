// Whether titan's own CUDA kernels serve an op, or ATen's composition does.
#pragma once

#include <ATen/core/Tensor.h>

namespace titan::ops {

// Process-wide switch (training.fused_kernels); on by default where kernels were compiled.
void set_fused_kernels(bool enabled);
bool fused_kernels_enabled();
// True when `t` lives on a CUDA device, the build has kernels, and they are enabled.
bool use_fused(const at::Tensor& t);

}  // namespace titan::ops
