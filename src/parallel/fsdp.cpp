// FsdpModel: unit storage, gathering and gradient reduction over the data-parallel groups.
//
// Gradients are SUMMED across ranks: each rank's backward is already scaled by 1 / (tokens of
// the global batch), so the sum is the gradient of the global mean loss.
//
// Ordering on CUDA (NCCL): a gather casts this rank's shard to the compute dtype on the
// compute stream, then the all-gather runs on the shard group's communication stream after an
// event says the cast is done; gather() makes the compute stream wait for the all-gather's end
// event, so a prefetched gather overlaps the previous unit's compute. Gradient reduce-scatters
// start on the communication stream as soon as a unit's backward has been issued; their
// results are folded into the shard gradient one unit later (by which time they are done), so
// the compute stream never waits on a reduction that was just issued. The caching allocator is
// told which buffers the communication stream uses, so freeing them early is safe.
// On CPU (Gloo) the same calls run on Gloo's threads; waiting blocks the host.
// Float8 all-gather: a unit's float8 matrices are cast on this rank's shard with the scale of
// the whole matrix (global amax: an all-reduce MAX over dp_shard of the shards' amaxes, cached
// until the weights change) and gathered as bytes at their layout offsets, so the gathered
// bytes equal a cast of the gathered bf16 matrix. The unit's other parameters (norms,
// and any projection left in bf16) are packed per rank into a buffer of equal length on every
// rank, gathered in param_dtype and unpacked run by run.
// Host run-ahead is bounded: before more than kMaxInFlight gathers/reductions are outstanding,
// the host blocks on the oldest. Otherwise it would enqueue a whole step ahead of the device,
// and every unit buffer freed in that window (still in use by the communication stream as far
// as the allocator knows) would stay unusable until the device caught up: the allocator then
// reserves fresh memory for each unit (measured: +22 GiB reserved for 3B FSDP-2). One unit of
// lead keeps the device fed, since a unit's compute takes far longer to run than to enqueue.
// CPU offload: a unit's reduced gradient shard (all-reduced over dp_replicate on the device
// first, for HSDP/DDP) is copied to pinned host memory asynchronously on the compute stream;
// finish_grad_reduction() synchronizes the device once and then does the host-side adds of
// later micro-batches, so no host code reads a gradient before its copy has landed.
#include "titan/parallel/fsdp.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <deque>

#include "titan/dist/communicator.h"
#include "titan/model/init.h"
#include "titan/ops/dispatch.h"
#include "titan/ops/float8.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::parallel {

// Work started for a unit and what must happen once it is done.
struct Pending {
  size_t unit = 0;
  dist::WorkPtr work;
  at::Tensor reduced;           // reduce-scatter output to add into the shard gradient (or empty)
  at::Tensor keep_alive;        // the full gradient buffer the reduction reads
  bool then_replicate = false;  // HSDP: all-reduce the shard gradient over dp_replicate after
  bool last = false;            // the step's last microbatch: the gradient is final after it
};

// Offload: a gradient copy on its way to host memory, to be added once the device is synced.
struct HostAdd {
  size_t unit = 0;
  at::Tensor staging;  // pinned host copy of a later micro-batch's reduced gradient
};

constexpr size_t kMaxInFlight = 2;  // outstanding gathers + reductions before the host waits

// A unit's float8 all-gather, precomputed from its layout.
struct Float8Gather {
  struct Piece {
    size_t range = 0;
    int64_t shard_offset = 0, numel = 0;
  };
  // A run of the other parameters' elements held by one rank: `shard_offset` in its shard,
  // `rank_pos` among that rank's packed elements, `packed_pos` in GatheredUnit::rest.
  struct Segment {
    int64_t owner = 0, shard_offset = 0, numel = 0, rank_pos = 0, packed_pos = 0;
  };
  std::vector<Piece> pieces;      // this rank's parts of the float8 matrices
  std::vector<Segment> segments;  // every rank's runs of the other parameters, in flat order
  int64_t rest_stride = 0;  // other elements per rank in the gathered buffer (the most any rank
                            // holds)
  int64_t rest_numel = 0;   // other elements of the unit
};

