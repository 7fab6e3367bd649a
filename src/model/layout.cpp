// Unit layouts of Llama 3 and torchtitan's initialization scheme per parameter.
#include "titan/model/layout.h"

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

namespace {

void add(UnitLayout& u, const std::string& name, std::vector<int64_t> shape, InitSpec init) {
  ParamSlot p;
  p.name = name;
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

std::vector<UnitLayout> llama_units(const LlamaArgs& a) {
  std::vector<UnitLayout> units;
  const int64_t hd = a.head_dim();
  const int64_t ffn = a.ffn_hidden_dim();
  {
    UnitLayout u;
    u.kind = UnitKind::Embedding;
    u.name = "tok_embeddings";
    add(u, "tok_embeddings.weight", {a.vocab_size, a.dim}, {InitKind::Normal, 1.0, 0, 0});
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
    add(u, p + "attention_norm.weight", {a.dim}, {});
    add(u, p + "attention.wq.weight", {a.n_heads * hd, a.dim}, trunc(0.02));
    add(u, p + "attention.wk.weight", {a.n_kv_heads * hd, a.dim}, trunc(0.02));
    add(u, p + "attention.wv.weight", {a.n_kv_heads * hd, a.dim}, trunc(0.02));
    add(u, p + "attention.wo.weight", {a.dim, a.n_heads * hd}, trunc(depth_std));
    add(u, p + "ffn_norm.weight", {a.dim}, {});
    add(u, p + "feed_forward.w1.weight", {ffn, a.dim}, trunc(0.02));
    add(u, p + "feed_forward.w3.weight", {ffn, a.dim}, trunc(depth_std));
    add(u, p + "feed_forward.w2.weight", {a.dim, ffn}, trunc(depth_std));
    finish(u);
    units.push_back(std::move(u));
  }
  {
    UnitLayout u;
    u.kind = UnitKind::Head;
    u.name = "head";
    add(u, "norm.weight", {a.dim}, {});
    const double std = 1.0 / std::sqrt(static_cast<double>(a.dim));
    add(u, "output.weight", {a.vocab_size, a.dim}, {InitKind::TruncNormal, std, -3 * std, 3 * std});
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

}  // namespace titan::model
