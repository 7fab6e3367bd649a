// The explicit forward/backward against the autograd reference, and model arithmetic.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "support/reference_llama.h"
#include "support/test_support.h"
#include "titan/model/init.h"
#include "titan/model/layout.h"
#include "titan/model/llama.h"
#include "titan/model/llama_args.h"
#include "titan/ops/float8.h"
#include "titan/ops/rope.h"
#include "titan/parallel/fsdp.h"
#include "titan/util/error.h"

using namespace titan;

TEST(LlamaArgs, ParameterCountsMatchKnownModels) {
  EXPECT_EQ(model::llama_flavor("8B").total_params(), 8030261248LL);
  EXPECT_EQ(model::llama_flavor("70B").total_params(), 70553706496LL);
  EXPECT_EQ(model::llama_flavor("405B").total_params(), 405853388800LL);
  EXPECT_EQ(model::llama_flavor("1B").total_params(), 1498482688LL);
  EXPECT_EQ(model::llama_flavor("3B").total_params(), 3606752256LL);
  EXPECT_EQ(model::llama_flavor("8B").ffn_hidden_dim(), 14336);
  EXPECT_EQ(model::llama_flavor("70B").ffn_hidden_dim(), 28672);
  EXPECT_EQ(model::llama_flavor("405B").ffn_hidden_dim(), 53248);
}

TEST(LlamaArgs, UnitLayoutCoversEveryParameterOnce) {
  for (const auto& flavor : model::llama_flavor_names()) {
    auto args = model::llama_flavor(flavor);
    auto units = model::llama_units(args);
    int64_t total = 0;
    for (const auto& u : units) {
      for (const auto& p : u.params) {
        EXPECT_EQ(p.offset % model::kParamAlignElements, 0) << p.name;
        EXPECT_LE(p.offset + p.numel, u.numel) << p.name;
        total += p.numel;
      }
    }
    EXPECT_EQ(total, args.total_params()) << flavor;
    EXPECT_EQ(units.size(), static_cast<size_t>(args.n_layers + 2));
  }
}

TEST(LlamaArgs, FlopsPerTokenFollowsTorchtitanFormula) {
  auto a = model::llama_flavor("8B");
  const double expected = 6.0 * (8030261248.0 - 128256.0 * 4096) + 12.0 * 32 * 32 * 128 * 4096;
  EXPECT_DOUBLE_EQ(a.training_flops_per_token(4096), expected);
}

namespace {

struct TinyRun {
  double loss;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> params;
};

TinyRun run_titan(const model::LlamaArgs& args, const at::Tensor& tokens,
                  const std::string& ac_mode, const std::string& ac_option) {
  parallel::FsdpModel fsdp(model::llama_units(args), nullptr, nullptr, c10::Device(c10::kCPU),
                           parallel::FsdpOptions{});
  fsdp.init_weights(3);
  const double n = static_cast<double>(tokens.size(0) * (tokens.size(1) - 1));
  at::Tensor loss_sum = test::single_stage_step(args, fsdp, tokens, 1.0 / n, ac_mode, ac_option);
  TinyRun r;
  r.loss = loss_sum.item<double>() / n;
  for (size_t i = 0; i < fsdp.num_units(); ++i) {
    r.grads.push_back(fsdp.unit(i).grad.clone());
    r.params.push_back(fsdp.unit(i).master.clone());
  }
  return r;
}

at::Tensor tiny_tokens(const model::LlamaArgs& args, int64_t b, int64_t s) {
  at::manual_seed(11);
  return at::randint(0, args.vocab_size, {b, s + 1}, at::kLong);
}

}  // namespace

TEST(LlamaModel, ExplicitBackwardMatchesAutograd) {
  auto args = test::tiny_llama_args();
  auto tokens = tiny_tokens(args, 2, 16);
  auto r = run_titan(args, tokens, "none", "");
  auto units = model::llama_units(args);
  auto ref = test::reference_loss_and_grads(args, units, r.params, tokens);
  EXPECT_NEAR(r.loss, ref.loss_mean, 1e-5 * ref.loss_mean);
  for (size_t i = 0; i < units.size(); ++i) {
    EXPECT_LT(test::relative_error(r.grads[i], ref.unit_grads[i]), 1e-4) << units[i].name;
  }
}