Float8Gather plan_float8_gather(const UnitState& u, const std::vector<model::ElementRange>& ranges,
                                int64_t ranks) {
  Float8Gather g;
  const int64_t s = u.shard_numel, lo = u.shard_begin, hi = lo + s;
  for (size_t r = 0; r < ranges.size(); ++r) {
    const int64_t a = std::max(lo, ranges[r].offset);
    const int64_t b = std::min(hi, ranges[r].offset + ranges[r].numel);
    if (a < b) g.pieces.push_back({r, a - lo, b - a});
  }
  auto in_float8 = [&](int64_t offset) {
    for (const auto& range : ranges) {
      if (offset >= range.offset && offset < range.offset + range.numel) return true;
    }
    return false;
  };
  // The other parameters' elements, cut at shard boundaries; each segment's position among
  // its owner's elements and in the packed order of GatheredUnit::rest (both flat order).
  std::vector<int64_t> count(static_cast<size_t>(ranks), 0);
  int64_t previous_end = 0;
  for (const auto& p : u.layout.params) {
    TITAN_INTERNAL_CHECK(p.offset >= previous_end, "parameters of ", u.layout.name,
                         " are not in flat order");
    previous_end = p.offset + p.numel;
    if (in_float8(p.offset)) continue;
    for (int64_t q = p.offset; q < p.offset + p.numel;) {
      const int64_t owner = q / s;
      const int64_t end = std::min(p.offset + p.numel, (owner + 1) * s);
      g.segments.push_back(
          {owner, q - owner * s, end - q, count[static_cast<size_t>(owner)], g.rest_numel});
      count[static_cast<size_t>(owner)] += end - q;
      g.rest_numel += end - q;
      q = end;
    }
  }
  g.rest_stride = *std::max_element(count.begin(), count.end());
  return g;
}

struct FsdpModel::Impl {
  std::deque<dist::WorkPtr> in_flight;      // recent gathers/reductions, oldest first
  std::vector<dist::WorkPtr> gathers;       // per unit: an all-gather in flight
  std::deque<Pending> pending;              // reductions whose results are not folded in yet
  std::vector<dist::WorkPtr> final_works;   // replicate all-reduces to wait for at the end
  std::vector<bool> grad_written;           // per unit: shard gradient holds this step's data
  std::vector<HostAdd> host_adds;           // offload: host-side accumulations after the sync
  bool host_copies_in_flight = false;       // offload: device-to-host copies not yet synced
  std::vector<Float8Gather> float8;         // per unit (no pieces and no ranges: bf16 gather)
  std::vector<dist::WorkPtr> rest_gathers;  // per unit: the float8 gather's other parameters
  GradFinal on_grad_final;                  // early optimizer step (or empty)
  std::vector<bool> tp_summed;              // per unit: tp-replicated gradients summed this step
};

FsdpModel::FsdpModel(std::vector<model::UnitLayout> units, dist::Communicator* shard,
                     dist::Communicator* replicate, c10::Device device, FsdpOptions options)
    : shard_(shard),
      replicate_(replicate),
      device_(device),
      options_(options),
      impl_(std::make_unique<Impl>()) {
  const int64_t n_shard = dp_shard_size();
  const int64_t r_shard = dp_shard_rank();
  for (auto& layout : units) {
    UnitState u;
    u.layout = std::move(layout);
    const int64_t padded = (u.layout.numel + n_shard - 1) / n_shard * n_shard;
    u.shard_numel = padded / n_shard;
    u.shard_begin = r_shard * u.shard_numel;
    units_.push_back(std::move(u));
  }
  impl_->gathers.resize(units_.size());
  impl_->rest_gathers.resize(units_.size());
  impl_->grad_written.assign(units_.size(), false);
  impl_->tp_summed.assign(units_.size(), false);
  impl_->float8.resize(units_.size());
  TITAN_INTERNAL_CHECK(
      options_.float8_ranges.empty() || options_.float8_ranges.size() == units_.size(),
      "float8 ranges for ", options_.float8_ranges.size(), " of ", units_.size(), " units");
  for (size_t i = 0; i < options_.float8_ranges.size(); ++i) {
    if (options_.float8_ranges[i].empty()) continue;
    impl_->float8[i] = plan_float8_gather(units_[i], options_.float8_ranges[i], n_shard);
  }
  TITAN_CHECK(!options_.cpu_offload || device_.is_cuda(),
              "training.enable_cpu_offload: offloading needs a CUDA device (this run is on CPU, "
              "where everything already lives in host memory)");
}

