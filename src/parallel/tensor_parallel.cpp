// Sequence-parallel collectives, column-/row-parallel projections (synchronous or async TP),
// the vocabulary-parallel embedding and the loss-parallel head.
#include "titan/parallel/tensor_parallel.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <vector>

#include "titan/dist/communicator.h"
#include "titan/ops/rmsnorm.h"
#include "titan/util/error.h"

namespace titan::parallel {
namespace {

at::Tensor rows2d(const at::Tensor& x) {
  return x.reshape({-1, x.size(-1)});
}

// Gathers the token shards, then multiplies by this rank's output rows of the weight.
class ColumnParallel final : public ops::Linear {
 public:
  explicit ColumnParallel(const TensorParallel& tp) : tp_(tp) {}
  at::Tensor weight_input(const at::Tensor& x, const at::Tensor& /*amax*/) const override {
    return tp_.gather_tokens(rows2d(x));
  }
  at::Tensor forward(const at::Tensor& x, const ops::LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& /*amax*/) const override {
    return tp_.gather_matmul(rows2d(x), w.plain("ColumnParallel").t(), x_for_weight);
  }
  at::Tensor backward_input(const at::Tensor& dy, const ops::LinearWeight& w,
                            at::Tensor* dy_for_weight, const at::Tensor& /*amax*/) const override {
    if (dy_for_weight) *dy_for_weight = dy;
    return tp_.matmul_scatter(rows2d(dy), w.plain("ColumnParallel"));
  }

 private:
  const TensorParallel& tp_;
};

// Multiplies by this rank's input columns of the weight, then reduce-scatters to token shards.
class RowParallel final : public ops::Linear {
 public:
  explicit RowParallel(const TensorParallel& tp) : tp_(tp) {}
  at::Tensor forward(const at::Tensor& x, const ops::LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& /*amax*/) const override {
    if (x_for_weight) *x_for_weight = x;
    return tp_.matmul_scatter(rows2d(x), w.plain("RowParallel").t());
  }
  at::Tensor backward_input(const at::Tensor& dy, const ops::LinearWeight& w,
                            at::Tensor* dy_for_weight, const at::Tensor& /*amax*/) const override {
    return tp_.gather_matmul(rows2d(dy), w.plain("RowParallel"), dy_for_weight);
  }

 private:
  const TensorParallel& tp_;
};

// The float8 projections under tensor parallelism: a Float8Linear whose hooks reduce amaxes
// and gather token shards over tp; subclasses place the reduce-scatter of partial sums.
class Float8TpLinear : public ops::Linear {
 public:
  Float8TpLinear(const TensorParallel& tp, ops::Float8Linear float8)
      : tp_(tp), float8_(std::move(float8)) {}
  at::Tensor weight_input(const at::Tensor& x, const at::Tensor& /*amax*/) const override {
    return float8_.weight_input(x);
  }
  void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& grad_w,
                       bool accumulate) const override {
    float8_.backward_weight(dy, x, grad_w, accumulate);
  }

 protected:
  const TensorParallel& tp_;
  ops::Float8Linear float8_;
};

// Float8 column-parallel: each token shard cast to float8 with the whole tensor's scale and
// its bytes gathered (inside the Float8Linear), the float8 products with this rank's weight
// rows; dx's partial sums are reduce-scattered in the compute dtype.
class Float8ColumnParallel final : public Float8TpLinear {
 public:
  using Float8TpLinear::Float8TpLinear;
  at::Tensor forward(const at::Tensor& x, const ops::LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& /*amax*/) const override {
    return float8_.forward(rows2d(x), w, x_for_weight);
  }
  at::Tensor backward_input(const at::Tensor& dy, const ops::LinearWeight& w,
                            at::Tensor* dy_for_weight, const at::Tensor& /*amax*/) const override {
    return tp_.scatter_tokens(float8_.backward_input(rows2d(dy), w, dy_for_weight));
  }
};

// Float8 row-parallel: the float8 product with this rank's weight columns, its partial sums
// reduce-scattered in the compute dtype; dy's token shard cast to float8 and gathered (inside
// the Float8Linear) for dx and the weight gradient.
class Float8RowParallel final : public Float8TpLinear {
 public:
  using Float8TpLinear::Float8TpLinear;
  at::Tensor forward(const at::Tensor& x, const ops::LinearWeight& w, at::Tensor* x_for_weight,
                     const at::Tensor& /*amax*/) const override {
    return tp_.scatter_tokens(float8_.forward(rows2d(x), w, x_for_weight));
  }
  at::Tensor backward_input(const at::Tensor& dy, const ops::LinearWeight& w,
                            at::Tensor* dy_for_weight, const at::Tensor& /*amax*/) const override {
    return float8_.backward_input(rows2d(dy), w, dy_for_weight);
  }
};

}  // namespace

