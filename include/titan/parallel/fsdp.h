// Parameter ownership of the data-parallel dims: every unit of the model (embedding, each
// block, head) is one flat buffer, sharded over dp_shard and replicated over dp_replicate.
//
//   world of one rank: the "shard" is the whole unit; gathering casts it to the compute dtype
//   DDP  (dp_shard = 1, dp_replicate = R): full copies; gradients all-reduced (averaged)
//   FSDP (dp_shard = N): rank r keeps elements [r*S, (r+1)*S) of the flat unit (S = ceil(n/N),
//        padded); all-gather before use, reduce-scatter of gradients after backward
//   HSDP (both): FSDP within dp_shard, then all-reduce of the gradient shards over dp_replicate
//
// Why flat buffers rather than per-parameter dim-0 shards: a unit's gather is one contiguous
// all-gather whose output is directly the unit's full weights (no copy-in/copy-out), the fused
// projections (q|k|v, w1|w3) are single matrices, and the optimizer sees one tensor per unit.
// Per-parameter metadata (name, shape, flat offset) still says exactly which slice of which
// parameter a rank holds, which is what checkpoints need. Tensor parallel composes by making
// the unit out of TP-local parameter shapes before flattening.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "titan/model/layout.h"

namespace titan::dist {
class Communicator;
class Work;
}  // namespace titan::dist

namespace titan::parallel {

// The part of one parameter held in this rank's shard of its unit.
struct ShardSlice {
  size_t unit = 0;
  const model::ParamSlot* param = nullptr;
  int64_t shard_offset = 0;  // first element inside the unit's shard
  int64_t param_offset = 0;  // first element inside the flattened parameter
  int64_t numel = 0;
};

struct FsdpOptions {
  at::ScalarType param_dtype = at::kFloat;   // compute dtype of gathered weights
  at::ScalarType reduce_dtype = at::kFloat;  // dtype of gradient reductions
  // Per unit: free the gathered weights after the unit's forward (the plan decides; empty:
  // every unit does).
  std::vector<bool> reshard_after_forward;
  // Pipelines: a unit's full gradient accumulates over the step's microbatches and is reduced
  // once, after its last one (otherwise every microbatch's gradient is reduced at once).
  bool accumulate_across_microbatches = false;
  bool cpu_offload = false;  // shards and optimizer state in pinned host memory
  // Keep the shard in param_dtype on the device between steps (the optimizer writes it); when
  // false, unsharded units are cast from the fp32 master at each use instead.
  bool persistent_compute_weights = true;
  // Float8 all-gather (quantize.linear.float8.enable_fsdp_float8_all_gather): per unit, the
  // matrices gathered as float8 e4m3 with one tensorwise scale each (from the global amax, an
  // all-reduce over dp_shard), at half the bytes; the unit's other parameters are gathered in
  // param_dtype. Empty, or an empty entry: the unit is gathered in param_dtype. Without a
  // dp_shard group the same float8 unit is cast from the masters at each gather (single rank,
  // weights cast per use).
  std::vector<std::vector<model::ElementRange>> float8_ranges;
  // Every unit's amaxes in one all-reduce at the step's first gather
  // (precompute_float8_dynamic_scale_for_fsdp); otherwise one per unit at its first gather.
  bool float8_precompute_scales = false;
  // Tensor parallel: the tp group. The gradients of parameters every tp rank holds whole (the
  // norms: each rank saw only its token shard) are summed over it once per step, and the
  // gradient norm counts them once.
  dist::Communicator* tensor_parallel = nullptr;
};

// One unit's storage on this rank.
struct UnitState {
  model::UnitLayout layout;
  int64_t shard_numel = 0;  // elements this rank owns (padded length / dp_shard)
  int64_t shard_begin = 0;  // first flat element this rank owns
  at::Tensor master;        // fp32 [shard_numel]: the optimizer's parameter
  at::Tensor grad;          // fp32 [shard_numel]: accumulated, reduced gradient
  at::Tensor shadow;        // the shard in param_dtype on the device (when that differs from
                            // the fp32 master); rewritten by the optimizer every step
  at::Tensor full;          // gathered weights [numel] in param_dtype while materialized
  at::Tensor full_grad;     // fp32 [numel] gradient of the full unit during its backward
  // Float8 all-gather: the gathered float8 matrices (e4m3 [padded numel]), the other
  // parameters back to back (param_dtype), and the global amax of each matrix for the current
  // weights (undefined until computed after a weight change).
  at::Tensor full8, rest, float8_amax, float8_inv_scales;
  // This rank's amax of each float8 matrix as the optimizer took it while writing the weights
  // (fp32 [matrices], zero where the rank holds none of one); `stepped_amax_fresh`: it holds
  // the current weights' (set after each optimizer step, cleared by refresh_shadows()).
  at::Tensor stepped_amax;
  bool stepped_amax_fresh = false;
  bool gathered = false;
};

class FsdpModel {
 public:
  // `shard` / `replicate`: communicators of the dp_shard and dp_replicate dims (nullptr for
  // size 1). `device`: where compute happens.
  FsdpModel(std::vector<model::UnitLayout> units, dist::Communicator* shard,
            dist::Communicator* replicate, c10::Device device, FsdpOptions options);
  ~FsdpModel();

