// Geometry of tensor parts in checkpoints: a rank's part of a parameter is a box (per-dim offset
// and shape inside the whole tensor; tensor parallelism makes row or column boxes), and what a
// chunk or an FSDP shard holds is a flat range of that box's row-major elements. Loading under
// another layout intersects such ranges as rectangles.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace titan::checkpoint {

struct Box {
  std::vector<int64_t> offset;  // where the box starts in the whole tensor, per dim
  std::vector<int64_t> shape;   // the box's extent (1-D or 2-D tensors)
  // The whole tensor of `shape`.
  static Box whole(const std::vector<int64_t>& shape);
  int64_t numel() const;
};

// Half-open rows [r0, r1) x columns [c0, c1) of the whole tensor (a 1-D tensor is one row).
struct Rect {
  int64_t r0 = 0, r1 = 0, c0 = 0, c1 = 0;
  int64_t numel() const { return (r1 - r0) * (c1 - c0); }
  bool empty() const { return r1 <= r0 || c1 <= c0; }
};

// The (at most three) rectangles covering elements [first, first + count) of `box`.
std::vector<Rect> flat_range_rects(const Box& box, int64_t first, int64_t count);
Rect intersect(const Rect& a, const Rect& b);
// Index, in `box`'s row-major order, of the whole tensor's element (row, col) (inside the box).
int64_t box_flat_index(const Box& box, int64_t row, int64_t col);
// `flat` holds the box's elements from `flat_first` on; the view of its part that is `r`, as
// [rows, cols].
at::Tensor rect_view(const at::Tensor& flat, const Box& box, int64_t flat_first, const Rect& r);

}  // namespace titan::checkpoint