void TensorParallel::enable_float8(bool emulate) {
  const ops::AmaxReduce over_tp = [this](at::Tensor& amax) {
    comm_->all_reduce(amax, dist::ReduceOp::Max);
  };
  const ops::TokenGather gather = [this](const at::Tensor& shard) { return gather_tokens(shard); };
  const auto tensorwise = ops::Float8Recipe::Tensorwise;
  // Every operand is split over tp: weights by rows or columns; x of column-parallel and dy of
  // row-parallel projections by tokens (gathered in float8), the others by features.
  float8_column_ = std::make_unique<Float8ColumnParallel>(
      *this, ops::Float8Linear(tensorwise, emulate, {over_tp, over_tp, over_tp, gather, {}}));
  float8_row_ = std::make_unique<Float8RowParallel>(
      *this, ops::Float8Linear(tensorwise, emulate, {over_tp, over_tp, over_tp, {}, gather}));
}

const ops::Linear& TensorParallel::float8_column() const {
  TITAN_INTERNAL_CHECK(float8_column_ != nullptr, "float8 tensor parallel not enabled");
  return *float8_column_;
}

const ops::Linear& TensorParallel::float8_row() const {
  TITAN_INTERNAL_CHECK(float8_row_ != nullptr, "float8 tensor parallel not enabled");
  return *float8_row_;
}

TensorParallel::TensorParallel(dist::Communicator* comm, TensorParallelOptions options)
    : comm_(comm),
      options_(options),
      column_(std::make_unique<ColumnParallel>(*this)),
      row_(std::make_unique<RowParallel>(*this)) {
  TITAN_INTERNAL_CHECK(comm_ && comm_->size() > 1, "tensor parallel without a tp group");
}

TensorParallel::~TensorParallel() = default;

int64_t TensorParallel::size() const {
  return comm_->size();
}
int64_t TensorParallel::rank() const {
  return comm_->rank();
}

at::Tensor TensorParallel::gather_tokens(const at::Tensor& shard) const {
  RECORD_USER_SCOPE("titan/tp_all_gather");
  auto sizes = shard.sizes().vec();
  sizes[0] *= size();
  at::Tensor out = at::empty(sizes, shard.options());
  comm_->all_gather_into(out, shard.contiguous());
  return out;
}

at::Tensor TensorParallel::scatter_tokens(const at::Tensor& partial) const {
  RECORD_USER_SCOPE("titan/tp_reduce_scatter");
  auto sizes = partial.sizes().vec();
  TITAN_INTERNAL_CHECK(sizes[0] % size() == 0, "reduce-scatter of ", sizes[0], " rows over ",
                       size(), " tp ranks");
  sizes[0] /= size();
  at::Tensor out = at::empty(sizes, partial.options());
  comm_->reduce_scatter(out, partial.contiguous(), dist::ReduceOp::Sum);
  return out;
}

at::Tensor TensorParallel::gather_matmul(const at::Tensor& x, const at::Tensor& b,
                                         at::Tensor* gathered) const {
  if (!options_.async) {
    at::Tensor xg = gather_tokens(x);
    if (gathered) *gathered = xg;
    return ops::tuned_mm(xg, b);
  }
  // Ring: at step k this rank multiplies the shard of rank (r - k) while passing it on to
  // r + 1 and receiving the shard of rank (r - k - 1) from r - 1.
  RECORD_USER_SCOPE("titan/tp_async_gather_matmul");
  const int64_t t = size(), r = rank(), n = x.size(0);
  at::Tensor xg = at::empty({t * n, x.size(1)}, x.options());
  at::Tensor out = at::empty({t * n, b.size(1)}, x.options());
  xg.narrow(0, r * n, n).copy_(x);
  const int next = static_cast<int>((r + 1) % t), prev = static_cast<int>((r + t - 1) % t);
  std::vector<dist::WorkPtr> works;
  for (int64_t k = 0; k < t; ++k) {
    const int64_t c = (r - k + t) % t;
    dist::WorkPtr moving;
    if (k + 1 < t) {
      const int64_t incoming = (r - k - 1 + 2 * t) % t;
      moving = comm_->send_recv({{dist::P2POp::Kind::Send, xg.narrow(0, c * n, n), next},
                                 {dist::P2POp::Kind::Recv, xg.narrow(0, incoming * n, n), prev}},
                                /*async=*/true);
      works.push_back(moving);
    }
    at::Tensor dst = out.narrow(0, c * n, n);
    ops::tuned_mm_out(dst, xg.narrow(0, c * n, n), b);
    if (moving) moving->wait();
  }
  for (auto& w : works) w->wait();
  if (gathered) *gathered = xg;
  return out;
}