TEST(LlamaModel, ActivationCheckpointModesGiveTheSameGradients) {
  auto args = test::tiny_llama_args();
  args.n_layers = 4;
  auto tokens = tiny_tokens(args, 2, 12);
  auto base = run_titan(args, tokens, "none", "");
  for (auto [mode, option] :
       std::vector<std::pair<std::string, std::string>>{{"full", ""},
                                                        {"selective", "op"},
                                                        {"selective", "2"},
                                                        {"selective", "1"},
                                                        {"memory_budget", "0"},
                                                        {"memory_budget", "0.3"},
                                                        {"memory_budget", "0.6"},
                                                        {"memory_budget", "1"}}) {
    auto r = run_titan(args, tokens, mode, option);
    EXPECT_DOUBLE_EQ(r.loss, base.loss) << mode << " " << option;
    for (size_t i = 0; i < r.grads.size(); ++i) {
      EXPECT_LT(test::relative_error(r.grads[i], base.grads[i]), 1e-6)
          << mode << " " << option << " unit " << i;
    }
  }
}

// Every save policy (what the block keeps, what its backward recomputes) gives one block's
// input gradient and weight gradients of keeping everything, to fp32 rounding; with float8
// projections (emulated) too. Recomputing from the input alone runs the forward's own code
// (all but w2, whose output the backward does not read), so it gives exactly those of keeping
// everything, float8 casts included.
TEST(LlamaModel, EverySavePolicyGivesTheBlockGradientsOfKeepingEverything) {
  const auto args = test::tiny_llama_args();
  const auto block = model::llama_units(args).at(1);
  const auto device = c10::Device(c10::kCPU);
  at::manual_seed(3);
  const model::ScratchBlock w = model::scratch_block(block, at::kFloat, device);
  const int64_t seq = 12;
  auto [cos, sin] = ops::rope_tables(args, seq, at::dtype(at::kFloat));
  const model::Rope rope{cos, sin};
  const at::Tensor x = at::randn({2, seq, args.dim});
  const at::Tensor dy = at::randn({2, seq, args.dim});
  const ops::Float8Linear tensorwise(ops::Float8Recipe::Tensorwise, /*emulate=*/true);
  const ops::Float8Linear rowwise(ops::Float8Recipe::Rowwise, /*emulate=*/true);
  for (const ops::Linear* lin : {&ops::plain_linear(), static_cast<const ops::Linear*>(&tensorwise),
                                 static_cast<const ops::Linear*>(&rowwise)}) {
    model::BlockPlan plan = model::BlockPlan::whole(args);
    plan.wqkv = plan.wo = plan.w13 = plan.w2 = lin;
    SCOPED_TRACE(lin == &ops::plain_linear() ? "plain"
                 : lin == &tensorwise        ? "tensorwise"
                                             : "rowwise");
    auto run = [&](model::SavePolicy policy) {
      at::Tensor grad = at::zeros({block.numel});
      const model::BlockGrads g = model::block_views(block, grad);
      model::BlockSaved saved;
      const at::Tensor out = model::block_forward(args, plan, w.w, rope, x, policy, saved);
      const at::Tensor dx = model::block_backward(args, plan, w.w, rope, dy, saved, g, false);
      return std::tuple{out, dx, grad};
    };
    const auto [out, dx, grad] = run(model::SavePolicy::All);
    for (auto policy :
         {model::SavePolicy::Matmuls, model::SavePolicy::Attention, model::SavePolicy::InputOnly}) {
      SCOPED_TRACE(model::save_policy_index(policy));
      const auto [o, d, gr] = run(policy);
      EXPECT_TRUE(at::equal(o, out));
      EXPECT_LT(test::relative_error(d, dx), 1e-6);
      EXPECT_LT(test::relative_error(gr, grad), 1e-6);
      if (policy == model::SavePolicy::InputOnly) {
        EXPECT_TRUE(at::equal(d, dx));
        EXPECT_TRUE(at::equal(gr, grad));
      }
    }
  }
}

// A projection that counts its products and forwards to the plain one.
class CountingLinear final : public ops::Linear {
 public:
  at::Tensor forward(const at::Tensor& x, const ops::LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& amax) const override {
    ++products;
    return ops::plain_linear().forward(x, w, x_for_weight, amax);
  }
  at::Tensor forward_add(const at::Tensor& x, const ops::LinearWeight& w,
                         const at::Tensor& residual, at::Tensor* x_for_weight,
                         const at::Tensor& amax) const override {
    ++products;
    return ops::plain_linear().forward_add(x, w, residual, x_for_weight, amax);
  }
  mutable int products = 0;
};

