// TeraPipe's pieces: attention of a token slice against the cached keys/values of its
// sequence, the slice cost model (fit to timed runs, or from FLOPs), the dynamic program that
// picks the slicing, and the parsing of parallelism.pipeline_parallel_token_slices.
#include "titan/parallel/pipeline/terapipe.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "titan/ops/rope.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::parallel::pipeline {

// ---------------------------------------------------------------------------------------------
// Attention

void TokenSliceAttention::bind_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      ops::AttentionSaved& saved) const {
  if (!kv_ || offset_ == 0) {
    ops::local_attention().bind_inputs(q, k, v, saved);
    return;
  }
  saved.q = q;
  saved.k = k;
  saved.v = v;
}

at::Tensor TokenSliceAttention::forward(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, ops::AttentionSaved& saved) const {
  if (!kv_) return ops::local_attention().forward(q, k, v, saved);
  RECORD_USER_SCOPE("titan/token_slice_attention");
  const int64_t len = q.size(1);
  TITAN_INTERNAL_CHECK(offset_ + len <= seq_len_, "token slice [", offset_, ", ", offset_ + len,
                       ") outside a sequence of ", seq_len_);
  if (!kv_->k.defined()) {
    kv_->k = at::empty({k.size(0), seq_len_, k.size(2), k.size(3)}, k.options());
    kv_->v = at::empty({v.size(0), seq_len_, v.size(2), v.size(3)}, v.options());
  }
  // Cached for the later slices (a recomputation writes the same values again).
  kv_->k.narrow(1, offset_, len).copy_(k);
  kv_->v.narrow(1, offset_, len).copy_(v);
  if (offset_ == 0) return ops::local_attention().forward(q, k, v, saved);
  bind_inputs(q, k, v, saved);
  at::Tensor out, lse;
  {
    auto [o, l] = ops::block_attention_forward(q, k, v, /*causal=*/true);
    ops::merge_attention(out, lse, o, l);
  }
  {
    auto [o, l] = ops::block_attention_forward(q, kv_->k.narrow(1, 0, offset_),
                                               kv_->v.narrow(1, 0, offset_), /*causal=*/false);
    ops::merge_attention(out, lse, o, l);
  }
  saved.out = out.to(q.scalar_type());
  saved.logsumexp = lse;
  return saved.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> TokenSliceAttention::backward(
    const at::Tensor& dout, const ops::AttentionSaved& saved, int64_t n_kv_heads) const {
  if (!kv_) return ops::local_attention().backward(dout, saved, n_kv_heads);
  RECORD_USER_SCOPE("titan/token_slice_attention_backward");
  at::Tensor dq, dk, dv;
  const int64_t len = dout.size(1);
  if (offset_ == 0) {
    std::tie(dq, dk, dv) = ops::local_attention().backward(dout, saved, n_kv_heads);
  } else {
    const at::Tensor &q = saved.q, &k = saved.k, &v = saved.v;
    const at::Tensor lse = saved.logsumexp;
    auto [gq, gk, gv] =
        ops::block_attention_backward(dout, q, k, v, saved.out, lse, /*causal=*/true);
    auto [pq, pk, pv] = ops::block_attention_backward(dout, q, kv_->k.narrow(1, 0, offset_),
                                                      kv_->v.narrow(1, 0, offset_), saved.out, lse,
                                                      /*causal=*/false);
    if (!kv_->dk.defined()) {
      kv_->dk = at::zeros(kv_->k.sizes(), kv_->k.options().dtype(at::kFloat));
      kv_->dv = at::zeros(kv_->v.sizes(), kv_->v.options().dtype(at::kFloat));
    }
    kv_->dk.narrow(1, 0, offset_).add_(pk);
    kv_->dv.narrow(1, 0, offset_).add_(pv);
    dq = (gq.to(at::kFloat) + pq).to(q.scalar_type());
    dk = gk;
    dv = gv;
  }
  if (kv_->dk.defined()) {
    // What the later slices' queries sent back to this slice's keys and values.
    dk = (dk.to(at::kFloat) + kv_->dk.narrow(1, offset_, len)).to(dout.scalar_type());
    dv = (dv.to(at::kFloat) + kv_->dv.narrow(1, offset_, len)).to(dout.scalar_type());
  }
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// Cost model

double SliceCostModel::time_s(int64_t len, int64_t prefix) const {
  const double l = static_cast<double>(len), c = static_cast<double>(prefix);
  return fixed_s + per_token_s * l + per_pair_s * (l * c + 0.5 * l * l);
}

SliceCostModel SliceCostModel::fit(const std::vector<int64_t>& lens,
                                   const std::vector<int64_t>& prefixes,
                                   const std::vector<double>& seconds) {
  TITAN_INTERNAL_CHECK(
      lens.size() == seconds.size() && prefixes.size() == seconds.size() && seconds.size() >= 3,
      "slice cost fit: need 3 or more samples");
  // Non-negative least squares over three features: every subset of the coefficients is
  // solved by the normal equations and the best feasible one kept.
  const size_t n = seconds.size();
  std::vector<std::array<double, 3>> x(n);
  for (size_t i = 0; i < n; ++i) {
    const double l = static_cast<double>(lens[i]), c = static_cast<double>(prefixes[i]);
    x[i] = {1.0, l, l * c + 0.5 * l * l};
  }
  // Scale the columns so the normal equations are well conditioned.
  std::array<double, 3> scale{};
  for (int j = 0; j < 3; ++j) {
    for (size_t i = 0; i < n; ++i) scale[j] = std::max(scale[j], std::abs(x[i][j]));
    if (scale[j] == 0) scale[j] = 1;
  }
  std::array<double, 3> best_coef{};
  double best_err = std::numeric_limits<double>::infinity();
  for (int mask = 1; mask < 8; ++mask) {
    std::vector<int> cols;
    for (int j = 0; j < 3; ++j) {
      if (mask & (1 << j)) cols.push_back(j);
    }
    const size_t m = cols.size();
    // A^T A c = A^T y by Gaussian elimination (m <= 3).
    std::vector<std::vector<double>> a(m, std::vector<double>(m + 1, 0.0));
    for (size_t i = 0; i < n; ++i) {
      for (size_t r = 0; r < m; ++r) {
        const double xr = x[i][cols[r]] / scale[cols[r]];
        for (size_t s = 0; s < m; ++s) a[r][s] += xr * x[i][cols[s]] / scale[cols[s]];
        a[r][m] += xr * seconds[i];
      }
    }
    bool singular = false;
    for (size_t p = 0; p < m && !singular; ++p) {
      size_t piv = p;
      for (size_t r = p + 1; r < m; ++r) {
        if (std::abs(a[r][p]) > std::abs(a[piv][p])) piv = r;
      }
      if (std::abs(a[piv][p]) < 1e-300) {
        singular = true;
        break;
      }
      std::swap(a[p], a[piv]);
      for (size_t r = 0; r < m; ++r) {
        if (r == p) continue;
        const double f = a[r][p] / a[p][p];
        for (size_t s = p; s <= m; ++s) a[r][s] -= f * a[p][s];
      }
    }
    if (singular) continue;
    std::array<double, 3> coef{};
    bool feasible = true;
    for (size_t r = 0; r < m; ++r) {
      coef[cols[r]] = a[r][m] / a[r][r] / scale[cols[r]];
      feasible = feasible && coef[cols[r]] >= 0;
    }
    if (!feasible) continue;
    double err = 0;
    for (size_t i = 0; i < n; ++i) {
      const double pred = coef[0] * x[i][0] + coef[1] * x[i][1] + coef[2] * x[i][2];
      err += (pred - seconds[i]) * (pred - seconds[i]);
    }
    if (err < best_err) {
      best_err = err;
      best_coef = coef;
    }
  }
  SliceCostModel m;
  m.fixed_s = best_coef[0];
  m.per_token_s = best_coef[1];
  m.per_pair_s = best_coef[2];
  return m;
}

SliceCostModel SliceCostModel::from_flops(const model::LlamaArgs& args, int64_t microbatch_size,
                                          double flops_per_s, double fixed_s) {
  // Forward + backward = 3 x forward. Per token: 2 FLOPs per block weight. Per causal (query,
  // key) pair: QK^T and PV, 2 x 2 x n_heads x head_dim.
  const double d = static_cast<double>(args.dim), f = static_cast<double>(args.ffn_hidden_dim());
  const double hd = static_cast<double>(args.head_dim());
  const double weights =
      d * hd * (args.n_heads + 2.0 * args.n_kv_heads) + hd * args.n_heads * d + 3.0 * d * f;
  const double b = static_cast<double>(microbatch_size);
  SliceCostModel m;
  m.fixed_s = fixed_s;
  m.per_token_s = 3.0 * 2.0 * weights * b / flops_per_s;
  m.per_pair_s = 3.0 * 4.0 * args.n_heads * hd * b / flops_per_s;
  return m;
}

std::string SliceCostModel::describe() const {
  return fmt::format("{:.3g} us + {:.3g} us/token + {:.3g} us/(query, key) pair", fixed_s * 1e6,
                     per_token_s * 1e6, per_pair_s * 1e6);
}

// ---------------------------------------------------------------------------------------------
// Slicing

TokenSlicing evaluate_slicing(const std::vector<int64_t>& lengths, int stages, int microbatches,
                              const std::function<double(int64_t, int64_t)>& cost) {
  TokenSlicing s;
  s.lengths = lengths;
  int64_t prefix = 0;
  for (int64_t l : lengths) {
    const double t = cost(l, prefix);
    s.sum_s += t;
    s.max_s = std::max(s.max_s, t);
    prefix += l;
  }
  s.step_s = microbatches * s.sum_s + (stages - 1) * s.max_s;
  return s;
}

TokenSlicing optimal_token_slices(int64_t seq_len, int64_t quantum, int stages, int microbatches,
                                  const std::function<double(int64_t, int64_t)>& cost) {
  TITAN_INTERNAL_CHECK(quantum > 0 && seq_len % quantum == 0, "token slices: quantum ", quantum,
                       " does not divide ", seq_len);
  const int64_t n = seq_len / quantum;
  // t[i][l]: the time of the slice of l quanta starting at quantum i.
  std::vector<std::vector<double>> t(static_cast<size_t>(n));
  std::vector<double> candidates;
  for (int64_t i = 0; i < n; ++i) {
    t[static_cast<size_t>(i)].resize(static_cast<size_t>(n - i + 1));
    for (int64_t l = 1; i + l <= n; ++l) {
      const double c = cost(l * quantum, i * quantum);
      t[static_cast<size_t>(i)][static_cast<size_t>(l)] = c;
      candidates.push_back(c);
    }
  }
  std::sort(candidates.begin(), candidates.end());
  candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
  const double inf = std::numeric_limits<double>::infinity();
  double best = inf;
  std::vector<int64_t> best_cut;
  std::vector<double> f(static_cast<size_t>(n + 1));
  std::vector<int64_t> take(static_cast<size_t>(n + 1));
  for (double tmax : candidates) {
    // Larger bounds only add (stages - 1) x tmax beyond what the best already costs.
    if ((stages - 1) * tmax >= best) break;
    f[static_cast<size_t>(n)] = 0;
    for (int64_t i = n - 1; i >= 0; --i) {
      double fi = inf;
      int64_t li = 0;
      for (int64_t l = 1; i + l <= n; ++l) {
        const double c = t[static_cast<size_t>(i)][static_cast<size_t>(l)];
        if (c > tmax) continue;
        const double v = c + f[static_cast<size_t>(i + l)];
        if (v < fi) {
          fi = v;
          li = l;
        }
      }
      f[static_cast<size_t>(i)] = fi;
      take[static_cast<size_t>(i)] = li;
    }
    if (f[0] == inf) continue;
    const double total = microbatches * f[0] + (stages - 1) * tmax;
    if (total < best) {
      best = total;
      best_cut.clear();
      for (int64_t i = 0; i < n; i += take[static_cast<size_t>(i)]) {
        best_cut.push_back(take[static_cast<size_t>(i)] * quantum);
      }
    }
  }
  TITAN_INTERNAL_CHECK(!best_cut.empty(), "token slices: no slicing found");
  return evaluate_slicing(best_cut, stages, microbatches, cost);
}

int64_t token_slice_quantum(int64_t seq_len, int64_t tp) {
  const int64_t unit = std::lcm(kMinTokenSlice, tp);
  for (int64_t q = unit; q <= seq_len; q += unit) {
    if (seq_len % q == 0 && seq_len / q <= 64) return q;
  }
  fail("parallelism.pipeline_parallel_token_slices = \"auto\": training.seq_len (", seq_len,
       ") cannot be cut into slices of a multiple of ", unit, " tokens (at least ", kMinTokenSlice,
       tp > 1 ? " and divisible by tensor_parallel_degree" : "",
       "); choose a seq_len divisible by ", unit, " or list the slice lengths");
}

bool token_slices_auto(const std::vector<std::string>& value) {
  return value.empty() || (value.size() == 1 && util::lower(util::trim(value[0])) == "auto");
}

std::vector<int64_t> parse_token_slices(const std::vector<std::string>& value, int64_t seq_len,
                                        int64_t tp) {
  const std::string key = "parallelism.pipeline_parallel_token_slices";
  if (token_slices_auto(value)) return {};
  std::vector<int64_t> out;
  int64_t sum = 0;
  for (const auto& item : value) {
    int64_t len = 0;
    TITAN_CHECK(util::parse_int(util::trim(item), len) && len > 0, key,
                ": expected \"auto\" or a list of positive slice lengths in tokens, got \"", item,
                "\"");
    TITAN_CHECK(len >= kMinTokenSlice, key, ": slice of ", len, " tokens is shorter than ",
                kMinTokenSlice, ", the shortest slice the attention kernels run efficiently");
    TITAN_CHECK(len % tp == 0, key, ": slice of ", len,
                " tokens is not divisible by parallelism.tensor_parallel_degree (", tp,
                "): sequence parallelism splits every slice's tokens over the tensor-parallel "
                "ranks");
    out.push_back(len);
    sum += len;
  }
  TITAN_CHECK(sum == seq_len, key, ": the slices [", util::join(value, ", "), "] sum to ", sum,
              " tokens, but training.seq_len is ", seq_len);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Measurement

std::vector<SliceSample> measure_slice_times(const model::LlamaArgs& args, model::BlockPlan plan,
                                             const model::UnitLayout& block, int64_t batch,
                                             int64_t seq_len, int64_t quantum,
                                             model::SavePolicy policy, at::ScalarType dtype,
                                             const c10::Device& device) {
  const auto opts = at::TensorOptions().device(device);
  const model::ScratchBlock scratch = model::scratch_block(block, dtype, device);
  const auto& w = scratch.w;
  const auto& g = scratch.g;
  TokenSliceAttention attention;
  plan.attention = &attention;
  auto [cos, sin] = ops::rope_tables(args, seq_len, opts.dtype(at::kFloat));
  std::vector<std::pair<int64_t, int64_t>> points;
  for (int64_t len = quantum; len <= seq_len; len *= 2) {
    points.push_back({len, 0});
    if (len < seq_len) points.push_back({len, seq_len - len});
    if (len * 2 > seq_len && len != seq_len) points.push_back({seq_len, 0});
  }
  // One sequence's keys/values (and their gradient accumulators), allocated once: a training
  // step allocates them once per sequence, not per slice.
  SliceKv kv;
  const int64_t hd = plan.head_dim, nkv = plan.n_kv_heads;
  kv.k = at::randn({batch, seq_len, nkv, hd}, opts.dtype(dtype));
  kv.v = at::randn({batch, seq_len, nkv, hd}, opts.dtype(dtype));
  kv.dk = at::zeros({batch, seq_len, nkv, hd}, opts.dtype(at::kFloat));
  kv.dv = at::zeros({batch, seq_len, nkv, hd}, opts.dtype(at::kFloat));
  // Seconds of one forward + backward; inputs are made before the clock starts.
  auto run = [&](int64_t len, int64_t prefix) {
    attention.use(&kv, prefix, seq_len);
    model::Rope rope{cos.narrow(0, prefix, len), sin.narrow(0, prefix, len)};
    const at::Tensor x = at::randn({batch, len / plan.seq_shards, args.dim}, opts.dtype(dtype));
    const at::Tensor dy = at::randn_like(x);
    synchronize(device);
    const auto t0 = std::chrono::steady_clock::now();
    model::BlockSaved saved;
    model::block_forward(args, plan, w, rope, x, policy, saved);
    model::block_backward(args, plan, w, rope, dy, saved, g, true);
    synchronize(device);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<SliceSample> out;
  run(quantum, 0);  // warm-up: kernels chosen, workspaces allocated
  for (auto [len, prefix] : points) {
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < 3; ++rep) best = std::min(best, run(len, prefix));
    out.push_back({len, prefix, best});
  }
  return out;
}

}  // namespace titan::parallel::pipeline