FsdpModel::~FsdpModel() = default;

int64_t FsdpModel::dp_shard_size() const {
  return shard_ ? shard_->size() : 1;
}
int64_t FsdpModel::dp_shard_rank() const {
  return shard_ ? shard_->rank() : 0;
}

void FsdpModel::init_weights(int64_t seed) {
  // Shards are initialized where they will live; every rank draws only its own elements, and
  // the values depend on (seed, name, index) alone, so the full model is the same for any mesh.
  const c10::Device home = options_.cpu_offload ? c10::Device(c10::kCPU) : device_;
  auto opts = at::TensorOptions().dtype(at::kFloat).device(home);
  if (options_.cpu_offload) opts = opts.pinned_memory(true);
  for (auto& u : units_) {
    u.master = at::empty({u.shard_numel}, opts);
    model::init_unit_range(u.layout, seed, u.shard_begin, u.master);
    u.grad = at::zeros({u.shard_numel}, opts);
    const bool differs = options_.param_dtype != at::kFloat || u.master.device() != device_;
    if (differs && (shard_ != nullptr || options_.persistent_compute_weights)) {
      u.shadow = at::empty({u.shard_numel},
                           at::TensorOptions().dtype(options_.param_dtype).device(device_));
    }
  }
  refresh_shadows();
}

std::vector<at::Tensor> FsdpModel::shadows() const {
  std::vector<at::Tensor> out;
  for (const auto& u : units_) out.push_back(u.shadow);
  return out;
}

void FsdpModel::refresh_shadows() {
  for (auto& u : units_) {
    if (u.shadow.defined()) u.shadow.copy_(u.master, /*non_blocking=*/true);
    u.stepped_amax_fresh = false;
  }
  weights_changed();
}

void FsdpModel::weights_changed() {
  release_all();
  for (auto& u : units_) u.float8_amax = at::Tensor();
}

bool FsdpModel::gathers_float8(size_t i) const {
  return i < options_.float8_ranges.size() && !options_.float8_ranges[i].empty();
}

std::vector<FsdpModel::Float8Piece> FsdpModel::float8_pieces(size_t i) const {
  std::vector<Float8Piece> out;
  if (!gathers_float8(i)) return out;
  for (const auto& piece : impl_->float8[i].pieces) {
    out.push_back({piece.shard_offset, piece.numel, static_cast<int64_t>(piece.range)});
  }
  return out;
}

const at::Tensor& FsdpModel::stepped_float8_amax(size_t i) {
  UnitState& u = units_[i];
  if (!u.stepped_amax.defined()) {
    u.stepped_amax = at::zeros({static_cast<int64_t>(options_.float8_ranges.at(i).size())},
                               at::TensorOptions().dtype(at::kFloat).device(u.master.device()));
  }
  return u.stepped_amax;
}

void FsdpModel::float8_amax_stepped(size_t i, bool fresh) {
  TITAN_INTERNAL_CHECK(!fresh || units_[i].stepped_amax.defined(), "unit ", i,
                       " has no stepped amax");
  units_[i].stepped_amax_fresh = fresh;
}