// The backward of a block recomputed from its input redoes every projection but w2: nothing
// reads the block output there.
TEST(LlamaModel, RecomputeFromTheInputSkipsTheLastProjection) {
  const auto args = test::tiny_llama_args();
  const auto block = model::llama_units(args).at(1);
  at::manual_seed(4);
  const model::ScratchBlock w = model::scratch_block(block, at::kFloat, c10::Device(c10::kCPU));
  const int64_t seq = 8;
  auto [cos, sin] = ops::rope_tables(args, seq, at::dtype(at::kFloat));
  const model::Rope rope{cos, sin};
  CountingLinear wqkv, wo, w13, w2;
  model::BlockPlan plan = model::BlockPlan::whole(args);
  plan.wqkv = &wqkv;
  plan.wo = &wo;
  plan.w13 = &w13;
  plan.w2 = &w2;
  model::BlockSaved saved;
  const at::Tensor x = at::randn({1, seq, args.dim});
  model::block_forward(args, plan, w.w, rope, x, model::SavePolicy::InputOnly, saved);
  at::Tensor grad = at::zeros({block.numel});
  model::block_backward(args, plan, w.w, rope, at::randn_like(x), saved,
                        model::block_views(block, grad), false);
  EXPECT_EQ(wqkv.products, 2);
  EXPECT_EQ(wo.products, 2);
  EXPECT_EQ(w13.products, 2);
  EXPECT_EQ(w2.products, 1);
}

TEST(LlamaInit, SameWeightsWhateverTheSplit) {
  auto args = test::tiny_llama_args();
  auto units = model::llama_units(args);
  const auto& u = units[1];
  at::Tensor full = at::empty({u.numel}, at::dtype(at::kFloat));
  model::init_unit_range(u, 7, 0, full);
  // Three uneven pieces give the same elements.
  const int64_t cuts[] = {0, 1000, 7777, u.numel};
  for (int i = 0; i < 3; ++i) {
    at::Tensor part = at::empty({cuts[i + 1] - cuts[i]}, at::dtype(at::kFloat));
    model::init_unit_range(u, 7, cuts[i], part);
    EXPECT_TRUE(at::equal(part, full.narrow(0, cuts[i], cuts[i + 1] - cuts[i])));
  }
  // A different seed gives different weights.
  at::Tensor other = at::empty({u.numel}, at::dtype(at::kFloat));
  model::init_unit_range(u, 8, 0, other);
  EXPECT_FALSE(at::equal(other, full));
}

// The host's per-element loop and the tensor ops (the GPU's path) give identical bits, for
// every initialization kind, tensor-parallel parts (row and column splits) and float/double.
TEST(LlamaInit, HostLoopEqualsTheTensorOpsBitForBit) {
  const auto args = model::llama_flavor("debugmodel_gqa");
  for (int64_t tp : {1, 2}) {
    const auto units = model::llama_units(args, {tp, tp - 1});
    for (size_t i : {size_t{0}, size_t{1}, units.size() - 1}) {
      const auto& u = units[i];
      for (auto dtype : {at::kFloat, at::kDouble}) {
        at::Tensor fast = at::full({u.numel - 3}, 9.0, at::dtype(dtype));
        model::init_unit_range(u, 11, 3, fast);
        at::Tensor ops = at::full({u.numel - 3}, 9.0, at::dtype(dtype));
        model::init_unit_range_with_tensor_ops(u, 11, 3, ops);
        EXPECT_TRUE(at::equal(fast, ops)) << u.name << " tp " << tp << " " << dtype;
        EXPECT_NE(fast.abs().max().item<double>(), 9.0);
      }
    }
  }
}

