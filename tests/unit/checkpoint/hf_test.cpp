// Hugging Face interop pieces: the parameter name mapping and the q/k row permutation between
// Meta's interleaved-pair RoPE and HF's rotate_half RoPE.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <set>

#include "titan/checkpoint/hf.h"
#include "titan/model/layout.h"
#include "titan/ops/rope.h"
#include "titan/util/error.h"

using namespace titan;

TEST(CheckpointHfNames, KnownParametersMapToHuggingFaceNames) {
  EXPECT_EQ(checkpoint::hf_name("tok_embeddings.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(checkpoint::hf_name("norm.weight"), "model.norm.weight");
  EXPECT_EQ(checkpoint::hf_name("output.weight"), "lm_head.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.3.attention.wq.weight"),
            "model.layers.3.self_attn.q_proj.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.0.attention.wk.weight"),
            "model.layers.0.self_attn.k_proj.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.12.attention.wv.weight"),
            "model.layers.12.self_attn.v_proj.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.1.attention.wo.weight"),
            "model.layers.1.self_attn.o_proj.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.5.attention_norm.weight"),
            "model.layers.5.input_layernorm.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.5.ffn_norm.weight"),
            "model.layers.5.post_attention_layernorm.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.2.feed_forward.w1.weight"),
            "model.layers.2.mlp.gate_proj.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.2.feed_forward.w3.weight"),
            "model.layers.2.mlp.up_proj.weight");
  EXPECT_EQ(checkpoint::hf_name("layers.2.feed_forward.w2.weight"),
            "model.layers.2.mlp.down_proj.weight");
}

TEST(CheckpointHfNames, EveryModelParameterRoundTripsToADistinctName) {
  for (const char* flavor : {"debugmodel", "8B"}) {
    std::set<std::string> seen;
    for (const auto& unit : model::llama_units(model::llama_flavor(flavor))) {
      for (const auto& p : unit.params) {
        const std::string h = checkpoint::hf_name(p.name);
        EXPECT_TRUE(seen.insert(h).second) << flavor << ": " << h << " used twice";
        EXPECT_EQ(checkpoint::titan_name(h), p.name) << flavor;
      }
    }
    EXPECT_EQ(seen.size(), 3 + 9 * model::llama_flavor(flavor).n_layers) << flavor;
  }
}

TEST(CheckpointHfNames, UnknownNamesAreErrors) {
  // titan's own names come from titan: an unknown one is a bug, not the user's input.
  EXPECT_THROW(checkpoint::hf_name("layers.0.attention.wx.weight"), InternalError);
  EXPECT_THROW(checkpoint::hf_name("bogus"), InternalError);
  EXPECT_THROW(checkpoint::titan_name("model.layers.0.self_attn.rotary_emb.inv_freq"), Error);
  EXPECT_THROW(checkpoint::titan_name("lm_head.bias"), Error);
}

TEST(CheckpointHfPermute, ToHfAndFromHfAreInverses) {
  at::manual_seed(0);
  for (int64_t heads : {1, 2, 4, 16}) {
    for (int64_t head_dim : {2, 8, 16}) {
      at::Tensor w = at::randn({heads * head_dim, 24});
      at::Tensor hf = checkpoint::permute_to_hf(w, heads);
      EXPECT_FALSE(head_dim > 2 && at::equal(hf, w)) << heads << "x" << head_dim;
      EXPECT_TRUE(at::equal(checkpoint::permute_from_hf(hf, heads), w));
      EXPECT_TRUE(
          at::equal(checkpoint::permute_to_hf(checkpoint::permute_from_hf(w, heads), heads), w));
    }
  }
}

TEST(CheckpointHfPermute, RowsMoveFromInterleavedPairsToHalvesWithinEachHead) {
  // Two heads of head_dim 4; row r of head h holds the value 10 * h + r.
  at::Tensor w = at::arange(8, at::kFloat).view({8, 1});
  w = w + 6 * (w >= 4).to(at::kFloat);  // head 1 rows: 10..13
  at::Tensor hf = checkpoint::permute_to_hf(w, 2).view({-1});
  // Meta pairs (0,1), (2,3) -> HF first halves (0, 2), second halves (1, 3).
  const std::vector<float> want = {0, 2, 1, 3, 10, 12, 11, 13};
  ASSERT_EQ(hf.numel(), 8);
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(hf[i].item<float>(), want[i]) << i;
}

TEST(CheckpointHfPermute, PermutedWeightsWithRotateHalfRopeGiveTheSameAttentionScores) {
  // q = x W^T rotated as interleaved pairs (titan) and q' = x permute_to_hf(W)^T rotated with
  // rotate_half (HF) hold the same vectors up to a fixed reordering inside each head, so
  // q . k is the same.
  at::manual_seed(1);
  model::LlamaArgs a;
  a.dim = 32;
  a.n_heads = 4;
  a.n_kv_heads = 2;
  const int64_t s = 7, hd = a.head_dim();
  at::Tensor x = at::randn({1, s, a.dim});
  at::Tensor wq = at::randn({a.n_heads * hd, a.dim});
  at::Tensor wk = at::randn({a.n_kv_heads * hd, a.dim});
  auto [cos, sin] = ops::rope_tables(a, s, at::TensorOptions());
  auto titan_rope = [&](const at::Tensor& w, int64_t heads) {
    return ops::rope_apply_ref(at::matmul(x, w.t()).view({1, s, heads, hd}), cos, sin);
  };
  auto hf_rope = [&](const at::Tensor& w, int64_t heads) {
    at::Tensor y = at::matmul(x, checkpoint::permute_to_hf(w, heads).t()).view({1, s, heads, hd});
    at::Tensor c = at::cat({cos, cos}, -1).view({1, s, 1, hd});
    at::Tensor sn = at::cat({sin, sin}, -1).view({1, s, 1, hd});
    at::Tensor rotated = at::cat({-y.narrow(-1, hd / 2, hd / 2), y.narrow(-1, 0, hd / 2)}, -1);
    return y * c + rotated * sn;
  };
  at::Tensor q = titan_rope(wq, a.n_heads), k = titan_rope(wk, a.n_kv_heads);
  at::Tensor qh = hf_rope(wq, a.n_heads), kh = hf_rope(wk, a.n_kv_heads);
  // The same reordering applied to titan's rotated vectors gives HF's.
  auto reorder = [&](const at::Tensor& t) {
    return t.reshape({1, s, -1, hd / 2, 2}).transpose(-1, -2).reshape(t.sizes());
  };
  EXPECT_TRUE(at::allclose(reorder(q), qh, 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(reorder(k), kh, 1e-5, 1e-5));
  // Scores of query head 3 against its KV head 1.
  at::Tensor scores = at::matmul(q.select(2, 3), k.select(2, 1).transpose(-1, -2));
  at::Tensor scores_hf = at::matmul(qh.select(2, 3), kh.select(2, 1).transpose(-1, -2));
  EXPECT_TRUE(at::allclose(scores, scores_hf, 1e-4, 1e-4));
}
