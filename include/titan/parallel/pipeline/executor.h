// The one runtime of every pipeline schedule: it walks this rank's actions in order, runs the
// compute ones on its stages, and moves activations and gradients between ranks with
// asynchronous sends and receives (each receive posted at its place in the action list; sends
// complete while later computations run).
// Between stages on the same rank (a V's turn, looped stages) tensors are handed over locally.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <vector>

#include "titan/parallel/pipeline/schedule.h"
#include "titan/parallel/pipeline/stage.h"

namespace titan::dist {
class Communicator;
}

namespace titan::parallel::pipeline {

// Where to send to (or receive from) pipeline rank `pp_rank`: a communicator and the peer's
// rank in it.
struct PipeLink {
  dist::Communicator* comm = nullptr;
  int peer = 0;
};
using LinkFn = std::function<PipeLink(int pp_rank, bool send)>;

class Executor {
 public:
  // `stages`: this rank's stages by global index. `dim`: the model width (activation shape
  // [microbatch, seq_len / seq_shards, dim]: sequence parallel moves token shards); `dtype`:
  // the compute dtype of activations and their gradients.
  // With context parallel (`cp`), stages see this rank's chunks of each sequence.
  Executor(Schedule schedule, int pp_rank, std::map<int, Stage*> stages, LinkFn links, int64_t dim,
           at::ScalarType dtype, int64_t seq_shards = 1, const ContextParallel* cp = nullptr);

  // One pass of the schedule over `microbatches` (token windows [B, S + 1] on the device; the
  // first stage reads the inputs, the last the labels). The last stage adds its token-loss sums
  // to `loss_sum`; gradients are scaled by `grad_scale`.
  void run(const std::vector<at::Tensor>& microbatches, double grad_scale, at::Tensor& loss_sum);
  // Forward only, with `eval_schedule` (validation): the loss sums go to `loss_sum`.
  void run_eval(const Schedule& eval_schedule, const std::vector<at::Tensor>& microbatches,
                at::Tensor& loss_sum);

  const Schedule& schedule() const { return schedule_; }

 private:
  void execute(const Schedule& s, const std::vector<at::Tensor>& microbatches, double grad_scale,
               at::Tensor& loss_sum, bool eval);
  Schedule schedule_;
  int rank_;
  std::map<int, Stage*> stages_;
  LinkFn links_;
  int64_t dim_;
  at::ScalarType dtype_;
  int64_t seq_shards_;
  const ContextParallel* cp_;
};

// Forward-only schedule (validation): every microbatch through the stages in order.
Schedule build_eval_schedule(int pp, int stages, int microbatches,
                             const std::vector<int>& stage_rank);

}  // namespace titan::parallel::pipeline
