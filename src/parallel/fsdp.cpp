// FsdpModel: unit storage, gathering and gradient reduction (single-rank path; the
// communicating paths live next to it once the dist layer exists).
#include "titan/parallel/fsdp.h"

#include <ATen/ATen.h>

#include "titan/model/init.h"
#include "titan/util/error.h"

namespace titan::parallel {

struct FsdpModel::Impl {};

FsdpModel::FsdpModel(std::vector<model::UnitLayout> units, dist::Communicator* shard,
                     dist::Communicator* replicate, c10::Device device, FsdpOptions options)
    : shard_(shard),
      replicate_(replicate),
      device_(device),
      options_(options),
      impl_(std::make_unique<Impl>()) {
  TITAN_CHECK(shard_ == nullptr && replicate_ == nullptr,
              "internal: data-parallel communication is not wired yet");
  for (auto& layout : units) {
    UnitState u;
    u.layout = std::move(layout);
    u.shard_numel = u.layout.numel;
    u.shard_begin = 0;
    units_.push_back(std::move(u));
  }
}

FsdpModel::~FsdpModel() = default;

int64_t FsdpModel::dp_shard_size() const { return 1; }
int64_t FsdpModel::dp_shard_rank() const { return 0; }

void FsdpModel::init_weights(int64_t seed) {
  auto opts = at::TensorOptions().dtype(at::kFloat).device(device_);
  for (auto& u : units_) {
    u.master = at::empty({u.shard_numel}, opts);
    model::init_unit_range(u.layout, seed, u.shard_begin, u.master);
    u.grad = at::zeros({u.shard_numel}, opts);
  }
}

bool FsdpModel::reshard_after_forward(size_t i) const {
  switch (options_.reshard) {
    case ReshardPolicy::Always: return true;
    case ReshardPolicy::Never: return false;
    case ReshardPolicy::Default: break;
  }
  // torchtitan: every unit but the last block reshards; the head is used right away by the
  // backward, so keeping it saves a gather.
  const auto kind = units_[i].layout.kind;
  if (kind == model::UnitKind::Head) return false;
  if (kind == model::UnitKind::Block && i + 2 == units_.size()) return false;
  return true;
}

const at::Tensor& FsdpModel::gather(size_t i) {
  UnitState& u = units_[i];
  if (!u.gathered) {
    u.full = u.master.scalar_type() == options_.param_dtype ? u.master
                                                             : u.master.to(options_.param_dtype);
    u.gathered = true;
  }
  return u.full;
}

void FsdpModel::prefetch(size_t i) { (void)i; }

void FsdpModel::release(size_t i, bool after_forward) {
  UnitState& u = units_[i];
  if (after_forward && !reshard_after_forward(i)) return;
  u.full = at::Tensor();
  u.gathered = false;
}

void FsdpModel::release_all() {
  for (size_t i = 0; i < units_.size(); ++i) release(i, /*after_forward=*/false);
}

at::Tensor& FsdpModel::full_grad(size_t i) {
  UnitState& u = units_[i];
  if (!u.full_grad.defined()) u.full_grad = u.grad;  // one rank: accumulate in place
  return u.full_grad;
}

void FsdpModel::reduce_grad(size_t i, bool last_microbatch) {
  (void)last_microbatch;
  units_[i].full_grad = at::Tensor();
}

void FsdpModel::finish_grad_reduction() {}

void FsdpModel::zero_grad() {
  for (auto& u : units_) u.grad.zero_();
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

at::Tensor FsdpModel::grad_norm_squared() const {
  auto norms = at::_foreach_norm(grad_shards(), 2);
  return at::stack(norms).to(at::kFloat).square().sum();
}

}  // namespace titan::parallel