void FsdpModel::compute_float8_amax(const std::vector<size_t>& units) {
  // Each rank's amax of its part of every matrix, then the maximum over dp_shard (and tp): one
  // all-reduce per group for all the units asked for.
  std::vector<at::Tensor> local;
  for (size_t i : units) {
    const UnitState& u = units_[i];
    if (u.stepped_amax_fresh) {  // taken by the optimizer as it wrote these weights
      local.push_back(u.stepped_amax.clone());
      continue;
    }
    const at::Tensor& src = u.shadow.defined() ? u.shadow : u.master;
    at::Tensor amax = at::zeros({static_cast<int64_t>(options_.float8_ranges[i].size())},
                                at::TensorOptions().dtype(at::kFloat).device(device_));
    for (const auto& piece : impl_->float8[i].pieces) {
      ops::float8_amax_into(src.narrow(0, piece.shard_offset, piece.numel).to(device_),
                            amax.narrow(0, static_cast<int64_t>(piece.range), 1));
    }
    local.push_back(amax);
  }
  at::Tensor all = local.size() == 1 ? local.front() : at::cat(local);
  if (shard_) shard_->all_reduce(all, dist::ReduceOp::Max);
  // Tensor parallel: each tp rank holds rows or columns of the matrix; its float8 projection
  // casts with the whole matrix's scale.
  if (options_.tensor_parallel) options_.tensor_parallel->all_reduce(all, dist::ReduceOp::Max);
  int64_t at_elem = 0;
  for (size_t k = 0; k < units.size(); ++k) {
    UnitState& u = units_[units[k]];
    u.float8_amax = all.narrow(0, at_elem, local[k].numel());
    at_elem += local[k].numel();
  }
}

void FsdpModel::start_float8_gather(size_t i) {
  UnitState& u = units_[i];
  const Float8Gather& g = impl_->float8[i];
  if (!u.float8_amax.defined()) {
    std::vector<size_t> stale{i};
    if (options_.float8_precompute_scales) {
      stale.clear();
      for (size_t k = 0; k < units_.size(); ++k) {
        if (gathers_float8(k) && !units_[k].float8_amax.defined()) stale.push_back(k);
      }
    }
    compute_float8_amax(stale);
  }
  const at::Tensor& src = u.shadow.defined() ? u.shadow : u.master;
  const at::Tensor scales = ops::float8_tensorwise_scale(u.float8_amax);
  // One 16-byte row per matrix: cuBLASLt rejects a scale that starts 4 bytes into a vector.
  // (Column 1 takes the cast kernels' own copies of the inverse scales.)
  at::Tensor rows = at::zeros({scales.size(0), 4}, scales.options());
  rows.select(1, 0).copy_(at::reciprocal(scales));
  u.float8_inv_scales = rows.select(1, 0);
  const auto on_device = at::TensorOptions().device(device_);
  // Bytes outside the float8 matrices are never read.
  at::Tensor shard8 = at::empty({u.shard_numel}, on_device.dtype(at::kByte));
  for (const auto& piece : g.pieces) {
    const auto r = static_cast<int64_t>(piece.range);
    ops::float8_cast_with_amax_into(
        src.narrow(0, piece.shard_offset, piece.numel).to(device_), u.float8_amax.narrow(0, r, 1),
        shard8.narrow(0, piece.shard_offset, piece.numel).view(at::kFloat8_e4m3fn),
        rows.select(1, 1).narrow(0, r, 1));
  }
  if (!shard_) {
    // One rank holds the whole unit: its float8 matrices and other parameters are the
    // "gathered" unit, cast straight from the masters with no communication.
    u.full8 = shard8;
    u.rest = at::empty({g.rest_numel}, on_device.dtype(options_.param_dtype));
    for (const auto& seg : g.segments) {
      u.rest.narrow(0, seg.packed_pos, seg.numel)
          .copy_(src.narrow(0, seg.shard_offset, seg.numel), /*non_blocking=*/true);
    }
    return;
  }
  u.full8 = at::empty({u.shard_numel * dp_shard_size()}, on_device.dtype(at::kByte));
  impl_->gathers[i] = shard_->all_gather_into(u.full8, shard8, /*async=*/true);
  // Both gathers run in order on the group's stream: the run-ahead bound counts the unit once.
  if (g.rest_stride == 0) throttle(impl_->gathers[i]);
  if (g.rest_stride > 0) {
    const auto compute = on_device.dtype(options_.param_dtype);
    at::Tensor packed = at::zeros({g.rest_stride}, compute);
    for (const auto& seg : g.segments) {
      if (seg.owner != dp_shard_rank()) continue;
      packed.narrow(0, seg.rank_pos, seg.numel)
          .copy_(src.narrow(0, seg.shard_offset, seg.numel), /*non_blocking=*/true);
    }
    u.rest = at::empty({g.rest_stride * dp_shard_size()}, compute);
    impl_->rest_gathers[i] = shard_->all_gather_into(u.rest, packed, /*async=*/true);
    throttle(impl_->rest_gathers[i]);
  }
}

