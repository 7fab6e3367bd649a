// ParallelDims validation and DeviceMesh group construction.
#include "titan/dist/device_mesh.h"

#include <algorithm>
#include <sstream>

#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::dist {

ParallelDims ParallelDims::from_config(const config::ParallelismSection& p, int64_t world) {
  ParallelDims d;
  d.world = world;
  d.pp = p.pipeline_parallel_degree;
  d.dp_replicate = p.data_parallel_replicate_degree;
  d.cp = p.context_parallel_degree;
  d.tp = p.tensor_parallel_degree;
  const int64_t others = d.pp * d.dp_replicate * d.cp * d.tp;
  if (p.data_parallel_shard_degree == -1) {
    TITAN_CHECK(world % others == 0, "parallelism: world size ", world,
                " is not divisible by pipeline (", d.pp, ") x data_parallel_replicate (",
                d.dp_replicate, ") x context (", d.cp, ") x tensor (", d.tp, ") = ", others,
                ", so data_parallel_shard_degree = -1 cannot take the rest");
    d.dp_shard = world / others;
  } else {
    d.dp_shard = p.data_parallel_shard_degree;
  }
  const int64_t product = others * d.dp_shard;
  TITAN_CHECK(product == world, "parallelism: pipeline (", d.pp, ") x data_parallel_replicate (",
              d.dp_replicate, ") x data_parallel_shard (", d.dp_shard, ") x context (", d.cp,
              ") x tensor (", d.tp, ") = ", product, ", but the world size is ", world,
              "; the product of the degrees must equal the number of processes");
  return d;
}

std::string ParallelDims::describe() const {
  std::ostringstream s;
  s << "world " << world << " = pp " << pp << " x dp_replicate " << dp_replicate << " x dp_shard "
    << dp_shard << " x cp " << cp << " x tp " << tp;
  std::vector<std::string> on;
  if (ddp_only()) on.push_back("DDP");
  if (hsdp_enabled()) on.push_back("HSDP");
  if (!hsdp_enabled() && dp_shard > 1) on.push_back("FSDP");
  if (tp_enabled()) on.push_back("TP");
  if (pp_enabled()) on.push_back("PP");
  if (cp_enabled()) on.push_back("CP");
  s << " (" << (on.empty() ? std::string("single device") : util::join(on, "+")) << ")";
  return s.str();
}

int64_t DeviceMesh::dim_size(size_t d) const {
  switch (d) {
    case 0: return dims_.pp;
    case 1: return dims_.dp_replicate;
    case 2: return dims_.dp_shard;
    case 3: return dims_.cp;
    default: return dims_.tp;
  }
}

std::vector<std::string> DeviceMesh::dims_of(const std::string& group) const {
  if (group == "dp") return {"dp_replicate", "dp_shard"};
  if (group == "dp_shard_cp") return {"dp_shard", "cp"};
  if (group == "dp_cp") return {"dp_replicate", "dp_shard", "cp"};
  if (group == "world") return {"pp", "dp_replicate", "dp_shard", "cp", "tp"};
  for (const char* d : kDims) {
    if (group == d) return {group};
  }
  internal_fail("unknown mesh group ", group);
}

namespace {
size_t dim_index(const std::string& name) {
  for (size_t i = 0; i < DeviceMesh::kDims.size(); ++i) {
    if (name == DeviceMesh::kDims[i]) return i;
  }
  internal_fail("unknown mesh dim ", name);
}
}  // namespace

DeviceMesh::DeviceMesh(ParallelDims dims, int rank, Communicator* world)
    : dims_(dims), rank_(rank) {
  // rank = ((((pp * R + r) * S + s) * C + c) * T + t)
  int64_t rest = rank;
  for (size_t d = kDims.size(); d-- > 0;) {
    coord_[d] = rest % dim_size(d);
    rest /= dim_size(d);
  }
  const std::vector<std::string> groups = {"pp", "dp_replicate", "dp_shard",    "cp",
                                           "tp", "dp",           "dp_shard_cp", "dp_cp"};
  std::map<std::vector<std::string>, Communicator*> by_effective_dims;
  for (const auto& g : groups) {
    if (size(g) <= 1 || world == nullptr) continue;
    // color: index over the dims outside the group; key: index inside it.
    const auto inside = dims_of(g);
    // Groups whose dims of size > 1 coincide have the same members: share one communicator.
    std::vector<std::string> effective;
    for (const auto& d : inside) {
      if (dim_size(dim_index(d)) > 1) effective.push_back(d);
    }
    if (auto it = by_effective_dims.find(effective); it != by_effective_dims.end()) {
      groups_[g] = it->second;
      continue;
    }
    int64_t color = 0, key = 0;
    for (size_t d = 0; d < kDims.size(); ++d) {
      const bool in = std::find(inside.begin(), inside.end(), kDims[d]) != inside.end();
      if (in) {
        key = key * dim_size(d) + coord_[d];
      } else {
        color = color * dim_size(d) + coord_[d];
      }
    }
    owned_.push_back(
        world->split(g, static_cast<int>(color), static_cast<int>(key), group_members(g)));
    groups_[g] = owned_.back().get();
    by_effective_dims[effective] = owned_.back().get();
  }
  if (dims_.pp > 1 && world != nullptr) make_pp_links(world);
  // Every rank has connected every group before any goes on: a rank that then stops at a
  // configuration error must not break a peer's connection still being set up (the peer would
  // report a transport failure instead of the same configuration error).
  if (world != nullptr) world->barrier();
}

