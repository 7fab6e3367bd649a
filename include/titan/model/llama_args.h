// Llama 3 model dimensions (torchtitan's flavors) and the arithmetic derived from them:
// FFN width, parameter counts and training FLOPs per token.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace titan::model {

struct LlamaArgs {
  int64_t dim = 4096;
  int64_t n_layers = 32;
  int64_t n_heads = 32;
  int64_t n_kv_heads = 32;
  int64_t vocab_size = 128256;
  int64_t multiple_of = 256;
  std::optional<double> ffn_dim_multiplier;
  double norm_eps = 1e-5;
  double rope_theta = 500000.0;
  // Llama 3.1-style RoPE frequency scaling (every flavor has it, as torchtitan's and Meta's;
  // model.rope_scaling = false or a checkpoint without it turns it off).
  double rope_scaling_factor = 0.0;  // 0 = no scaling
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  int64_t rope_original_max_positions = 8192;
  bool depth_init = true;  // wo/w2/w3 init std shrinks with depth

  int64_t head_dim() const { return dim / n_heads; }
  int64_t ffn_hidden_dim() const;
  // Rows of the fused q|k|v projection.
  int64_t qkv_dim() const { return (n_heads + 2 * n_kv_heads) * head_dim(); }
  int64_t params_per_block() const;
  int64_t embedding_params() const { return vocab_size * dim; }
  int64_t total_params() const;
  // torchtitan's formula: 6 * (params - embedding) + 12 * layers * heads * head_dim * seq.
  double training_flops_per_token(int64_t seq_len) const;
};

// "llama3 scaling (factor 8, low 1, high 4, original 8192)" or "none", for logs and errors.
std::string describe_rope(const LlamaArgs& args);

// Known flavors in a fixed order: debugmodel, 1B, 3B, 8B, 70B, 405B.
std::vector<std::string> llama_flavor_names();
// The flavor's arguments; throws titan::Error naming the known flavors otherwise.
LlamaArgs llama_flavor(const std::string& name);

}  // namespace titan::model