model::GatheredUnit FsdpModel::gathered(size_t i) {
  model::GatheredUnit g;
  const at::Tensor& flat = gather(i);
  if (!gathers_float8(i)) {
    g.flat = flat;
    return g;
  }
  const UnitState& u = units_[i];
  g.flat8 = u.full8.view(at::kFloat8_e4m3fn);
  g.inv_scales = u.float8_inv_scales;
  g.rest = u.rest;
  g.float8_ranges = &options_.float8_ranges[i];
  return g;
}

bool FsdpModel::reshard_after_forward(size_t i) const {
  return options_.reshard_after_forward.empty() || options_.reshard_after_forward[i];
}

void FsdpModel::prefetch(size_t i) {
  if (i >= units_.size() || !shard_) return;
  UnitState& u = units_[i];
  if (u.gathered || impl_->gathers[i]) return;
  if (gathers_float8(i)) {
    start_float8_gather(i);
    return;
  }
  const at::Tensor& sc = u.shadow.defined() ? u.shadow : u.master;
  u.full = at::empty({u.shard_numel * dp_shard_size()},
                     at::TensorOptions().dtype(options_.param_dtype).device(device_));
  impl_->gathers[i] = shard_->all_gather_into(u.full, sc, /*async=*/true);
  throttle(impl_->gathers[i]);
}

void FsdpModel::throttle(const dist::WorkPtr& work) {
  impl_->in_flight.push_back(work);
  while (impl_->in_flight.size() > kMaxInFlight) {
    impl_->in_flight.front()->synchronize();
    impl_->in_flight.pop_front();
  }
}

const at::Tensor& FsdpModel::gather(size_t i) {
  UnitState& u = units_[i];
  if (u.gathered) return u.full;
  if (!shard_ && gathers_float8(i)) {
    start_float8_gather(i);  // no communication: cast in place of the gather (use gathered())
    u.gathered = true;
    return u.full;
  }
  if (!shard_) {
    if (u.shadow.defined()) {
      u.full = u.shadow;
    } else if (u.master.device() == device_ && u.master.scalar_type() == options_.param_dtype) {
      u.full = u.master;
    } else {
      u.full = u.master.to(device_, options_.param_dtype, /*non_blocking=*/true);
    }
  } else {
    prefetch(i);
    impl_->gathers[i]->wait();
    impl_->gathers[i].reset();
    if (impl_->rest_gathers[i]) {
      impl_->rest_gathers[i]->wait();
      impl_->rest_gathers[i].reset();
      // Every rank's runs, back to back in flat order.
      const Float8Gather& g = impl_->float8[i];
      at::Tensor rest = at::empty({g.rest_numel}, u.rest.options());
      for (const auto& seg : g.segments) {
        rest.narrow(0, seg.packed_pos, seg.numel)
            .copy_(u.rest.narrow(0, seg.owner * g.rest_stride + seg.rank_pos, seg.numel));
      }
      u.rest = rest;
    }
  }
  u.gathered = true;
  return u.full;
}

void FsdpModel::release(size_t i, bool after_forward) {
  UnitState& u = units_[i];
  if (after_forward && !reshard_after_forward(i)) return;
  for (auto* work : {&impl_->gathers[i], &impl_->rest_gathers[i]}) {
    if (*work) {
      (*work)->wait();
      work->reset();
    }
  }
  u.full = at::Tensor();
  u.full8 = at::Tensor();
  u.rest = at::Tensor();
  u.gathered = false;
}

