// Context parallelism (ring attention) over the mesh's cp group, as torchtitan's for Llama:
// each cp rank holds part of every sequence and everything but attention runs on its own
// tokens. The sequence is cut into chunks; with head-tail load balancing (the default) into
// 2 x cp chunks of which rank r holds r and 2cp - 1 - r, so every rank does the same causal
// work; without (load_balancer "none") into cp contiguous chunks. Attention of the rank's query
// chunks needs every earlier key: "allgather" gathers the keys/values of all ranks, computes,
// and reduce-scatters their gradients back; "alltoall" passes them around a ring (each step's
// block computes while the next block moves), with their gradient accumulators travelling
// along in the backward. Partial results merge through their log-sum-exp.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "titan/model/llama.h"
#include "titan/ops/attention.h"

#include "titan/dist/communicator.h"

namespace titan::parallel {

class ContextParallel final : public ops::Attention {
 public:
  // `comm`: the cp group (size > 1); rotate: "allgather" or "alltoall"; load_balancer:
  // "headtail" or "none".
  ContextParallel(dist::Communicator* comm, std::string rotate, std::string load_balancer);

  int64_t size() const;
  int64_t rank() const;
  // Chunks a sequence is cut into, and the chunk ids rank `r` holds (in the order its tokens
  // are laid out).
  int64_t chunks() const;
  std::vector<int64_t> chunks_of(int64_t r) const;
  // The whole sequence's positions this rank holds, for a sequence of seq_len (Long, [S / cp]).
  at::Tensor positions(int64_t seq_len, const c10::Device& device) const;
  // x [B, S, ...] -> this rank's tokens [B, S / cp, ...].
  at::Tensor shard(const at::Tensor& x) const;
  // The RoPE tables of this rank's positions, from the whole sequence's.
  model::Rope local_rope(const model::Rope& whole) const;
  // (query, key) pairs rank r's causal attention computes for a sequence of seq_len (the
  // load-balance check).
  int64_t causal_pairs(int64_t seq_len, int64_t r) const;

  // ops::Attention over this rank's tokens q [B, S/cp, H, hd], k/v [B, S/cp, Hkv, hd].
  at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     ops::AttentionSaved& saved) const override;
  void bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   ops::AttentionSaved& saved) const override;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dout,
                                                          const ops::AttentionSaved& saved,
                                                          int64_t n_kv_heads) const override;

 private:
  // Every rank's k|v [cp, 2, B, S/cp, Hkv, hd] (allgather).
  at::Tensor gather_kv(const at::Tensor& k, const at::Tensor& v) const;
  // One step of the ring: sends `out` to rank r + 1 and receives the same shape from r - 1
  // into `in` (allocated here), asynchronously.
  dist::WorkPtr ring_step(const at::Tensor& out, at::Tensor& in) const;
  dist::Communicator* comm_;
  std::string rotate_;
  bool head_tail_;
};

}  // namespace titan::parallel
