// A stage's forward, input-gradient and weight-gradient passes over its units, with the gathers,
// releases and gradient reductions of FsdpModel and the activation-checkpoint policies.
#include "titan/parallel/pipeline/stage.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "titan/ops/cross_entropy.h"
#include "titan/ops/rope.h"
#include "titan/parallel/context_parallel.h"
#include "titan/parallel/tensor_parallel.h"
#include "titan/util/error.h"

namespace titan::parallel::pipeline {

std::string StageLayout::describe() const {
  std::vector<std::string> parts;
  if (embedding) parts.push_back("tok_embeddings");
  if (layers == 1) parts.push_back("layers." + std::to_string(first_layer));
  if (layers > 1) {
    parts.push_back("layers." + std::to_string(first_layer) + "-" +
                    std::to_string(first_layer + layers - 1));
  }
  if (head) parts.push_back("norm, output");
  std::string out = "stage " + std::to_string(index) + ": ";
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? ", " : "") + parts[i];
  return out;
}

const model::Rope& RopeCache::get(int64_t seq_len, const c10::Device& device) {
  auto it = tables_.find(seq_len);
  if (it == tables_.end()) {
    auto [c, s] = ops::rope_tables(args_, seq_len, at::TensorOptions().device(device));
    it = tables_.emplace(seq_len, model::Rope{c, s}).first;
  }
  return it->second;
}

model::BlockPlan block_plan(const model::LlamaArgs& args, const StageOptions& options) {
  model::BlockPlan p = options.tp ? options.tp->block_plan(args) : model::BlockPlan::whole(args);
  if (options.float8_column) {
    if (options.float8_wqkv) p.wqkv = options.float8_column;
    if (options.float8_wo) p.wo = options.float8_row;
    if (options.float8_w13) p.w13 = options.float8_column;
    if (options.float8_w2) p.w2 = options.float8_row;
  }
  return p;
}

Stage::Stage(StageLayout layout, std::vector<size_t> units, model::LlamaArgs args, FsdpModel& fsdp,
             RopeCache& ropes, std::vector<model::SavePolicy> policies, StageOptions options)
    : layout_(layout),
      units_(std::move(units)),
      first_block_(layout.embedding ? 1 : 0),
      args_(std::move(args)),
      fsdp_(fsdp),
      ropes_(ropes),
      policies_(std::move(policies)),
      options_(options),
      block_plan_(block_plan(args_, options)) {
  if (options_.cp) block_plan_.attention = options_.cp;
  if (!options_.token_slices.empty()) {
    TITAN_INTERNAL_CHECK(!options_.cp, "token slices with context parallel");
    slice_start_.push_back(0);
    for (int64_t len : options_.token_slices) slice_start_.push_back(slice_start_.back() + len);
    slicer_ = std::make_unique<TokenSliceAttention>();
    block_plan_.attention = slicer_.get();
  }
  const size_t want =
      (layout_.embedding ? 1 : 0) + static_cast<size_t>(layout_.layers) + (layout_.head ? 1 : 0);
  TITAN_INTERNAL_CHECK(units_.size() == want && policies_.size() == size_t(layout_.layers),
                       "stage ", layout_.index, " has ", units_.size(), " units for ",
                       layout_.describe());
}

void Stage::begin_step(int microbatches) {
  step_microbatches_ = microbatches;
  weight_passes_.clear();
  forwards_done_ = 0;
  backwards_done_ = 0;
  TITAN_INTERNAL_CHECK(saved_.empty() && slice_kv_.empty(), "stage ", layout_.index,
                       " starts a step holding ", saved_.size(), " microbatches");
}

void Stage::abandon_step() {
  saved_.clear();
  slice_kv_.clear();
  weight_passes_.clear();
  forwards_done_ = 0;
  backwards_done_ = 0;
}

at::Tensor Stage::embed(const at::Tensor& tokens) {
  // With unsharded storage the fp32 table is read directly: no full-table cast per step.
  const size_t unit = units_.front();
  const auto& u = fsdp_.unit(unit);
  const auto& slot = u.layout.params.front();
  const int64_t rows = slot.shape[0], d = args_.dim;
  const bool local = fsdp_.dp_shard_size() == 1 && u.master.device() == fsdp_.device();
  at::Tensor table = (local ? u.master : fsdp_.gather(unit)).narrow(0, 0, rows * d).view({rows, d});
  if (options_.tp) {
    return options_.tp->embedding_forward(table, slot.box_offset()[0], tokens,
                                          options_.compute_dtype);
  }
  return model::embedding_forward(table, tokens, options_.compute_dtype);
}