void DeviceMesh::make_pp_links(Communicator* world) {
  // Edges (i, i + 1 mod p) between neighbouring pipeline coordinates, colored so that no two
  // edges of one color share a rank: even/odd edges, and the wrap-around edge of an odd degree
  // on its own. One split per (color, direction); ranks outside the color's edges take part
  // without a group.
  const int64_t p = dims_.pp, q = coord_[0];
  const int64_t edges = p == 2 ? 1 : p;
  auto color_of = [&](int64_t i) -> int64_t { return (p % 2 == 1 && i == p - 1) ? 2 : i % 2; };
  // Index of this rank among the ranks sharing its pipeline coordinate.
  const int64_t others = static_cast<int64_t>(rank_) % (dims_.world / p);
  const std::vector<int> pp_members = group_members("pp");
  for (int64_t c = 0; c < 3; ++c) {
    bool any = false;
    for (int64_t i = 0; i < edges; ++i) any = any || color_of(i) == c;
    if (!any) continue;
    for (int dir = 0; dir < 2; ++dir) {
      int64_t edge = -1;
      for (int64_t i = 0; i < edges; ++i) {
        if (color_of(i) == c && (q == i || q == (i + 1) % p)) edge = i;
      }
      const std::string name = "pp_link" + std::to_string(c) + (dir == 0 ? "_up" : "_down");
      if (edge < 0) {
        world->split(name, -1, 0, {});
        continue;
      }
      const int64_t lo = edge, hi = (edge + 1) % p;
      const std::vector<int> members = {pp_members[static_cast<size_t>(lo)],
                                        pp_members[static_cast<size_t>(hi)]};
      const int key = q == lo ? 0 : 1;
      owned_.push_back(world->split(name, static_cast<int>(others * p + edge), key, members));
      // dir 0 carries lo -> hi, dir 1 carries hi -> lo.
      const bool sender = (dir == 0) == (q == lo);
      pp_links_[{q == lo ? hi : lo, sender}] = owned_.back().get();
    }
  }
}

std::pair<Communicator*, int> DeviceMesh::pp_link(int64_t pp, bool send) const {
  auto it = pp_links_.find({pp, send});
  TITAN_INTERNAL_CHECK(it != pp_links_.end(), "no pipeline link between pp ", coord_[0], " and pp ",
                       pp);
  const int peer = it->second->global_ranks()[0] == rank_ ? 1 : 0;
  return {it->second, peer};
}

int64_t DeviceMesh::coordinate(const std::string& dim) const {
  return coord_[dim_index(dim)];
}

int64_t DeviceMesh::size(const std::string& group) const {
  int64_t n = 1;
  for (const auto& d : dims_of(group)) n *= dim_size(dim_index(d));
  return n;
}

int64_t DeviceMesh::group_rank(const std::string& group) const {
  int64_t key = 0;
  for (const auto& d : dims_of(group)) {
    const size_t i = dim_index(d);
    key = key * dim_size(i) + coord_[i];
  }
  return key;
}

Communicator* DeviceMesh::group(const std::string& group) const {
  (void)dims_of(group);
  auto it = groups_.find(group);
  return it == groups_.end() ? nullptr : it->second;
}

std::vector<int> DeviceMesh::group_members(const std::string& group) const {
  const auto inside = dims_of(group);
  std::vector<int> members;
  const int64_t n = size(group);
  for (int64_t k = 0; k < n; ++k) {
    // Decode k into coordinates of the group's dims (row-major), keep the others.
    std::array<int64_t, 5> c = coord_;
    int64_t rest = k;
    for (size_t j = inside.size(); j-- > 0;) {
      const size_t d = dim_index(inside[j]);
      c[d] = rest % dim_size(d);
      rest /= dim_size(d);
    }
    int64_t r = 0;
    for (size_t d = 0; d < kDims.size(); ++d) r = r * dim_size(d) + c[d];
    members.push_back(static_cast<int>(r));
  }
  return members;
}

void DeviceMesh::abort_all() {
  for (auto& c : owned_) c->abort();
}

std::string DeviceMesh::describe() const {
  std::ostringstream s;
  s << dims_.describe() << "; rank " << rank_ << " at [pp " << coord_[0] << ", dp_replicate "
    << coord_[1] << ", dp_shard " << coord_[2] << ", cp " << coord_[3] << ", tp " << coord_[4]
    << "]";
  return s.str();
}

}  // namespace titan::dist