// Tensor-parallel parts: every tp rank's part of every parameter holds exactly the whole
// parameter's values at its box (rows for column-parallel, columns for row-parallel), so the
// full weights are the same for any tp degree.
TEST(LlamaInit, TensorParallelPartsAreBoxesOfTheWholeWeights) {
  const auto args = model::llama_flavor("debugmodel_gqa");
  const auto whole = model::llama_units(args);
  for (int64_t tp : {2, 4}) {
    for (int64_t rank = 0; rank < tp; ++rank) {
      const auto parts = model::llama_units(args, {tp, rank});
      ASSERT_EQ(parts.size(), whole.size());
      for (size_t i : {size_t{0}, size_t{1}, parts.size() - 1}) {
        at::Tensor full = at::empty({whole[i].numel}, at::dtype(at::kFloat));
        model::init_unit_range(whole[i], 5, 0, full);
        at::Tensor mine = at::empty({parts[i].numel}, at::dtype(at::kFloat));
        model::init_unit_range(parts[i], 5, 0, mine);
        for (size_t k = 0; k < parts[i].params.size(); ++k) {
          const auto& p = parts[i].params[k];
          const auto& w = whole[i].params[k];
          ASSERT_EQ(p.name, w.name);
          EXPECT_EQ(p.global_shape, w.shape);
          at::Tensor expect = full.narrow(0, w.offset, w.numel).view(w.shape);
          if (p.tp.dim >= 0) {
            EXPECT_EQ(p.shape[static_cast<size_t>(p.tp.dim)] * tp,
                      w.shape[static_cast<size_t>(p.tp.dim)])
                << p.name;
            expect = expect.narrow(p.tp.dim, p.box_offset()[static_cast<size_t>(p.tp.dim)],
                                   p.shape[static_cast<size_t>(p.tp.dim)]);
          } else {
            EXPECT_TRUE(p.tp.replicated()) << p.name;
          }
          EXPECT_TRUE(at::equal(mine.narrow(0, p.offset, p.numel).view(p.shape), expect))
              << p.name << " tp " << tp << " rank " << rank;
        }
      }
    }
  }
  // Row-parallel (wo, w2) split the input columns, column-parallel the output rows.
  const auto parts = model::llama_units(args, {4, 1});
  EXPECT_EQ(parts[1].param("attention.wo.weight").tp.dim, 1);
  EXPECT_EQ(parts[1].param("feed_forward.w2.weight").tp.dim, 1);
  EXPECT_EQ(parts[1].param("attention.wk.weight").shape,
            (std::vector<int64_t>{args.head_dim(), args.dim}));  // one of the 4 KV heads
  EXPECT_EQ(parts[0].param("tok_embeddings.weight").box_offset(),
            (std::vector<int64_t>{args.vocab_size / 4, 0}));
}

TEST(LlamaArgs, TensorParallelDegreeMustDivideHeadsFfnAndVocabulary) {
  const auto gqa = model::llama_flavor("debugmodel_gqa");
  EXPECT_NO_THROW(model::check_tensor_parallel(gqa, 4));
  try {
    model::check_tensor_parallel(gqa, 8);
    ADD_FAILURE() << "8 does not divide 4 KV heads";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "parallelism.tensor_parallel_degree (8) must divide the number of KV heads (4)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(model::check_tensor_parallel(model::llama_flavor("debugmodel"), 3), Error);
  EXPECT_NO_THROW(model::check_tensor_parallel(model::llama_flavor("70B"), 8));
}

TEST(LlamaInit, DistributionsFollowTorchtitan) {
  model::LlamaArgs args = model::llama_flavor("debugmodel");
  auto units = model::llama_units(args);
  auto stats = [&](const model::UnitLayout& u, const std::string& name) {
    const auto& p = u.param(name);
    at::Tensor t = at::empty({p.numel}, at::dtype(at::kFloat));
    model::init_unit_range(u, 0, p.offset, t);
    return std::make_tuple(t.mean().item<double>(), t.std().item<double>(),
                           t.abs().max().item<double>());
  };
  auto [m0, s0, x0] = stats(units[0], "tok_embeddings.weight");
  EXPECT_NEAR(m0, 0.0, 0.01);
  EXPECT_NEAR(s0, 1.0, 0.01);
  auto [m1, s1, x1] = stats(units[1], "attention.wq.weight");
  EXPECT_NEAR(s1, 0.02, 0.0005);
  auto [m2, s2, x2] = stats(units[3], "attention.wo.weight");  // layer 2: 0.02 / sqrt(6)
  EXPECT_NEAR(s2, 0.02 / std::sqrt(6.0), 0.0003);
  const auto& head = units.back();
  auto [m3, s3, x3] = stats(head, "output.weight");
  const double out_std = 1.0 / 16.0;
  EXPECT_LE(x3, 3 * out_std + 1e-6);        // truncated at 3 std
  EXPECT_NEAR(s3, out_std * 0.986, 0.002);  // std of a normal truncated at +-3 sigma
  auto [m4, s4, x4] = stats(units[1], "attention_norm.weight");
  EXPECT_DOUBLE_EQ(m4, 1.0);
  EXPECT_DOUBLE_EQ(s4, 0.0);
  (void)m1;
  (void)x0;
  (void)x1;
  (void)m2;
  (void)x2;
  (void)m3;
  (void)x4;
}
