// Where every Llama parameter lives: the model is split into units (the embedding, each
// transformer block, the head = final norm + output), and each unit's parameters are laid out
// back to back in one flat buffer. Units are what FSDP gathers and reduces as one piece.
#pragma once

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

struct ParamSlot {
  std::string name;            // torchtitan FQN, e.g. "layers.3.attention.wq.weight"
  std::vector<int64_t> shape;  // full (unsharded) shape
  int64_t offset = 0;          // element offset inside the unit's flat buffer
  int64_t numel = 0;
  InitSpec init;
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

// Units in execution order: tok_embeddings, layers.0 .. layers.{L-1}, head.
std::vector<UnitLayout> llama_units(const LlamaArgs& args);
BlockOffsets block_offsets(const UnitLayout& unit);

// Element alignment of every parameter inside a unit (16 bytes of bf16 and more).
constexpr int64_t kParamAlignElements = 64;

}  // namespace titan::model
