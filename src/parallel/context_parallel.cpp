// Ring attention over the cp group: chunk layout, positions, and the attention of this rank's
// query chunks against every rank's key/value chunks (all-gathered or passed around a ring).
#include "titan/parallel/context_parallel.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "titan/dist/communicator.h"
#include "titan/util/error.h"

namespace titan::parallel {

ContextParallel::ContextParallel(dist::Communicator* comm, std::string rotate,
                                 std::string load_balancer)
    : comm_(comm), rotate_(std::move(rotate)), head_tail_(load_balancer == "headtail") {
  TITAN_INTERNAL_CHECK(comm_ && comm_->size() > 1, "context parallel without a cp group");
  TITAN_INTERNAL_CHECK(rotate_ == "allgather" || rotate_ == "alltoall", "rotate method ", rotate_);
}

int64_t ContextParallel::size() const {
  return comm_->size();
}
int64_t ContextParallel::rank() const {
  return comm_->rank();
}
int64_t ContextParallel::chunks() const {
  return head_tail_ ? 2 * size() : size();
}

std::vector<int64_t> ContextParallel::chunks_of(int64_t r) const {
  if (!head_tail_) return {r};
  return {r, 2 * size() - 1 - r};
}

at::Tensor ContextParallel::positions(int64_t seq_len, const c10::Device& device) const {
  const int64_t c = seq_len / chunks();
  std::vector<at::Tensor> parts;
  for (int64_t id : chunks_of(rank())) {
    parts.push_back(at::arange(id * c, (id + 1) * c, at::TensorOptions().dtype(at::kLong)));
  }
  return at::cat(parts).to(device);
}

at::Tensor ContextParallel::shard(const at::Tensor& x) const {
  return x.index_select(1, positions(x.size(1), x.device()));
}

model::Rope ContextParallel::local_rope(const model::Rope& whole) const {
  const at::Tensor pos = positions(whole.cos.size(0), whole.cos.device());
  return {whole.cos.index_select(0, pos).contiguous(), whole.sin.index_select(0, pos).contiguous()};
}

int64_t ContextParallel::causal_pairs(int64_t seq_len, int64_t r) const {
  const int64_t c = seq_len / chunks();
  int64_t pairs = 0;
  // Chunk i's queries see every key of chunks 0..i-1 and the causal triangle of their own.
  for (int64_t id : chunks_of(r)) pairs += id * c * c + c * (c + 1) / 2;
  return pairs;
}

namespace {

// Chunk `half` of a rank's tokens [B, L, ...] (dim 1), of `n` per rank.
at::Tensor part(const at::Tensor& x, int64_t half, int64_t n) {
  const int64_t c = x.size(1) / n;
  return x.narrow(1, half * c, c);
}

// Running result of one query chunk.
struct Partial {
  at::Tensor out, lse;
};

}  // namespace

at::Tensor ContextParallel::gather_kv(const at::Tensor& k, const at::Tensor& v) const {
  RECORD_USER_SCOPE("titan/cp_all_gather_kv");
  at::Tensor kv = at::stack({k, v}).contiguous();
  auto sizes = kv.sizes().vec();
  sizes.insert(sizes.begin(), size());
  at::Tensor all = at::empty(sizes, kv.options());
  comm_->all_gather_into(all, kv);
  return all;
}

dist::WorkPtr ContextParallel::ring_step(const at::Tensor& out, at::Tensor& in) const {
  const int next = static_cast<int>((rank() + 1) % size());
  const int prev = static_cast<int>((rank() + size() - 1) % size());
  in = at::empty_like(out);
  return comm_->send_recv(
      {{dist::P2POp::Kind::Send, out, next}, {dist::P2POp::Kind::Recv, in, prev}},
      /*async=*/true);
}

void ContextParallel::bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  ops::AttentionSaved& saved) const {
  saved.q = q;
  saved.k = k;
  saved.v = v;
}

