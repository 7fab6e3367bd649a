// Deterministic parameter initialization that does not depend on how parameters are split:
// every element's value is a function of (seed, parameter name, element index) only, drawn
// with a counter-based hash, the index counting in the whole parameter (for a tensor-parallel
// part too). A rank initializes just the elements it holds, and the full weights are
// identical for any world size or mesh, on CPU and CUDA alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "titan/model/layout.h"

namespace titan::model {

// Fills `out` (1-D, any float dtype/device) with the unit's flat elements
// [flat_begin, flat_begin + out.numel()); alignment padding and elements past the unit's end
// become zero.
void init_unit_range(const UnitLayout& unit, int64_t seed, int64_t flat_begin, at::Tensor out);

// The same values through ATen tensor ops on any device (init_unit_range's path off the host;
// host memory gets a per-element loop giving identical bits, exposed for the test of that).
void init_unit_range_with_tensor_ops(const UnitLayout& unit, int64_t seed, int64_t flat_begin,
                                     at::Tensor out);

// Uniform (0, 1) doubles for the given int64 counters under `key` (exposed for tests).
at::Tensor hashed_uniform(const at::Tensor& counters, uint64_t key);

}  // namespace titan::model