void FsdpModel::release_all() {
  for (size_t i = 0; i < units_.size(); ++i) release(i, /*after_forward=*/false);
}

at::Tensor& FsdpModel::full_grad(size_t i, bool* accumulate) {
  UnitState& u = units_[i];
  if (options_.accumulate_across_microbatches) {
    // One buffer for the whole step, zeroed at its first use; every write adds.
    if (!u.full_grad.defined()) {
      if (!shard_ && !options_.cpu_offload) {
        u.grad.zero_();
        u.full_grad = u.grad;
      } else {
        u.full_grad = at::zeros({u.shard_numel * dp_shard_size()},
                                at::TensorOptions().dtype(at::kFloat).device(device_));
      }
    }
    *accumulate = true;
    return u.full_grad;
  }
  if (!shard_ && !options_.cpu_offload) {
    // Unsharded: the shard gradient itself; the step's first micro-batch overwrites it. Its
    // alignment gaps were zeroed at allocation and are never written.
    u.full_grad = u.grad;
    *accumulate = impl_->grad_written[i];
    return u.full_grad;
  }
  // A fresh buffer per micro-batch: every parameter's gradient is written once, so only the
  // gaps between parameters (and the padding to a multiple of dp_shard) need zeros.
  u.full_grad = at::empty({u.shard_numel * dp_shard_size()},
                          at::TensorOptions().dtype(at::kFloat).device(device_));
  int64_t pos = 0;
  for (const auto& p : u.layout.params) {
    if (p.offset > pos) u.full_grad.narrow(0, pos, p.offset - pos).zero_();
    pos = p.offset + p.numel;
  }
  if (u.full_grad.numel() > pos) u.full_grad.narrow(0, pos, u.full_grad.numel() - pos).zero_();
  *accumulate = false;
  return u.full_grad;
}

namespace {

// Folds a finished reduction into the shard gradient; starts the replicate all-reduce.
void complete(Pending& p, UnitState& u, bool first_write, dist::Communicator* replicate,
              std::vector<dist::WorkPtr>& final_works, std::vector<HostAdd>& host_adds,
              bool& host_copies_in_flight, size_t unit) {
  if (p.work) p.work->wait();
  if (p.reduced.defined() && u.grad.device() != p.reduced.device()) {
    // Offload: replicas are reduced on the device (every micro-batch: the host accumulates),
    // then the shard goes to pinned host memory without blocking the host.
    if (p.then_replicate && replicate) replicate->all_reduce(p.reduced, dist::ReduceOp::Sum);
    at::Tensor src = p.reduced.scalar_type() == at::kFloat ? p.reduced : p.reduced.to(at::kFloat);
    if (first_write) {
      u.grad.copy_(src, /*non_blocking=*/true);
    } else {
      at::Tensor staging = at::empty(u.grad.sizes(), u.grad.options().pinned_memory(true));
      staging.copy_(src, /*non_blocking=*/true);
      host_adds.push_back({unit, staging});
    }
    host_copies_in_flight = true;
    return;
  }
  if (p.reduced.defined()) {
    at::Tensor r = p.reduced.to(u.grad.device(), at::kFloat, /*non_blocking=*/true);
    if (first_write) {
      u.grad.copy_(r, /*non_blocking=*/true);
    } else {
      u.grad.add_(r);
    }
  }
  if (p.then_replicate && replicate) {
    final_works.push_back(replicate->all_reduce(u.grad, dist::ReduceOp::Sum, /*async=*/true));
  }
}

}  // namespace

