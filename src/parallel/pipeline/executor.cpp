// Executes a schedule's actions on this rank's stages, with asynchronous point-to-point
// transfers between pipeline ranks.
#include "titan/parallel/pipeline/executor.h"

#include "titan/parallel/context_parallel.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <tuple>

#include "titan/dist/communicator.h"
#include "titan/util/error.h"

namespace titan::parallel::pipeline {
namespace {

// A tensor travelling between stages, keyed by the stage that consumes it.
using Slot = std::tuple<bool, int, int>;  // (gradient, consumer stage, microbatch)

struct InFlight {
  dist::WorkPtr work;
  at::Tensor tensor;
};

bool is_recv(ActionType t) {
  return t == ActionType::RecvActivation || t == ActionType::RecvGradient;
}
bool is_send(ActionType t) {
  return t == ActionType::SendActivation || t == ActionType::SendGradient;
}

}  // namespace

Schedule build_eval_schedule(int pp, int stages, int microbatches,
                             const std::vector<int>& stage_rank) {
  Schedule s;
  s.name = "forward-only";
  s.pp = pp;
  s.stages = stages;
  s.microbatches = microbatches;
  s.stage_rank = stage_rank;
  s.actions.resize(static_cast<size_t>(pp));
  for (int mb = 0; mb < microbatches; ++mb) {
    for (int st = 0; st < stages; ++st) {
      const int r = stage_rank[static_cast<size_t>(st)];
      Action a;
      a.type = ActionType::Forward;
      a.stage = st;
      a.microbatch = mb;
      auto& list = s.actions[static_cast<size_t>(r)];
      if (st > 0 && stage_rank[static_cast<size_t>(st - 1)] != r) {
        Action recv = a;
        recv.type = ActionType::RecvActivation;
        recv.peer = stage_rank[static_cast<size_t>(st - 1)];
        list.push_back(recv);
      }
      list.push_back(a);
      if (st + 1 < stages && stage_rank[static_cast<size_t>(st + 1)] != r) {
        Action send = a;
        send.type = ActionType::SendActivation;
        send.peer = stage_rank[static_cast<size_t>(st + 1)];
        list.push_back(send);
      }
    }
  }
  return s;
}

Executor::Executor(Schedule schedule, int pp_rank, std::map<int, Stage*> stages, LinkFn links,
                   int64_t dim, at::ScalarType dtype, int64_t seq_shards, const ContextParallel* cp)
    : schedule_(std::move(schedule)),
      rank_(pp_rank),
      stages_(std::move(stages)),
      links_(std::move(links)),
      dim_(dim),
      dtype_(dtype),
      seq_shards_(seq_shards),
      cp_(cp) {
  for (int st : schedule_.stages_of(rank_)) {
    TITAN_INTERNAL_CHECK(stages_.count(st), "pipeline rank ", rank_, " misses stage ", st);
  }
}

void Executor::run(const std::vector<at::Tensor>& microbatches, double grad_scale,
                   at::Tensor& loss_sum) {
  TITAN_INTERNAL_CHECK(
      static_cast<int>(microbatches.size()) * schedule_.slices == schedule_.microbatches,
      "pipeline pass of ", microbatches.size(), " microbatches for a schedule of ",
      schedule_.microbatches, " (", schedule_.slices, " token slices each)");
  execute(schedule_, microbatches, grad_scale, loss_sum, /*eval=*/false);
}

void Executor::run_eval(const Schedule& eval_schedule, const std::vector<at::Tensor>& microbatches,
                        at::Tensor& loss_sum) {
  execute(eval_schedule, microbatches, 0.0, loss_sum, /*eval=*/true);
}

void Executor::execute(const Schedule& s, const std::vector<at::Tensor>& microbatches,
                       double grad_scale, at::Tensor& loss_sum, bool eval) {
  const auto& list = s.actions[static_cast<size_t>(rank_)];
  std::map<Slot, at::Tensor> ready;    // handed over locally or received and waited for
  std::map<Slot, InFlight> receiving;  // posted receives
  std::vector<InFlight> sending;       // sends not known to be done
  std::vector<bool> posted(list.size(), false);

  auto slot_of = [](const Action& a) {
    // Receives name the consuming stage; sends the producing one.
    switch (a.type) {
      case ActionType::RecvActivation: return Slot{false, a.stage, a.microbatch};
      case ActionType::RecvGradient: return Slot{true, a.stage, a.microbatch};
      case ActionType::SendActivation: return Slot{false, a.stage + 1, a.microbatch};
      default: return Slot{true, a.stage - 1, a.microbatch};  // SendGradient
    }
  };
  // Schedule microbatch u: token window [B, S + 1] of sequence batch u / slices, and the slice's
  // first token and length.
  std::vector<int64_t> slice_start(1, 0);
  for (int64_t len : s.slice_lengths) slice_start.push_back(slice_start.back() + len);
  struct Piece {
    const at::Tensor* tokens;
    int64_t offset, len;
  };
  auto piece = [&](int u) {
    const at::Tensor& tokens = microbatches[static_cast<size_t>(u / s.slices)];
    if (s.slices == 1) return Piece{&tokens, 0, tokens.size(1) - 1};
    const auto j = static_cast<size_t>(u % s.slices);
    return Piece{&tokens, slice_start[j], s.slice_lengths[j]};
  };
  auto post_recv = [&](size_t i) {
    if (posted[i]) return;
    posted[i] = true;
    const Action& a = list[i];
    const Piece p = piece(a.microbatch);
    at::Tensor buf = at::empty({p.tokens->size(0), p.len / seq_shards_, dim_},
                               p.tokens->options().dtype(dtype_));
    const PipeLink link = links_(a.peer, /*send=*/false);
    dist::P2POp op;
    op.kind = dist::P2POp::Kind::Recv;
    op.tensor = buf;
    op.peer = link.peer;
    receiving[slot_of(a)] = {link.comm->send_recv({op}, /*async=*/true), buf};
  };
  auto take = [&](const Slot& slot) -> at::Tensor {
    if (auto it = ready.find(slot); it != ready.end()) {
      at::Tensor t = it->second;
      ready.erase(it);
      return t;
    }
    auto it = receiving.find(slot);
    TITAN_INTERNAL_CHECK(it != receiving.end(), "pipeline rank ", rank_, " needs ",
                         std::get<0>(slot) ? "the gradient" : "the activation", " of stage ",
                         std::get<1>(slot), ", microbatch ", std::get<2>(slot),
                         " that was neither computed here nor received");
    it->second.work->wait();
    at::Tensor t = it->second.tensor;
    receiving.erase(it);
    return t;
  };

  for (size_t i = 0; i < list.size(); ++i) {
    const Action& a = list[i];
    // Receives are posted where the schedule places them (before the computation that
    // consumes them, or earlier where the sender's order on the link requires), never hoisted
    // further: over NCCL, receives hoisted one computation ahead deadlocked 1F1B at pp 2 on two
    // H200s in the first step, with 8 or 32 hardware queues alike. In list order every schedule
    // is deadlock-free with receives that block and sends that do not (the schedule validator
    // checks exactly that); sends still overlap the receiver's computation.
    if (is_recv(a.type)) {
      post_recv(i);
      continue;
    }
    if (is_send(a.type)) {
      const Slot slot = slot_of(a);
      auto it = ready.find(slot);
      TITAN_INTERNAL_CHECK(it != ready.end(), "pipeline rank ", rank_, " sends ", a.str(),
                           " before computing it");
      const PipeLink link = links_(a.peer, /*send=*/true);
      dist::P2POp op;
      op.kind = dist::P2POp::Kind::Send;
      op.tensor = it->second;
      op.peer = link.peer;
      sending.push_back({link.comm->send_recv({op}, /*async=*/true), it->second});
      ready.erase(it);
      // Sends finish on their own; forget those already done.
      while (!sending.empty() && sending.front().work->completed()) {
        sending.front().work->wait();
        sending.erase(sending.begin());
      }
      continue;
    }
    Stage& stage = *stages_.at(a.stage);
    switch (a.type) {
      case ActionType::Forward: {
        // Context parallel: this rank's chunks of the inputs and of their next-token labels.
        auto mine = [&](const at::Tensor& t) { return cp_ ? cp_->shard(t) : t; };
        const Piece p = piece(a.microbatch);
        const at::Tensor input = stage.layout().embedding
                                     ? mine(p.tokens->narrow(1, p.offset, p.len))
                                     : take({false, a.stage, a.microbatch});
        at::Tensor labels;
        if (stage.layout().head)
          labels = mine(p.tokens->narrow(1, p.offset + 1, p.len)).reshape({-1});
        at::Tensor out;
        if (eval) {
          out = stage.forward_eval(input, labels);
          if (stage.layout().head) {
            loss_sum.add_(out);
            out = at::Tensor();
          }
        } else {
          out = stage.forward(a.microbatch, input, labels, grad_scale, loss_sum);
        }
        if (!stage.layout().head) ready[{false, a.stage + 1, a.microbatch}] = out;
        break;
      }
      case ActionType::Backward:
      case ActionType::BackwardInput: {
        at::Tensor dout;
        if (!stage.layout().head) dout = take({true, a.stage, a.microbatch});
        at::Tensor dx = stage.backward(a.microbatch, dout, a.type == ActionType::Backward);
        if (!stage.layout().embedding) ready[{true, a.stage - 1, a.microbatch}] = dx;
        break;
      }
      case ActionType::BackwardWeight: stage.backward_weight(a.microbatch); break;
      default: break;
    }
  }
  for (auto& f : sending) f.work->wait();
  TITAN_INTERNAL_CHECK(receiving.empty() && ready.empty(), "pipeline rank ", rank_,
                       " ends a pass with ", receiving.size(), " receives and ", ready.size(),
                       " tensors unused");
}

}  // namespace titan::parallel::pipeline
