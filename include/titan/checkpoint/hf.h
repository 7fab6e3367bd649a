// Hugging Face Llama weights: import from model-0000x-of-0000y.safetensors (+ index json) or a
// single model.safetensors with config.json, and export the same layout. HF names map to
// torchtitan's (model.layers.3.self_attn.q_proj.weight <-> layers.3.attention.wq.weight);
// HF orders each head's q/k rows for rotate_half RoPE, titan for interleaved pairs, so q and k
// are permuted on the way in and out.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "titan/checkpoint/checkpointer.h"

namespace titan::checkpoint {

// HF tensor name of a titan parameter name (and back); throws for unknown names.
std::string hf_name(const std::string& titan_name);
std::string titan_name(const std::string& hf_name);

// Meta (interleaved pairs) <-> HF (two halves) row order of a q or k projection with `heads`
// heads: w is [heads * head_dim, dim].
at::Tensor permute_to_hf(const at::Tensor& w, int64_t heads);
at::Tensor permute_from_hf(const at::Tensor& w, int64_t heads);

// Reads the folder's config.json: the dims must be those of `args` (a difference names the
// key); rope_theta, rms_norm_eps and rope_scaling (Llama 3.1's "llama3" type, or none) are
// adopted into `args`, with a log line where they differ from it; other RoPE scaling types,
// biases or activations are rejected. Returns tie_word_embeddings (a tied folder's output
// projection is imported as a copy of the embedding).
bool adopt_hf_config(const std::string& folder, model::LlamaArgs& args);

// Loads every weight of `state.model` from the HF folder (each rank reads the rows its shards
// need). config.json must describe the same dims as the model (differences name the key).
void import_hf(const std::string& folder, TrainerState& state);

// Writes the model in HF format (safetensors files of at most ~5 GB, index, config.json) to
// `folder`, atomically (folder.partial then rename). Collective over the data-parallel ranks;
// global rank 0 writes.
void export_hf(const std::string& folder, TrainerState& state, dist::Runtime& runtime,
               const std::string& dtype);

// `titan_train convert ...`: single-process conversion between titan checkpoints and HF
// folders (see usage in convert.cpp). Returns the exit code.
int run_convert(const std::vector<std::string>& args);

}  // namespace titan::checkpoint