  // Allocates this rank's shards and initializes them (same full weights for any mesh).
  void init_weights(int64_t seed);

  size_t num_units() const { return units_.size(); }
  const UnitState& unit(size_t i) const { return units_[i]; }
  UnitState& unit(size_t i) { return units_[i]; }

  // Full weights of unit i in the compute dtype (gathers if needed; waits for a prefetch).
  // Units gathered in float8 have no such tensor: use gathered().
  const at::Tensor& gather(size_t i);
  // Unit i's gathered weights in either form.
  model::GatheredUnit gathered(size_t i);
  bool gathers_float8(size_t i) const;
  // Starts gathering unit i in the background (no-op where nothing needs communicating).
  void prefetch(size_t i);
  // Frees unit i's gathered weights; after a forward only if the unit reshards after forward.
  void release(size_t i, bool after_forward);
  bool reshard_after_forward(size_t i) const;
  // Frees every gathered unit (after a forward-only pass; weights change at the next step).
  void release_all();

  // fp32 buffer the unit's full gradient goes into during its backward. `accumulate` tells
  // whether its contents must be added to (a later micro-batch of an unsharded unit, or any
  // write when accumulating across microbatches) or may be overwritten (every parameter's
  // gradient written once; alignment gaps are kept zero).
  at::Tensor& full_grad(size_t i, bool* accumulate);
  // The unit's backward is done for this micro-batch: reduce its gradient into the shard
  // (`last_microbatch`: DDP/HSDP replicas reduce only then; when accumulating across
  // microbatches nothing is reduced before it).
  void reduce_grad(size_t i, bool last_microbatch);
  // Waits for every outstanding reduction (and sums tp-replicated gradients over tp);
  // afterwards unit(i).grad is final.
  void finish_grad_reduction();
  // optimizer.early_step_in_backward: `on_final(unit, work)` runs once per unit and step, as
  // soon as the step's last microbatch has been reduced into the unit's gradient: after
  // work->wait() (when `work` is set: the replicate all-reduce still in flight) and
  // sum_tp_replicated_grads(unit), unit(unit).grad is final. Not with CPU offload.
  using GradFinal = std::function<void(size_t unit, const std::shared_ptr<dist::Work>& work)>;
  void set_on_grad_final(GradFinal on_final);
  // Sums unit i's tp-replicated gradients over tp (once per step; finish_grad_reduction()
  // does it for the units not done yet).
  void sum_tp_replicated_grads(size_t i);
  // Zeroes shard gradients for the next step.
  void zero_grad();
  // The masters/shadows were rewritten (optimizer step, loads): gathered weights and float8
  // scales are stale.
  void weights_changed();

  // Unit i's float8 matrices in this rank's shard: [offset in the shard, elements, matrix
  // index], for an optimizer that takes their amax as it writes them (empty: none).
  struct Float8Piece {
    int64_t offset = 0, numel = 0, matrix = 0;
  };
  std::vector<Float8Piece> float8_pieces(size_t i) const;
  // unit(i).stepped_amax, allocated (zeros) at the first call.
  const at::Tensor& stepped_float8_amax(size_t i);
  // After an optimizer step: whether it wrote unit i's stepped_amax for the weights it just
  // wrote (`fresh`: the next scales come from it, with no pass over the weights).
  void float8_amax_stepped(size_t i, bool fresh);

  // Compute-dtype copies of the shards, one per unit (undefined where the master serves).
  std::vector<at::Tensor> shadows() const;
  // Recasts the shadows from the masters (after masters changed outside the optimizer:
  // initialization, checkpoint or HF loads).
  void refresh_shadows();
  // Every (parameter, element range) this rank holds, unit by unit.
  std::vector<ShardSlice> shard_slices() const;
  std::vector<at::Tensor> master_shards() const;
  std::vector<at::Tensor> grad_shards() const;
  // Sum of squares of the local gradient shards; reduced across shard, replicate and tp ranks
  // (each element of the model counted once).
  at::Tensor grad_norm_squared() const;

  int64_t dp_shard_size() const;
  int64_t dp_shard_rank() const;
  const FsdpOptions& options() const { return options_; }
  c10::Device device() const { return device_; }

 private:
  void fold_pending();
  // Float8 all-gather: global amaxes of unit i's matrices (or of every unit's).
  void compute_float8_amax(const std::vector<size_t>& units);
  void start_float8_gather(size_t i);
  // Sums tp-replicated gradients over tp: of unit `only`, or of every unit not summed yet.
  void sum_replicated_grads_over_tp(std::optional<size_t> only = std::nullopt);
  void grad_final(size_t i, const std::shared_ptr<dist::Work>& work);
  // Records an issued collective; blocks the host while too many are outstanding.
  void throttle(const std::shared_ptr<dist::Work>& work);
  struct Impl;
  std::vector<UnitState> units_;
  dist::Communicator* shard_;
  dist::Communicator* replicate_;
  c10::Device device_;
  FsdpOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace titan::parallel