at::Tensor ContextParallel::forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    ops::AttentionSaved& saved) const {
  RECORD_USER_SCOPE("titan/cp_attention");
  bind_inputs(q, k, v, saved);
  const auto mine = chunks_of(rank());
  const int64_t n = static_cast<int64_t>(mine.size());
  std::vector<Partial> acc(mine.size());
  // The blocks of one owner's key/value chunks against this rank's query chunks.
  auto attend = [&](const at::Tensor& ko, const at::Tensor& vo, int64_t owner) {
    const auto theirs = chunks_of(owner);
    for (int64_t qi = 0; qi < n; ++qi) {
      for (int64_t kj = 0; kj < n; ++kj) {
        const int64_t qid = mine[static_cast<size_t>(qi)], kid = theirs[static_cast<size_t>(kj)];
        if (kid > qid) continue;  // later keys: masked out
        auto [o, l] = ops::block_attention_forward(part(q, qi, n), part(ko, kj, n), part(vo, kj, n),
                                                   /*causal=*/kid == qid);
        ops::merge_attention(acc[static_cast<size_t>(qi)].out, acc[static_cast<size_t>(qi)].lse, o,
                             l);
      }
    }
  };
  if (rotate_ == "allgather") {
    const at::Tensor all = gather_kv(k, v);
    for (int64_t o = 0; o < size(); ++o) attend(all[o][0], all[o][1], o);
  } else {
    // Ring: the block of owner (r - s) is computed while the next one arrives from r - 1.
    at::Tensor kv = at::stack({k, v}).contiguous();
    for (int64_t s = 0; s < size(); ++s) {
      dist::WorkPtr moving;
      at::Tensor incoming;
      if (s + 1 < size()) moving = ring_step(kv, incoming);
      attend(kv[0], kv[1], (rank() - s + size()) % size());
      if (moving) {
        moving->wait();
        kv = incoming;
      }
    }
  }
  std::vector<at::Tensor> outs, lses;
  for (auto& a : acc) {
    outs.push_back(a.out);
    lses.push_back(a.lse);
  }
  saved.out = at::cat(outs, 1).to(q.scalar_type());
  saved.logsumexp = at::cat(lses, 2);
  return saved.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ContextParallel::backward(
    const at::Tensor& dout, const ops::AttentionSaved& saved, int64_t n_kv_heads) const {
  RECORD_USER_SCOPE("titan/cp_attention_backward");
  const at::Tensor &q = saved.q, &k = saved.k, &v = saved.v;
  TITAN_INTERNAL_CHECK(k.size(2) == n_kv_heads, "context-parallel attention: ", k.size(2),
                       " KV heads saved, ", n_kv_heads, " expected");
  const auto mine = chunks_of(rank());
  const int64_t n = static_cast<int64_t>(mine.size());
  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  // Adds the gradients of one owner's key/value chunks' blocks: dq here, dk/dv into `dkv`
  // ([2, B, L, Hkv, hd] fp32, the owner's).
  auto attend = [&](const at::Tensor& ko, const at::Tensor& vo, int64_t owner, at::Tensor& dkv) {
    const auto theirs = chunks_of(owner);
    for (int64_t qi = 0; qi < n; ++qi) {
      for (int64_t kj = 0; kj < n; ++kj) {
        const int64_t qid = mine[static_cast<size_t>(qi)], kid = theirs[static_cast<size_t>(kj)];
        if (kid > qid) continue;
        auto [gq, gk, gv] = ops::block_attention_backward(
            part(dout, qi, n), part(q, qi, n), part(ko, kj, n), part(vo, kj, n),
            part(saved.out, qi, n), part(saved.logsumexp.transpose(1, 2), qi, n).transpose(1, 2),
            /*causal=*/kid == qid);
        part(dq, qi, n).add_(gq);
        part(dkv[0], kj, n).add_(gk);
        part(dkv[1], kj, n).add_(gv);
      }
    }
  };
  at::Tensor dkv_mine;
  const auto f32 = k.options().dtype(at::kFloat);
  if (rotate_ == "allgather") {
    const at::Tensor all = gather_kv(k, v);
    at::Tensor grads = at::zeros(all.sizes(), f32);
    for (int64_t o = 0; o < size(); ++o) {
      at::Tensor g = grads[o];
      attend(all[o][0], all[o][1], o, g);
    }
    dkv_mine = at::empty(grads.sizes().slice(1), f32);
    RECORD_USER_SCOPE("titan/cp_reduce_scatter_dkv");
    comm_->reduce_scatter(dkv_mine, grads, dist::ReduceOp::Sum);
  } else {
    // Ring: key/value blocks travel as in the forward; each block's gradient accumulator
    // follows one step behind: this rank's contributions to the block it holds are computed
    // while the sum of the earlier ranks' contributions is still arriving, then added and sent
    // on. After the last block the accumulators take one more step, home to their owner.
    at::Tensor kv = at::stack({k, v}).contiguous();
    dist::WorkPtr grads_moving;
    at::Tensor grads_arriving, grads_sent;
    for (int64_t s = 0; s < size(); ++s) {
      dist::WorkPtr moving;
      at::Tensor incoming;
      if (s + 1 < size()) moving = ring_step(kv, incoming);
      at::Tensor dkv = at::zeros(kv.sizes(), f32);
      attend(kv[0], kv[1], (rank() - s + size()) % size(), dkv);
      if (grads_moving) {
        grads_moving->wait();
        dkv.add_(grads_arriving);
      }
      grads_sent = dkv;  // alive until its transfer ends
      grads_moving = ring_step(grads_sent, grads_arriving);
      if (moving) {
        moving->wait();
        kv = incoming;
      }
    }
    grads_moving->wait();
    dkv_mine = grads_arriving;
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dkv_mine[0].to(dt), dkv_mine[1].to(dt)};
}

}  // namespace titan::parallel
