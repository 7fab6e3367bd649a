// ParallelDims answers every "is X enabled / how big is Y" question from the parallelism.*
// degrees; DeviceMesh lays the world out as [pp, dp_replicate, dp_shard, cp, tp] (tp
// innermost: contiguous ranks, same node) and owns one communicator per group.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "titan/config/job_config.h"
#include "titan/dist/communicator.h"

namespace titan::dist {

struct ParallelDims {
  int64_t pp = 1, dp_replicate = 1, dp_shard = 1, cp = 1, tp = 1;
  int64_t world = 1;

  // Validates the degrees against `world` (dp_shard = -1 takes what is left); throws
  // titan::Error showing the arithmetic.
  static ParallelDims from_config(const config::ParallelismSection& p, int64_t world);

  int64_t dp() const { return dp_replicate * dp_shard; }
  bool dp_enabled() const { return dp() > 1; }
  bool dp_replicate_enabled() const { return dp_replicate > 1; }
  bool fsdp_enabled() const { return dp_shard * cp > 1; }
  bool ddp_only() const { return dp_replicate > 1 && dp_shard == 1; }
  bool hsdp_enabled() const { return dp_replicate > 1 && dp_shard > 1; }
  bool tp_enabled() const { return tp > 1; }
  bool pp_enabled() const { return pp > 1; }
  bool cp_enabled() const { return cp > 1; }
  std::string describe() const;
};

class DeviceMesh {
 public:
  static constexpr std::array<const char*, 5> kDims = {"pp", "dp_replicate", "dp_shard", "cp",
                                                       "tp"};

  // Splits `world` (nullptr for one process) into every group the dims need. Collective:
  // all ranks construct their mesh together.
  DeviceMesh(ParallelDims dims, int rank, Communicator* world);

  const ParallelDims& dims() const { return dims_; }
  int rank() const { return rank_; }
  // Coordinate of this rank along a dim ("pp", "dp_replicate", "dp_shard", "cp", "tp").
  int64_t coordinate(const std::string& dim) const;
  // Size of a dim or a flattened group ("dp", "dp_shard_cp", "dp_cp").
  int64_t size(const std::string& group) const;
  // This rank's index in a dim or flattened group.
  int64_t group_rank(const std::string& group) const;
  // The group's communicator; nullptr when the group has one member.
  Communicator* group(const std::string& group) const;
  // Global ranks of this rank's group.
  std::vector<int> group_members(const std::string& group) const;
  std::string describe() const;
  // Pipelines: the communicator carrying this rank's point-to-point traffic to (`send`) or from
  // the rank at pipeline coordinate `pp` (a neighbour: pp +- 1 modulo the degree), and the
  // peer's rank in it. Each direction between two neighbours has its own two-rank
  // communicator, so a transfer waiting for its peer never holds up one in the other direction
  // (NCCL runs the operations of one communicator in order).
  std::pair<Communicator*, int> pp_link(int64_t pp, bool send) const;
  // Aborts every group communicator (watchdog).
  void abort_all();

 private:
  std::vector<std::string> dims_of(const std::string& group) const;
  void make_pp_links(Communicator* world);
  int64_t dim_size(size_t d) const;
  ParallelDims dims_;
  int rank_;
  std::array<int64_t, 5> coord_{};
  std::map<std::string, Communicator*> groups_;                 // "dp" may alias "dp_shard", ...
  std::map<std::pair<int64_t, bool>, Communicator*> pp_links_;  // (neighbour, send)
  std::vector<std::unique_ptr<Communicator>> owned_;
};

}  // namespace titan::dist
