// Forward/backward orchestration over units: embedding, blocks, fused head + loss.
#include "titan/train/model_runner.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "titan/ops/cross_entropy.h"
#include "titan/ops/rope.h"
#include "titan/util/strings.h"

namespace titan::train {

model::SavePolicy ActivationPolicy::for_layer(int64_t layer) const {
  if (mode == "none") return model::SavePolicy::All;
  if (mode == "full") return model::SavePolicy::InputOnly;
  if (option == "op") return model::SavePolicy::Matmuls;
  int64_t k = 1;
  util::parse_int(option, k);
  return (layer + 1) % k == 0 ? model::SavePolicy::InputOnly : model::SavePolicy::All;
}

ModelRunner::ModelRunner(model::LlamaArgs args, parallel::FsdpModel& fsdp, ActivationPolicy ac)
    : args_(std::move(args)), fsdp_(fsdp), ac_(std::move(ac)) {
  compute_dtype_ = fsdp_.options().param_dtype;
}

const model::Rope& ModelRunner::rope_for(int64_t seq_len, const c10::Device& device) {
  auto it = ropes_.find(seq_len);
  if (it == ropes_.end()) {
    auto [c, s] = ops::rope_tables(args_, seq_len, at::TensorOptions().device(device));
    it = ropes_.emplace(seq_len, model::Rope{c, s}).first;
  }
  return it->second;
}

at::Tensor ModelRunner::embed(const at::Tensor& inputs) {
  // With unsharded storage the fp32 table is read directly: no full-table cast per step.
  const auto& u = fsdp_.unit(0);
  const int64_t v = args_.vocab_size, d = args_.dim;
  const bool local = fsdp_.dp_shard_size() == 1 && u.master.device() == fsdp_.device();
  at::Tensor table = local ? u.master : fsdp_.gather(0);
  at::Tensor h =
      model::embedding_forward(table.narrow(0, 0, v * d).view({v, d}), inputs, compute_dtype_);
  fsdp_.release(0, /*after_forward=*/true);
  return h;
}

at::Tensor ModelRunner::blocks_forward(at::Tensor h, std::vector<model::BlockSaved>* saved) {
  const model::Rope& rope = rope_for(h.size(1), h.device());
  const size_t first = 1, last = 1 + static_cast<size_t>(args_.n_layers);
  for (size_t i = first; i < last; ++i) {
    fsdp_.prefetch(i + 1);
    const auto w = model::block_views(fsdp_.unit(i).layout, fsdp_.gather(i));
    const int64_t layer = static_cast<int64_t>(i - first);
    if (saved) {
      h = model::block_forward(args_, w, rope, h, ac_.for_layer(layer), (*saved)[i - first]);
    } else {
      model::BlockSaved scratch;
      h = model::block_forward(args_, w, rope, h, model::SavePolicy::InputOnly, scratch);
    }
    fsdp_.release(i, /*after_forward=*/true);
  }
  return h;
}

at::Tensor ModelRunner::forward_backward(const at::Tensor& tokens, double grad_scale,
                                         bool last_microbatch) {
  const int64_t b = tokens.size(0), seq = tokens.size(1) - 1, d = args_.dim;
  const int64_t v = args_.vocab_size;
  at::Tensor inputs = tokens.narrow(1, 0, seq);
  at::Tensor labels = tokens.narrow(1, 1, seq).reshape({-1});
  const size_t head = fsdp_.num_units() - 1;

  std::vector<model::BlockSaved> saved(static_cast<size_t>(args_.n_layers));
  fsdp_.prefetch(1);
  at::Tensor h;
  {
    RECORD_USER_SCOPE("titan/forward");
    h = blocks_forward(embed(inputs), &saved);
  }
  RECORD_USER_SCOPE("titan/head_loss_and_backward");

  // Head: norm + output + loss, and their backward, in one pass.
  const auto& hl = fsdp_.unit(head).layout;
  const auto& norm_slot = hl.param("norm.weight");
  const auto& out_slot = hl.param("output.weight");
  const at::Tensor& hw = fsdp_.gather(head);
  bool acc = false;
  at::Tensor& hg = fsdp_.full_grad(head, &acc);
  at::Tensor norm_grad = hg.narrow(0, norm_slot.offset, d);
  at::Tensor out_grad = hg.narrow(0, out_slot.offset, v * d).view({v, d});
  auto res = ops::head_forward_backward(h.reshape({b * seq, d}), hw.narrow(0, norm_slot.offset, d),
                                        hw.narrow(0, out_slot.offset, v * d).view({v, d}), labels,
                                        args_.norm_eps, grad_scale, &norm_grad, &out_grad,
                                        /*compute_grad=*/true, acc);
  h = at::Tensor();
  fsdp_.reduce_grad(head, last_microbatch);
  fsdp_.release(head, /*after_forward=*/false);

  // Blocks, last to first.
  const model::Rope& rope = rope_for(seq, tokens.device());
  at::Tensor dh = res.dh.view({b, seq, d});
  for (size_t i = static_cast<size_t>(args_.n_layers); i >= 1; --i) {
    RECORD_USER_SCOPE("titan/backward_block");
    if (i > 1) fsdp_.prefetch(i - 1);
    const auto w = model::block_views(fsdp_.unit(i).layout, fsdp_.gather(i));
    const auto g = model::block_views(fsdp_.unit(i).layout, fsdp_.full_grad(i, &acc));
    dh = model::block_backward(args_, w, rope, dh, saved[i - 1], g, acc);
    fsdp_.reduce_grad(i, last_microbatch);
    fsdp_.release(i, /*after_forward=*/false);
  }
  // Embedding: scatter-add of the input gradient; needs no weights.
  at::Tensor& eg = fsdp_.full_grad(0, &acc);
  at::Tensor table_grad = eg.narrow(0, 0, v * d).view({v, d});
  model::embedding_backward(dh, inputs, table_grad, acc);
  fsdp_.reduce_grad(0, last_microbatch);
  fsdp_.release(0, /*after_forward=*/false);
  return res.loss_sum;
}

at::Tensor ModelRunner::forward_loss(const at::Tensor& tokens) {
  const int64_t b = tokens.size(0), seq = tokens.size(1) - 1, d = args_.dim;
  const int64_t v = args_.vocab_size;
  at::Tensor inputs = tokens.narrow(1, 0, seq);
  at::Tensor labels = tokens.narrow(1, 1, seq).reshape({-1});
  const size_t head = fsdp_.num_units() - 1;
  fsdp_.prefetch(1);
  at::Tensor h = blocks_forward(embed(inputs), nullptr);
  const auto& hl = fsdp_.unit(head).layout;
  const at::Tensor& hw = fsdp_.gather(head);
  auto res = ops::head_forward_backward(
      h.reshape({b * seq, d}), hw.narrow(0, hl.param("norm.weight").offset, d),
      hw.narrow(0, hl.param("output.weight").offset, v * d).view({v, d}), labels, args_.norm_eps,
      0.0, nullptr, nullptr, /*compute_grad=*/false);
  fsdp_.release_all();
  return res.loss_sum;
}

}  // namespace titan::train
