// Where every Llama parameter lives: the model is split into units (the embedding, each
// transformer block, the head = final norm + output), and each unit's parameters are laid out
// back to back in one flat buffer. Units are what FSDP gathers and reduces as one piece.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "titan/model/llama_args.h"

namespace titan::model {

enum class InitKind { Ones, Normal, TruncNormal };

// How a parameter is initialized (torchtitan's scheme).
struct InitSpec {
  InitKind kind = InitKind::Ones;
  double std = 1.0;
  double lower = -2.0;  // truncation bounds (absolute values, as torch.nn.init.trunc_normal_)
  double upper = 2.0;
};

// How tensor parallelism splits a parameter: along `dim` into `count` equal parts, of which this
// rank holds part `index`; dim = -1 with count > 1 is a parameter every tp rank holds whole
// (the norms). count = 1: no tensor parallelism.
struct ShardSpec {
  int dim = -1;
  int64_t index = 0;
  int64_t count = 1;
  bool replicated() const { return dim < 0 && count > 1; }
};

struct ParamSlot {
  std::string name;                   // torchtitan FQN, e.g. "layers.3.attention.wq.weight"
  std::vector<int64_t> shape;         // the part this rank holds (the full shape without TP)
  std::vector<int64_t> global_shape;  // the whole parameter
  ShardSpec tp;                       // which part: wq/wk/wv/w1/w3/embedding/output split rows
                                      // (column-parallel), wo/w2 split columns (row-parallel)
  int64_t offset = 0;                 // element offset inside the unit's flat buffer
  int64_t numel = 0;                  // of `shape`
  InitSpec init;

  // Where this rank's part starts in the whole parameter, per dimension.
  std::vector<int64_t> box_offset() const;
  // Local flat index -> flat index in the whole parameter (row-major in global_shape):
  // a row split (dim 0) shifts by whole rows, a column split (dim 1) places each local row of
  // `cols` inside a global row of `global_cols` at column `col_offset`.
  struct IndexMap {
    int dim = -1;
    int64_t cols = 1, global_cols = 1, row_offset = 0, col_offset = 0;
    int64_t operator()(int64_t local) const {
      if (dim == 0) return local + row_offset * global_cols;
      if (dim == 1) return (local / cols) * global_cols + col_offset + local % cols;
      return local;
    }
  };
  IndexMap index_map() const;
  // The same over a tensor of local flat indices (int64).
  at::Tensor global_index(const at::Tensor& local) const;
};

enum class UnitKind { Embedding, Block, Head };

struct UnitLayout {
  UnitKind kind = UnitKind::Block;
  std::string name;  // "tok_embeddings", "layers.3", "head"
  int64_t layer = -1;
  std::vector<ParamSlot> params;
  int64_t numel = 0;  // flat length, including alignment padding

  const ParamSlot& param(const std::string& suffix) const;
};

// Offsets inside a block unit; wq|wk|wv and w1|w3 are adjacent so each pair (triple) is one
// matrix: [qkv_dim, dim] and [2 * ffn, dim].
struct BlockOffsets {
  int64_t attention_norm, wqkv, wo, ffn_norm, w13, w2;
};

// Elements [offset, offset + numel) of a unit's flat buffer.
struct ElementRange {
  int64_t offset = 0, numel = 0;
};

// A unit's weights as gathered for compute. Usually `flat`: the whole unit in the compute dtype
// at the layout's offsets. Under the float8 FSDP all-gather, the matrices listed in
// `float8_ranges` are in `flat8` (e4m3, at layout offsets) with one inverse scale each
// (`inv_scales`, fp32 [ranges]), and every other parameter is in `rest` (compute dtype), back
// to back in layout order.
struct GatheredUnit {
  at::Tensor flat;
  at::Tensor flat8, inv_scales, rest;
  const std::vector<ElementRange>* float8_ranges = nullptr;

  // The `numel` elements at layout offset `offset` (the start of a parameter or float8 range):
  // a view of `flat`, of `flat8` (setting `*inv_scale`), or of `rest`.
  at::Tensor view(const UnitLayout& unit, int64_t offset, int64_t numel,
                  at::Tensor* inv_scale) const;
};

// The float8 matrices of a block unit (q|k|v, wo, w1|w3, w2; each only where `on` says).
std::vector<ElementRange> block_float8_ranges(const UnitLayout& unit, bool wqkv, bool wo, bool w13,
                                              bool w2);

// A rank's coordinate in tensor parallelism.
struct TpCoord {
  int64_t size = 1;
  int64_t rank = 0;
};

// Units in execution order: tok_embeddings, layers.0 .. layers.{L-1}, head; with tensor
// parallelism, this tp rank's parts of each parameter (the dims must divide: see
// check_tensor_parallel).
std::vector<UnitLayout> llama_units(const LlamaArgs& args, TpCoord tp = {});
// Throws titan::Error naming what does not divide by the tensor-parallel degree (heads, KV
// heads, FFN width, vocabulary).
void check_tensor_parallel(const LlamaArgs& args, int64_t tp);
BlockOffsets block_offsets(const UnitLayout& unit);

// Element alignment of every parameter inside a unit (16 bytes of bf16 and more).
constexpr int64_t kParamAlignElements = 64;

}  // namespace titan::model
