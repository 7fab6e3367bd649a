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

#include <deque>

#include "titan/dist/communicator.h"
#include "titan/model/init.h"
#include "titan/ops/dispatch.h"
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
};

// Offload: a gradient copy on its way to host memory, to be added once the device is synced.
struct HostAdd {
  size_t unit = 0;
  at::Tensor staging;  // pinned host copy of a later micro-batch's reduced gradient
};

constexpr size_t kMaxInFlight = 2;  // outstanding gathers + reductions before the host waits

struct FsdpModel::Impl {
  std::deque<dist::WorkPtr> in_flight;     // recent gathers/reductions, oldest first
  std::vector<dist::WorkPtr> gathers;      // per unit: an all-gather in flight
  std::deque<Pending> pending;             // reductions whose results are not folded in yet
  std::vector<dist::WorkPtr> final_works;  // replicate all-reduces to wait for at the end
  std::vector<bool> grad_written;          // per unit: shard gradient holds this step's data
  std::vector<HostAdd> host_adds;          // offload: host-side accumulations after the sync
  bool host_copies_in_flight = false;      // offload: device-to-host copies not yet synced
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
  impl_->grad_written.assign(units_.size(), false);
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
  }
  release_all();
}

bool FsdpModel::reshard_after_forward(size_t i) const {
  return options_.reshard_after_forward.empty() || options_.reshard_after_forward[i];
}

void FsdpModel::prefetch(size_t i) {
  if (i >= units_.size() || !shard_) return;
  UnitState& u = units_[i];
  if (u.gathered || impl_->gathers[i]) return;
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
  }
  u.gathered = true;
  return u.full;
}

void FsdpModel::release(size_t i, bool after_forward) {
  UnitState& u = units_[i];
  if (after_forward && !reshard_after_forward(i)) return;
  if (impl_->gathers[i]) {
    impl_->gathers[i]->wait();
    impl_->gathers[i].reset();
  }
  u.full = at::Tensor();
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
    impl_->pending.push_back(std::move(p));
  } else if (options_.cpu_offload) {
    p.reduced = u.full_grad;  // copied into the pinned host gradient
    p.then_replicate = replicate_ != nullptr;
    impl_->pending.push_back(std::move(p));
  } else if (last_microbatch && replicate_) {
    // DDP: gradients accumulated in place; one averaging all-reduce per unit, started now so
    // it overlaps the backward of the units before it.
    if (options_.reduce_dtype == at::kFloat) {
      impl_->final_works.push_back(replicate_->all_reduce(u.grad, dist::ReduceOp::Sum, true));
    } else {
      at::Tensor low = u.grad.to(options_.reduce_dtype);
      replicate_->all_reduce(low, dist::ReduceOp::Sum, false);
      u.grad.copy_(low);
    }
    impl_->grad_written[i] = true;
  } else {
    impl_->grad_written[i] = true;
  }
  u.full_grad = at::Tensor();
}

void FsdpModel::fold_pending() {
  while (!impl_->pending.empty()) {
    Pending p = std::move(impl_->pending.front());
    impl_->pending.pop_front();
    const bool first = !impl_->grad_written[p.unit];
    complete(p, units_[p.unit], first, replicate_, impl_->final_works, impl_->host_adds,
             impl_->host_copies_in_flight, p.unit);
    impl_->grad_written[p.unit] = true;
  }
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

void FsdpModel::sum_replicated_grads_over_tp() {
  dist::Communicator* tp = options_.tensor_parallel;
  if (!tp) return;
  // Every tp rank holds the same units and shard ranges, so the same slices, in one packed
  // all-reduce (a few norm vectors per block: small).
  std::vector<at::Tensor> views;
  for (const auto& s : shard_slices()) {
    if (s.param->tp.replicated())
      views.push_back(units_[s.unit].grad.narrow(0, s.shard_offset, s.numel));
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
  release_all();
  // Nothing is zeroed: the first micro-batch of a step overwrites every gradient (unsharded
  // units in the backward itself, sharded ones when the first reduction lands).
  for (size_t i = 0; i < units_.size(); ++i) impl_->grad_written[i] = false;
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