void FsdpModel::reduce_grad(size_t i, bool last_microbatch) {
  UnitState& u = units_[i];
  TITAN_INTERNAL_CHECK(u.full_grad.defined(), "reduce_grad of unit ", u.layout.name,
                       " without a gradient");
  if (options_.accumulate_across_microbatches && !last_microbatch) return;
  // Fold in reductions of earlier units first: they were issued a whole unit of backward ago.
  fold_pending();
  Pending p;
  p.unit = i;
  if (shard_) {
    at::Tensor in = u.full_grad;
    if (options_.reduce_dtype != at::kFloat) in = in.to(options_.reduce_dtype);
    at::Tensor out = at::empty({u.shard_numel}, in.options());
    p.work = shard_->reduce_scatter(out, in, dist::ReduceOp::Sum, /*async=*/true);
    throttle(p.work);
    p.reduced = out;
    p.keep_alive = in;
    // Offload accumulates micro-batches on the host, so each one is all-reduced by itself.
    p.then_replicate = (last_microbatch || options_.cpu_offload) && replicate_ != nullptr;
    p.last = last_microbatch;
    impl_->pending.push_back(std::move(p));
  } else if (options_.cpu_offload) {
    p.reduced = u.full_grad;  // copied into the pinned host gradient
    p.then_replicate = replicate_ != nullptr;
    impl_->pending.push_back(std::move(p));
  } else if (last_microbatch && replicate_) {
    // DDP: gradients accumulated in place; one averaging all-reduce per unit, started now so
    // it overlaps the backward of the units before it.
    dist::WorkPtr work;
    if (options_.reduce_dtype == at::kFloat) {
      work = replicate_->all_reduce(u.grad, dist::ReduceOp::Sum, true);
      impl_->final_works.push_back(work);
    } else {
      at::Tensor low = u.grad.to(options_.reduce_dtype);
      replicate_->all_reduce(low, dist::ReduceOp::Sum, false);
      u.grad.copy_(low);
    }
    impl_->grad_written[i] = true;
    grad_final(i, work);
  } else {
    impl_->grad_written[i] = true;
    if (last_microbatch) grad_final(i, nullptr);
  }
  u.full_grad = at::Tensor();
}

void FsdpModel::fold_pending() {
  while (!impl_->pending.empty()) {
    Pending p = std::move(impl_->pending.front());
    impl_->pending.pop_front();
    const bool first = !impl_->grad_written[p.unit];
    const size_t works_before = impl_->final_works.size();
    complete(p, units_[p.unit], first, replicate_, impl_->final_works, impl_->host_adds,
             impl_->host_copies_in_flight, p.unit);
    impl_->grad_written[p.unit] = true;
    if (p.last) {
      grad_final(p.unit,
                 impl_->final_works.size() > works_before ? impl_->final_works.back() : nullptr);
    }
  }
}

void FsdpModel::set_on_grad_final(GradFinal on_final) {
  TITAN_CHECK(!on_final || !options_.cpu_offload,
              "optimizer.early_step_in_backward with training.enable_cpu_offload: offloaded "
              "gradients are accumulated on the host after the backward; turn one of them off");
  impl_->on_grad_final = std::move(on_final);
}

void FsdpModel::grad_final(size_t i, const dist::WorkPtr& work) {
  if (impl_->on_grad_final) impl_->on_grad_final(i, work);
}

std::vector<ShardSlice> FsdpModel::shard_slices() const {
  std::vector<ShardSlice> out;
  for (size_t i = 0; i < units_.size(); ++i) {
    const auto& u = units_[i];
    const int64_t lo = u.shard_begin, hi = u.shard_begin + u.shard_numel;
    for (const auto& p : u.layout.params) {
      const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
      if (a < b) out.push_back({i, &p, a - lo, a - p.offset, b - a});
    }
  }
  return out;
}

void FsdpModel::finish_grad_reduction() {
  fold_pending();
  for (auto& w : impl_->final_works) w->wait();
  impl_->final_works.clear();
  if (impl_->host_copies_in_flight) {
    synchronize(device_);  // every device-to-host gradient copy has landed
    for (auto& a : impl_->host_adds) units_[a.unit].grad.add_(a.staging);
    impl_->host_adds.clear();
    impl_->host_copies_in_flight = false;
  }
  sum_replicated_grads_over_tp();
}

void FsdpModel::sum_tp_replicated_grads(size_t i) {
  if (!options_.tensor_parallel || impl_->tp_summed[i]) return;
  sum_replicated_grads_over_tp(i);
}