at::Tensor TensorParallel::matmul_scatter(const at::Tensor& x, const at::Tensor& b) const {
  if (!options_.async) return scatter_tokens(ops::tuned_mm(x, b));
  // Ring: at step k this rank computes its partial product for the rows of rank (r - k - 1),
  // adds the sum of the earlier ranks' partials received from r - 1 and passes it on; at the
  // last step the rows are its own and the sum is complete.
  RECORD_USER_SCOPE("titan/tp_async_matmul_scatter");
  const int64_t t = size(), r = rank();
  TITAN_INTERNAL_CHECK(x.size(0) % t == 0, "matmul-reduce-scatter of ", x.size(0), " rows over ", t,
                       " tp ranks");
  const int64_t n = x.size(0) / t;
  const int next = static_cast<int>((r + 1) % t), prev = static_cast<int>((r + t - 1) % t);
  std::vector<dist::WorkPtr> works;
  std::vector<at::Tensor> keep;  // tensors in flight stay alive until their transfer ends
  dist::WorkPtr arriving;
  at::Tensor incoming;
  at::Tensor part;
  for (int64_t k = 0; k < t; ++k) {
    const int64_t blk = (r - k - 1 + 2 * t) % t;
    // This block's product runs while the partial sum for it is still arriving; the add waits.
    part = ops::tuned_mm(x.narrow(0, blk * n, n), b);
    if (arriving) {
      arriving->wait();
      part.add_(incoming);
    }
    if (k + 1 < t) {
      incoming = at::empty_like(part);
      arriving = comm_->send_recv(
          {{dist::P2POp::Kind::Send, part, next}, {dist::P2POp::Kind::Recv, incoming, prev}},
          /*async=*/true);
      works.push_back(arriving);
      keep.push_back(part);
      keep.push_back(incoming);
    }
  }
  for (auto& w : works) w->wait();
  return part;
}

model::BlockPlan TensorParallel::block_plan(const model::LlamaArgs& args) const {
  model::BlockPlan p = model::BlockPlan::whole(args);
  p.n_heads /= size();
  p.n_kv_heads /= size();
  p.seq_shards = size();
  p.wqkv = column_.get();
  p.w13 = column_.get();
  p.wo = row_.get();
  p.w2 = row_.get();
  return p;
}

namespace {

// Token ids as rows of this rank's part of a vocabulary-split table, and which are its own.
std::pair<at::Tensor, at::Tensor> local_rows(const at::Tensor& tokens, int64_t begin,
                                             int64_t rows) {
  at::Tensor local = tokens.reshape({-1}) - begin;
  at::Tensor mine = at::logical_and(local.ge(0), local.lt(rows));
  return {at::where(mine, local, at::zeros_like(local)), mine};
}

}  // namespace

at::Tensor TensorParallel::embedding_forward(const at::Tensor& table, int64_t vocab_begin,
                                             const at::Tensor& tokens, at::ScalarType dtype) const {
  auto [idx, mine] = local_rows(tokens, vocab_begin, table.size(0));
  at::Tensor rows = at::index_select(table, 0, idx).to(dtype);
  rows.mul_(mine.unsqueeze(1).to(dtype));  // other ranks' tokens contribute zeros
  at::Tensor shard = scatter_tokens(rows);
  return shard.view({tokens.size(0), tokens.size(1) / size(), table.size(1)});
}

void TensorParallel::embedding_backward(const at::Tensor& dh, const at::Tensor& tokens,
                                        int64_t vocab_begin, at::Tensor& grad_table,
                                        bool accumulate) const {
  auto [idx, mine] = local_rows(tokens, vocab_begin, grad_table.size(0));
  at::Tensor dg = gather_tokens(rows2d(dh)).to(grad_table.scalar_type());
  dg.mul_(mine.unsqueeze(1).to(dg.scalar_type()));
  if (!accumulate) grad_table.zero_();
  grad_table.index_add_(0, idx, dg);
}

ops::HeadResult TensorParallel::head_forward_backward(const at::Tensor& h, const at::Tensor& norm_w,
                                                      const at::Tensor& out_w, int64_t vocab_begin,
                                                      int64_t vocab, const at::Tensor& targets,
                                                      double norm_eps, double grad_scale,
                                                      at::Tensor* norm_grad, at::Tensor* out_grad,
                                                      bool compute_grad, bool accumulate) const {
  auto [hn, rstd] = ops::rmsnorm_forward(h, norm_w, norm_eps);
  at::Tensor hg = gather_tokens(hn);
  ops::VocabShard shard;
  shard.begin = vocab_begin;
  shard.vocab = vocab;
  const int64_t t = size();
  if (options_.loss_parallel) {
    shard.gather_stats = [this, t](const at::Tensor& stats) {
      at::Tensor all = at::empty({t, stats.size(0), stats.size(1)}, stats.options());
      comm_->all_gather_into(all, stats.contiguous());
      return all;
    };
  } else {
    shard.gather_logits = [this, t](const at::Tensor& logits) {
      at::Tensor all = at::empty({t, logits.size(0), logits.size(1)}, logits.options());
      comm_->all_gather_into(all, logits.contiguous());
      return all.permute({1, 0, 2}).reshape({logits.size(0), t * logits.size(1)});
    };
  }
  at::Tensor dhg = compute_grad ? at::empty_like(hg) : at::Tensor();
  ops::HeadResult r;
  r.loss_sum = ops::output_loss(hg, out_w, targets, grad_scale, dhg, out_grad, compute_grad,
                                accumulate, &shard);
  if (compute_grad) {
    r.dh = ops::rmsnorm_backward(scatter_tokens(dhg), h, norm_w, rstd, *norm_grad, accumulate);
  }
  return r;
}

}  // namespace titan::parallel
