// Flat ranges of row/column boxes as rectangles, their intersections and strided views.
#include "titan/checkpoint/box.h"

#include <algorithm>

#include "titan/util/error.h"

namespace titan::checkpoint {
namespace {

// (rows, cols) of a 1-D or 2-D extent.
std::pair<int64_t, int64_t> rows_cols(const std::vector<int64_t>& shape) {
  TITAN_INTERNAL_CHECK(shape.size() == 1 || shape.size() == 2, "box of rank ", shape.size());
  return shape.size() == 1 ? std::pair<int64_t, int64_t>{1, shape[0]}
                           : std::pair<int64_t, int64_t>{shape[0], shape[1]};
}

std::pair<int64_t, int64_t> origin(const Box& b) {
  return b.offset.size() == 1 ? std::pair<int64_t, int64_t>{0, b.offset[0]}
                              : std::pair<int64_t, int64_t>{b.offset[0], b.offset[1]};
}

}  // namespace

Box Box::whole(const std::vector<int64_t>& shape) {
  return {std::vector<int64_t>(shape.size(), 0), shape};
}

int64_t Box::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::vector<Rect> flat_range_rects(const Box& box, int64_t first, int64_t count) {
  const auto [rows, cols] = rows_cols(box.shape);
  const auto [row0, col0] = origin(box);
  TITAN_INTERNAL_CHECK(first >= 0 && count >= 0 && first + count <= rows * cols, "range [", first,
                       ", ", first + count, ") outside a box of ", rows * cols);
  std::vector<Rect> out;
  if (count == 0) return out;
  const int64_t end = first + count;
  int64_t r = first / cols, c = first % cols;
  const int64_t last_r = (end - 1) / cols, last_c = (end - 1) % cols + 1;
  auto add = [&](int64_t ra, int64_t rb, int64_t ca, int64_t cb) {
    if (rb > ra && cb > ca) out.push_back({row0 + ra, row0 + rb, col0 + ca, col0 + cb});
  };
  if (r == last_r) {
    add(r, r + 1, c, last_c);
    return out;
  }
  if (c > 0) {  // partial first row
    add(r, r + 1, c, cols);
    ++r;
  }
  if (last_c == cols) {
    add(r, last_r + 1, 0, cols);
  } else {
    add(r, last_r, 0, cols);
    add(last_r, last_r + 1, 0, last_c);
  }
  return out;
}

Rect intersect(const Rect& a, const Rect& b) {
  return {std::max(a.r0, b.r0), std::min(a.r1, b.r1), std::max(a.c0, b.c0), std::min(a.c1, b.c1)};
}

int64_t box_flat_index(const Box& box, int64_t row, int64_t col) {
  const auto [rows, cols] = rows_cols(box.shape);
  const auto [row0, col0] = origin(box);
  TITAN_INTERNAL_CHECK(row >= row0 && row < row0 + rows && col >= col0 && col < col0 + cols,
                       "element (", row, ", ", col, ") outside its box");
  return (row - row0) * cols + (col - col0);
}

at::Tensor rect_view(const at::Tensor& flat, const Box& box, int64_t flat_first, const Rect& r) {
  const int64_t cols = rows_cols(box.shape).second;
  const int64_t at = box_flat_index(box, r.r0, r.c0) - flat_first;
  TITAN_INTERNAL_CHECK(at >= 0 && at + (r.r1 - r.r0 - 1) * cols + (r.c1 - r.c0) <= flat.numel(),
                       "rectangle outside its flat range");
  return flat.as_strided({r.r1 - r.r0, r.c1 - r.c0}, {cols * flat.stride(0), flat.stride(0)},
                         flat.storage_offset() + at * flat.stride(0));
}

}  // namespace titan::checkpoint