void FsdpModel::sum_replicated_grads_over_tp(std::optional<size_t> only) {
  dist::Communicator* tp = options_.tensor_parallel;
  if (!tp) return;
  // Every tp rank holds the same units and shard ranges, so the same slices, in one packed
  // all-reduce (a few norm vectors per block: small), for the units not summed yet.
  std::vector<at::Tensor> views;
  for (const auto& s : shard_slices()) {
    if (s.param->tp.replicated() && !impl_->tp_summed[s.unit] && (!only || s.unit == *only))
      views.push_back(units_[s.unit].grad.narrow(0, s.shard_offset, s.numel));
  }
  if (only) {
    impl_->tp_summed[*only] = true;
  } else {
    impl_->tp_summed.assign(units_.size(), true);
  }
  if (views.empty()) return;
  at::Tensor packed = at::cat(views).to(device_);
  tp->all_reduce(packed, dist::ReduceOp::Sum);
  int64_t at_elem = 0;
  for (auto& v : views) {
    v.copy_(packed.narrow(0, at_elem, v.numel()));
    at_elem += v.numel();
  }
}

void FsdpModel::zero_grad() {
  // Weights changed at the last step: nothing gathered before may be used again.
  weights_changed();
  // Nothing is zeroed: the first micro-batch of a step overwrites every gradient (unsharded
  // units in the backward itself, sharded ones when the first reduction lands).
  for (size_t i = 0; i < units_.size(); ++i) impl_->grad_written[i] = false;
  impl_->tp_summed.assign(units_.size(), false);
}

std::vector<at::Tensor> FsdpModel::master_shards() const {
  std::vector<at::Tensor> out;
  for (const auto& u : units_) out.push_back(u.master);
  return out;
}

std::vector<at::Tensor> FsdpModel::grad_shards() const {
  std::vector<at::Tensor> out;
  for (const auto& u : units_) out.push_back(u.grad);
  return out;
}

namespace {

at::Tensor sum_of_squares(const std::vector<at::Tensor>& grads, c10::Device device) {
  at::Tensor sq;
  if (grads.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (ops::use_fused(grads.front())) {
#ifdef TITAN_WITH_CUDA
    // titan's kernel: one memory-bound pass, fp64 partials per fixed chunk (deterministic).
    sq = kernels::sum_of_squares(grads);
#endif
  } else if (grads.front().is_cuda()) {
    // ATen's multi-tensor kernel; it reduces in a tree, accurate in fp32.
    sq = at::stack(at::_foreach_norm(grads, 2)).square().sum();
  } else {
    // ATen's CPU norm accumulates fp32 serially (about 3e-5 relative error on a million
    // elements); sum the squares in double instead.
    sq = at::zeros({}, at::TensorOptions().dtype(at::kDouble));
    for (const auto& g : grads) sq += at::linalg_vector_norm(g, 2, {}, false, at::kDouble).square();
    sq = sq.to(at::kFloat);
  }
  if (sq.device() != device) sq = sq.to(device);
  return sq;
}

}  // namespace

at::Tensor FsdpModel::grad_norm_squared() const {
  dist::Communicator* tp = options_.tensor_parallel;
  std::vector<at::Tensor> counted;
  if (!tp || tp->rank() == 0) {
    counted = grad_shards();
  } else {
    // Parameters every tp rank holds whole count on tp rank 0 only; tp parts everywhere.
    for (const auto& s : shard_slices()) {
      if (!s.param->tp.replicated()) {
        counted.push_back(units_[s.unit].grad.narrow(0, s.shard_offset, s.numel));
      }
    }
  }
  at::Tensor sq = sum_of_squares(counted, device_);
  // Each element lives on exactly one shard rank; replicas hold identical copies.
  if (shard_) shard_->all_reduce(sq, dist::ReduceOp::Sum);
  if (tp) tp->all_reduce(sq, dist::ReduceOp::Sum);
  return sq;
}

}  // namespace titan::parallel