ops::HeadResult Stage::head(const at::Tensor& h, const at::Tensor& labels, double grad_scale,
                            bool compute_grad) {
  const int64_t d = args_.dim;
  const size_t head = units_.back();
  const auto& hl = fsdp_.unit(head).layout;
  const auto& norm_slot = hl.param("norm.weight");
  const auto& out_slot = hl.param("output.weight");
  const int64_t rows = out_slot.shape[0];
  const at::Tensor& hw = fsdp_.gather(head);
  at::Tensor norm_w = hw.narrow(0, norm_slot.offset, d);
  at::Tensor out_w = hw.narrow(0, out_slot.offset, rows * d).view({rows, d});
  bool acc = false;
  at::Tensor norm_grad, out_grad;
  if (compute_grad) {
    at::Tensor& hg = fsdp_.full_grad(head, &acc);
    norm_grad = hg.narrow(0, norm_slot.offset, d);
    out_grad = hg.narrow(0, out_slot.offset, rows * d).view({rows, d});
  }
  at::Tensor h2 = h.reshape({-1, d});
  if (options_.tp) {
    return options_.tp->head_forward_backward(h2, norm_w, out_w, out_slot.box_offset()[0],
                                              args_.vocab_size, labels, args_.norm_eps, grad_scale,
                                              &norm_grad, &out_grad, compute_grad, acc);
  }
  return ops::head_forward_backward(h2, norm_w, out_w, labels, args_.norm_eps, grad_scale,
                                    &norm_grad, &out_grad, compute_grad, acc);
}

void Stage::select_slice(int mb, int k) {
  if (!slicer_) return;
  if (mb < 0) {
    slicer_->use(nullptr, 0, 0);
    return;
  }
  const int slices = static_cast<int>(options_.token_slices.size());
  auto& kv = slice_kv_[mb / slices];
  kv.resize(static_cast<size_t>(layout_.layers));
  slicer_->use(&kv[static_cast<size_t>(k)], slice_start_[static_cast<size_t>(mb % slices)],
               slice_start_.back());
}

const model::Rope& Stage::rope_for(const at::Tensor& h, int mb) {
  const int64_t local = h.size(1) * block_plan_.seq_shards;  // this rank's tokens per sequence
  if (slicer_ && mb >= 0) {
    const int64_t first =
        slice_start_[static_cast<size_t>(mb % static_cast<int>(options_.token_slices.size()))];
    auto it = slice_ropes_.find({first, local});
    if (it == slice_ropes_.end()) {
      const auto& whole = ropes_.get(slice_start_.back(), h.device());
      model::Rope part{whole.cos.narrow(0, first, local), whole.sin.narrow(0, first, local)};
      it = slice_ropes_.emplace(std::make_pair(first, local), part).first;
    }
    return it->second;
  }
  if (!options_.cp) return ropes_.get(local, h.device());
  auto it = cp_ropes_.find(local);
  if (it == cp_ropes_.end()) {
    const auto& whole = ropes_.get(local * options_.cp->size(), h.device());
    it = cp_ropes_.emplace(local, options_.cp->local_rope(whole)).first;
  }
  return it->second;
}

at::Tensor Stage::blocks_forward(at::Tensor h, Saved* saved, int mb) {
  const model::Rope& rope = rope_for(h, mb);
  for (int k = 0; k < layout_.layers; ++k) {
    select_slice(mb, k);
    const size_t pos = first_block_ + static_cast<size_t>(k);
    if (pos + 1 < units_.size()) fsdp_.prefetch(units_[pos + 1]);
    const size_t unit = units_[pos];
    const auto w = model::block_views(fsdp_.unit(unit).layout, fsdp_.gathered(unit));
    if (saved) {
      h = model::block_forward(args_, block_plan_, w, rope, h, policies_[static_cast<size_t>(k)],
                               saved->blocks[static_cast<size_t>(k)]);
    } else {
      model::BlockSaved scratch;
      h = model::block_forward(args_, block_plan_, w, rope, h, model::SavePolicy::InputOnly,
                               scratch);
    }
    if (saved) {
      fsdp_.release(unit, /*after_forward=*/true);
    } else {
      fsdp_.release(unit, /*after_forward=*/false);
    }
  }
  return h;
}

void Stage::embed_backward(const at::Tensor& dh, const at::Tensor& tokens) {
  // Scatter-add of the input gradient into the table's gradient; needs no weights.
  const size_t unit = units_.front();
  const auto& slot = fsdp_.unit(unit).layout.params.front();
  const int64_t rows = slot.shape[0], d = args_.dim;
  bool acc = false;
  at::Tensor table_grad = fsdp_.full_grad(unit, &acc).narrow(0, 0, rows * d).view({rows, d});
  if (options_.tp) {
    options_.tp->embedding_backward(dh, tokens, slot.box_offset()[0], table_grad, acc);
  } else {
    model::embedding_backward(dh, tokens, table_grad, acc);
  }
  weight_done(unit);
}

void Stage::weight_done(size_t unit) {
  const int n = ++weight_passes_[unit];
  fsdp_.reduce_grad(unit, /*last_microbatch=*/n == step_microbatches_);
}

void Stage::release_after_use(size_t unit, int uses_done) {
  // Pipelines keep the weights until their last use in the step (every microbatch needs them);
  // otherwise they go after each backward.
  if (!options_.keep_weights_through_step || uses_done + 1 == step_microbatches_) {
    fsdp_.release(unit, /*after_forward=*/false);
  }
}

