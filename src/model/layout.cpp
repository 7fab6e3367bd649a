// Unit layouts of Llama 3 and torchtitan's initialization scheme per parameter.
#include "titan/model/layout.h"

#include <ATen/ATen.h>

#include <cmath>

#include "titan/util/error.h"

namespace titan::model {

const ParamSlot& UnitLayout::param(const std::string& suffix) const {
  for (const auto& p : params) {
    if (p.name.size() >= suffix.size() &&
        p.name.compare(p.name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      return p;
    }
  }
  internal_fail("unit ", name, " has no parameter ending in ", suffix);
}

std::vector<int64_t> ParamSlot::box_offset() const {
  std::vector<int64_t> off(global_shape.size(), 0);
  if (tp.dim >= 0) off[static_cast<size_t>(tp.dim)] = shape[static_cast<size_t>(tp.dim)] * tp.index;
  return off;
}

ParamSlot::IndexMap ParamSlot::index_map() const {
  IndexMap m;
  m.dim = tp.dim;
  if (tp.dim < 0) return m;
  m.cols = shape.size() == 2 ? shape[1] : shape[0];
  m.global_cols = global_shape.size() == 2 ? global_shape[1] : global_shape[0];
  const auto off = box_offset();
  m.row_offset = off[0];
  if (off.size() == 2) m.col_offset = off[1];
  return m;
}

at::Tensor ParamSlot::global_index(const at::Tensor& local) const {
  const IndexMap m = index_map();
  if (m.dim == 0) return local + m.row_offset * m.global_cols;  // whole rows: one block
  if (m.dim == 1) {
    return at::floor_divide(local, m.cols) * m.global_cols + m.col_offset +
           at::remainder(local, m.cols);
  }
  return local;
}

void check_tensor_parallel(const LlamaArgs& a, int64_t tp) {
  if (tp == 1) return;
  auto need = [&](int64_t value, const char* what) {
    TITAN_CHECK(value % tp == 0, "parallelism.tensor_parallel_degree (", tp, ") must divide the ",
                what, " (", value, "): each tensor-parallel rank holds an equal share");
  };
  need(a.n_heads, "number of attention heads");
  need(a.n_kv_heads, "number of KV heads");
  need(a.ffn_hidden_dim(), "feed-forward width");
  need(a.vocab_size, "vocabulary size");
}

namespace {

// A parameter split over tensor-parallel ranks along `dim` (-1: held whole by every rank).
void add(UnitLayout& u, const std::string& name, std::vector<int64_t> shape, InitSpec init,
         TpCoord tp = {}, int dim = -1) {
  ParamSlot p;
  p.name = name;
  p.global_shape = shape;
  p.tp = {dim, dim >= 0 ? tp.rank : 0, tp.size};
  if (dim >= 0) {
    TITAN_INTERNAL_CHECK(shape[static_cast<size_t>(dim)] % tp.size == 0, name,
                         " does not divide over ", tp.size, " tensor-parallel ranks");
    shape[static_cast<size_t>(dim)] /= tp.size;
  }
  p.shape = std::move(shape);
  p.numel = 1;
  for (int64_t s : p.shape) p.numel *= s;
  p.offset = (u.numel + kParamAlignElements - 1) / kParamAlignElements * kParamAlignElements;
  p.init = init;
  u.numel = p.offset + p.numel;
  u.params.push_back(std::move(p));
}

void finish(UnitLayout& u) {
  u.numel = (u.numel + kParamAlignElements - 1) / kParamAlignElements * kParamAlignElements;
}

InitSpec trunc(double std) {
  return {InitKind::TruncNormal, std, -2.0, 2.0};
}

}  // namespace

std::vector<UnitLayout> llama_units(const LlamaArgs& a, TpCoord tp) {
  check_tensor_parallel(a, tp.size);
  std::vector<UnitLayout> units;
  const int64_t hd = a.head_dim();
  const int64_t ffn = a.ffn_hidden_dim();
  {
    UnitLayout u;
    u.kind = UnitKind::Embedding;
    u.name = "tok_embeddings";
    // Vocabulary-parallel: each tp rank holds a range of the vocabulary's rows.
    add(u, "tok_embeddings.weight", {a.vocab_size, a.dim}, {InitKind::Normal, 1.0, 0, 0}, tp, 0);
    finish(u);
    units.push_back(std::move(u));
  }
  for (int64_t l = 0; l < a.n_layers; ++l) {
    UnitLayout u;
    u.kind = UnitKind::Block;
    u.layer = l;
    u.name = "layers." + std::to_string(l);
    const std::string p = u.name + ".";
    // torchtitan: depth-scaled std for the projections that write into the residual stream.
    const double depth_std =
        a.depth_init ? 0.02 / std::sqrt(2.0 * (l + 1)) : 0.02 / std::sqrt(2.0 * a.n_layers);
    // Tensor parallel (Megatron-LM's split, as torchtitan's plan): q/k/v and w1/w3 split their
    // output rows (column-parallel: whole heads and FFN columns per rank), wo and w2 their input
    // columns (row-parallel); norms are held whole.
    add(u, p + "attention_norm.weight", {a.dim}, {}, tp);
    add(u, p + "attention.wq.weight", {a.n_heads * hd, a.dim}, trunc(0.02), tp, 0);
    add(u, p + "attention.wk.weight", {a.n_kv_heads * hd, a.dim}, trunc(0.02), tp, 0);
    add(u, p + "attention.wv.weight", {a.n_kv_heads * hd, a.dim}, trunc(0.02), tp, 0);
    add(u, p + "attention.wo.weight", {a.dim, a.n_heads * hd}, trunc(depth_std), tp, 1);
    add(u, p + "ffn_norm.weight", {a.dim}, {}, tp);
    add(u, p + "feed_forward.w1.weight", {ffn, a.dim}, trunc(0.02), tp, 0);
    add(u, p + "feed_forward.w3.weight", {ffn, a.dim}, trunc(depth_std), tp, 0);
    add(u, p + "feed_forward.w2.weight", {a.dim, ffn}, trunc(depth_std), tp, 1);
    finish(u);
    units.push_back(std::move(u));
  }
  {
    UnitLayout u;
    u.kind = UnitKind::Head;
    u.name = "head";
    add(u, "norm.weight", {a.dim}, {}, tp);
    const double std = 1.0 / std::sqrt(static_cast<double>(a.dim));
    // Column-parallel over the vocabulary (loss parallel works on each rank's logits).
    add(u, "output.weight", {a.vocab_size, a.dim}, {InitKind::TruncNormal, std, -3 * std, 3 * std},
        tp, 0);
    finish(u);
    units.push_back(std::move(u));
  }
  return units;
}

BlockOffsets block_offsets(const UnitLayout& u) {
  TITAN_INTERNAL_CHECK(u.kind == UnitKind::Block, "block_offsets on unit ", u.name);
  const auto& wq = u.param("attention.wq.weight");
  const auto& wk = u.param("attention.wk.weight");
  const auto& wv = u.param("attention.wv.weight");
  const auto& w1 = u.param("feed_forward.w1.weight");
  const auto& w3 = u.param("feed_forward.w3.weight");
  TITAN_INTERNAL_CHECK(wk.offset == wq.offset + wq.numel && wv.offset == wk.offset + wk.numel &&
                           w3.offset == w1.offset + w1.numel,
                       "fused projections of ", u.name, " are not adjacent");
  return {
      u.param("attention_norm.weight").offset, wq.offset, u.param("attention.wo.weight").offset,
      u.param("ffn_norm.weight").offset,       w1.offset, u.param("feed_forward.w2.weight").offset};
}

at::Tensor GatheredUnit::view(const UnitLayout& unit, int64_t offset, int64_t numel,
                              at::Tensor* inv_scale) const {
  if (flat.defined()) return flat.narrow(0, offset, numel);
  TITAN_INTERNAL_CHECK(float8_ranges != nullptr, "unit ", unit.name, " was not gathered");
  auto in_float8 = [&](int64_t at_elem) -> int64_t {
    for (size_t r = 0; r < float8_ranges->size(); ++r) {
      const auto& range = (*float8_ranges)[r];
      if (at_elem >= range.offset && at_elem < range.offset + range.numel) {
        return static_cast<int64_t>(r);
      }
    }
    return -1;
  };
  if (const int64_t r = in_float8(offset); r >= 0) {
    TITAN_INTERNAL_CHECK((*float8_ranges)[static_cast<size_t>(r)].offset == offset &&
                             (*float8_ranges)[static_cast<size_t>(r)].numel == numel,
                         "a view of part of a float8 matrix in ", unit.name);
    if (inv_scale) *inv_scale = inv_scales[r];
    return flat8.narrow(0, offset, numel);
  }
  int64_t packed = 0;
  for (const auto& p : unit.params) {
    if (in_float8(p.offset) >= 0) continue;
    if (p.offset == offset) return rest.narrow(0, packed, numel);
    packed += p.numel;
  }
  TITAN_INTERNAL_CHECK(false, "no parameter of ", unit.name, " starts at element ", offset);
  return {};
}

std::vector<ElementRange> block_float8_ranges(const UnitLayout& unit, bool wqkv, bool wo, bool w13,
                                              bool w2) {
  const BlockOffsets o = block_offsets(unit);
  std::vector<ElementRange> out;
  auto numel = [&](std::initializer_list<const char*> names) {
    int64_t n = 0;
    for (const char* name : names) n += unit.param(name).numel;
    return n;
  };
  if (wqkv) {
    out.push_back(
        {o.wqkv, numel({"attention.wq.weight", "attention.wk.weight", "attention.wv.weight"})});
  }
  if (wo) out.push_back({o.wo, numel({"attention.wo.weight"})});
  if (w13) out.push_back({o.w13, numel({"feed_forward.w1.weight", "feed_forward.w3.weight"})});
  if (w2) out.push_back({o.w2, numel({"feed_forward.w2.weight"})});
  return out;
}

}  // namespace titan::model
