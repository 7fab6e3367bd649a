// Llama 3 flavor table (dims from torchtitan / Meta's model cards) and size arithmetic.
#include "titan/model/llama_args.h"

#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::model {

int64_t LlamaArgs::ffn_hidden_dim() const {
  int64_t hidden = 2 * (4 * dim) / 3;
  if (ffn_dim_multiplier) hidden = static_cast<int64_t>(*ffn_dim_multiplier * hidden);
  return multiple_of * ((hidden + multiple_of - 1) / multiple_of);
}

int64_t LlamaArgs::params_per_block() const {
  const int64_t hd = head_dim();
  const int64_t attn = dim * (n_heads * hd) + 2 * dim * (n_kv_heads * hd) + (n_heads * hd) * dim;
  const int64_t ffn = 3 * dim * ffn_hidden_dim();
  return attn + ffn + 2 * dim;  // two RMSNorm weights
}

int64_t LlamaArgs::total_params() const {
  // embeddings + blocks + final norm + untied output projection
  return embedding_params() + n_layers * params_per_block() + dim + vocab_size * dim;
}

double LlamaArgs::training_flops_per_token(int64_t seq_len) const {
  const double dense = 6.0 * static_cast<double>(total_params() - embedding_params());
  const double attn = 12.0 * n_layers * n_heads * head_dim() * static_cast<double>(seq_len);
  return dense + attn;
}

std::string describe_rope(const LlamaArgs& a) {
  std::string out = "theta " + util::format_number(a.rope_theta);
  if (a.rope_scaling_factor <= 0) return out + ", no scaling";
  return out + ", llama3 scaling (factor " + util::format_number(a.rope_scaling_factor) +
         ", low_freq_factor " + util::format_number(a.rope_low_freq_factor) +
         ", high_freq_factor " + util::format_number(a.rope_high_freq_factor) +
         ", original_max_position_embeddings " + std::to_string(a.rope_original_max_positions) +
         ")";
}

namespace {

struct Flavor {
  const char* name;
  LlamaArgs args;
};

LlamaArgs make(int64_t dim, int64_t layers, int64_t heads, int64_t kv_heads, int64_t vocab,
               int64_t multiple_of, std::optional<double> mult) {
  LlamaArgs a;
  a.dim = dim;
  a.n_layers = layers;
  a.n_heads = heads;
  a.n_kv_heads = kv_heads;
  a.vocab_size = vocab;
  a.multiple_of = multiple_of;
  a.ffn_dim_multiplier = mult;
  // Llama 3.1 RoPE scaling, as torchtitan (>= v0.2.0) builds every llama3 flavor and Meta's
  // Llama 3.1 weights use; Llama 3.2's 1B and 3B use factor 32 (set in the table below).
  a.rope_scaling_factor = 8.0;
  a.rope_low_freq_factor = 1.0;
  a.rope_high_freq_factor = 4.0;
  a.rope_original_max_positions = 8192;
  return a;
}

LlamaArgs with_rope_factor(LlamaArgs a, double factor) {
  a.rope_scaling_factor = factor;
  return a;
}

const std::vector<Flavor>& flavors() {
  static const std::vector<Flavor> table = {
      {"debugmodel", make(256, 6, 16, 16, 2048, 256, std::nullopt)},
      // The debug model with grouped-query attention (4 KV heads), as the large flavors have.
      {"debugmodel_gqa", make(256, 6, 16, 4, 2048, 256, std::nullopt)},
      {"1B", with_rope_factor(make(2048, 16, 32, 8, 128256, 1024, 1.5), 32.0)},
      {"3B", with_rope_factor(make(3072, 28, 24, 8, 128256, 1024, 1.0), 32.0)},
      {"8B", make(4096, 32, 32, 8, 128256, 1024, 1.3)},
      {"70B", make(8192, 80, 64, 8, 128256, 4096, 1.3)},
      {"405B", make(16384, 126, 128, 8, 128256, 4096, 1.2)},
  };
  return table;
}

}  // namespace

std::vector<std::string> llama_flavor_names() {
  std::vector<std::string> names;
  for (const auto& f : flavors()) names.push_back(f.name);
  return names;
}

LlamaArgs llama_flavor(const std::string& name) {
  for (const auto& f : flavors()) {
    if (name == f.name) return f.args;
  }
  std::string near = util::nearest(name, llama_flavor_names());
  fail("model.flavor: unknown flavor \"", name, "\"; expected one of ",
       util::join(llama_flavor_names(), ", "),
       near.empty() ? "" : "; did you mean \"" + near + "\"?");
}

}  // namespace titan::model