at::Tensor Stage::forward(int mb, const at::Tensor& input, const at::Tensor& labels,
                          double grad_scale, at::Tensor& loss_sum) {
  TITAN_INTERNAL_CHECK(!saved_.count(mb), "stage ", layout_.index, ": microbatch ", mb,
                       " forward twice");
  Saved& s = saved_[mb];
  s.blocks.resize(static_cast<size_t>(layout_.layers));
  at::Tensor h = input;
  {
    RECORD_USER_SCOPE("titan/forward");
    if (layout_.embedding) {
      if (units_.size() > 1) fsdp_.prefetch(units_[1]);
      s.tokens = input;
      h = embed(input);
      // The embedding's backward needs no weights: its last forward is its last use.
      fsdp_.release(units_.front(), /*after_forward=*/true);
      if (options_.keep_weights_through_step) release_after_use(units_.front(), forwards_done_);
    } else if (!units_.empty()) {
      fsdp_.prefetch(units_.front());
    }
    h = blocks_forward(h, &s, mb);
  }
  if (!layout_.head) {
    ++forwards_done_;
    return h;
  }

  // Head: norm + output + loss and their backward, in one pass.
  RECORD_USER_SCOPE("titan/head_loss_and_backward");
  auto res = head(h, labels, grad_scale, /*compute_grad=*/true);
  loss_sum.add_(res.loss_sum);
  s.dh = res.dh.view(h.sizes());
  weight_done(units_.back());
  release_after_use(units_.back(), forwards_done_);
  ++forwards_done_;
  return at::Tensor();
}

at::Tensor Stage::backward(int mb, const at::Tensor& dout, bool with_weight) {
  auto it = saved_.find(mb);
  TITAN_INTERNAL_CHECK(it != saved_.end(), "stage ", layout_.index, ": backward of microbatch ", mb,
                       " without its forward");
  Saved& s = it->second;
  at::Tensor dh = layout_.head ? s.dh : dout;
  s.dh = at::Tensor();
  TITAN_INTERNAL_CHECK(dh.defined(), "stage ", layout_.index,
                       ": backward without the gradient of its output");
  if (!with_weight) {
    s.deferred.resize(static_cast<size_t>(layout_.layers));
    s.weight_pending = true;
  }
  const model::Rope* rope = layout_.layers > 0 ? &rope_for(dh, mb) : nullptr;
  for (int k = layout_.layers - 1; k >= 0; --k) {
    RECORD_USER_SCOPE("titan/backward_block");
    select_slice(mb, k);
    const size_t pos = first_block_ + static_cast<size_t>(k);
    if (k > 0) fsdp_.prefetch(units_[pos - 1]);
    const size_t unit = units_[pos];
    const auto w = model::block_views(fsdp_.unit(unit).layout, fsdp_.gathered(unit));
    bool acc = false;
    const auto g = model::block_views(fsdp_.unit(unit).layout, fsdp_.full_grad(unit, &acc));
    dh = model::block_backward(args_, block_plan_, w, *rope, dh, s.blocks[static_cast<size_t>(k)],
                               g, acc, with_weight ? nullptr : &s.deferred[static_cast<size_t>(k)]);
    if (with_weight) weight_done(unit);
    release_after_use(unit, backwards_done_);
  }
  s.blocks.clear();
  if (slicer_ && mb % static_cast<int>(options_.token_slices.size()) == 0) {
    // The sequence's first slice: nothing reads its keys and values any more.
    slice_kv_.erase(mb / static_cast<int>(options_.token_slices.size()));
    slicer_->use(nullptr, 0, 0);
  }
  if (layout_.embedding) {
    if (with_weight) {
      embed_backward(dh, s.tokens);
    } else {
      s.embed_grad = dh;
    }
    dh = at::Tensor();
  }
  ++backwards_done_;
  if (with_weight) saved_.erase(it);
  return dh;
}

void Stage::backward_weight(int mb) {
  auto it = saved_.find(mb);
  TITAN_INTERNAL_CHECK(it != saved_.end() && it->second.weight_pending, "stage ", layout_.index,
                       ": weight gradient of microbatch ", mb, " without its input gradient");
  Saved& s = it->second;
  for (int k = layout_.layers - 1; k >= 0; --k) {
    const size_t unit = units_[first_block_ + static_cast<size_t>(k)];
    bool acc = false;
    const auto g = model::block_views(fsdp_.unit(unit).layout, fsdp_.full_grad(unit, &acc));
    model::block_backward_weight(block_plan_, s.deferred[static_cast<size_t>(k)], g, acc);
    weight_done(unit);
  }
  if (layout_.embedding) embed_backward(s.embed_grad, s.tokens);
  saved_.erase(it);
}

at::Tensor Stage::forward_eval(const at::Tensor& input, const at::Tensor& labels) {
  at::Tensor h = input;
  if (layout_.embedding) {
    h = embed(input);
    fsdp_.release(units_.front(), /*after_forward=*/false);
  }
  h = blocks_forward(h, nullptr, -1);
  if (!layout_.head) return h;
  auto res = head(h, labels, 0.0, /*compute_grad=*/false);
  fsdp_.release(units_.back(), /*after_forward=*/false);
  return res.loss_sum;
}

}  // namespace titan::parallel::pipeline
