// The one communication interface every parallelism uses: collectives over a group of ranks
// (one mesh dimension, or a flattened set of them), with synchronous and asynchronous forms.
// Backends: NCCL (CUDA tensors; own streams ordered by CUDA events, no host synchronization)
// and Gloo (CPU tensors; LibTorch's ProcessGroupGloo). Every call is numbered and recorded by
// the flight recorder so the watchdog can name a stuck collective.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace titan::dist {

class FlightRecorder;

enum class ReduceOp { Sum, Avg, Max };
const char* reduce_op_name(ReduceOp op);

// Who among `members` (global ranks) has died, in words ("rank 2 stopped ..."), or "" when
// unknown; the runtime installs it (heartbeats in the store), backends call it when a transfer
// fails because a peer went away.
using PeerDiagnosis = std::function<std::string(const std::vector<int>& members)>;
void set_peer_diagnosis(PeerDiagnosis diagnosis);
std::string diagnose_peers(const std::vector<int>& members);

// An operation in flight.
class Work {
 public:
  virtual ~Work() = default;
  // Orders what comes after it behind the operation: on CUDA the current stream waits for it
  // (the host does not block); on CPU the caller blocks until it is done.
  virtual void wait() = 0;
  // Blocks the host until the operation is done (CUDA: its end event; CPU: as wait()). Bounds
  // how far the host runs ahead of the device, e.g. to cap memory awaiting the device.
  virtual void synchronize() { wait(); }
  // Non-blocking checks: has the operation begun / finished on the device or network?
  virtual bool started() { return true; }
  virtual bool completed() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// One side of a point-to-point transfer inside a batch; `peer` is a rank of the group.
struct P2POp {
  enum class Kind { Send, Recv };
  Kind kind = Kind::Send;
  at::Tensor tensor;
  int peer = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Group name, e.g. "world", "dp_shard", "dp_shard_cp".
  const std::string& name() const { return name_; }
  // Global ranks of the members, in group-rank order.
  const std::vector<int>& global_ranks() const { return global_ranks_; }
  virtual std::string backend() const = 0;

  // In place over `t` (every rank's tensor has the same shape).
  WorkPtr all_reduce(const at::Tensor& t, ReduceOp op, bool async = false);
  // out = concat over ranks of `in`; out.numel() == size * in.numel().
  WorkPtr all_gather_into(const at::Tensor& out, const at::Tensor& in, bool async = false);
  // out = rank's slice of the reduction of `in`; in.numel() == size * out.numel().
  WorkPtr reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op,
                         bool async = false);
  WorkPtr broadcast(const at::Tensor& t, int root, bool async = false);
  // Sends and receives issued together (pipeline stages exchange both ways at once).
  WorkPtr send_recv(const std::vector<P2POp>& ops, bool async = false);
  // Equal splits: rank r sends in[j-th block] to rank j and receives out[j-th block] from j.
  WorkPtr all_to_all(const at::Tensor& out, const at::Tensor& in, bool async = false);
  void barrier();

  // Stops all communication of this group at once (watchdog); further calls are invalid.
  virtual void abort() = 0;

  // A sub-group: every rank of this communicator calls split() in the same order; ranks with
  // the same `color` form one group, ordered by `key`. `global_ranks`: the new group's members.
  // A negative color takes part without joining a group (returns nullptr).
  virtual std::unique_ptr<Communicator> split(const std::string& name, int color, int key,
                                              std::vector<int> global_ranks) = 0;

 protected:
  Communicator(std::string name, int rank, int size, std::vector<int> global_ranks,
               FlightRecorder* recorder);

  virtual WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op) = 0;
  virtual WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in) = 0;
  virtual WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op) = 0;
  virtual WorkPtr do_broadcast(const at::Tensor& t, int root) = 0;
  virtual WorkPtr do_send_recv(const std::vector<P2POp>& ops) = 0;
  virtual WorkPtr do_all_to_all(const at::Tensor& out, const at::Tensor& in) = 0;
  virtual WorkPtr do_barrier() = 0;
  FlightRecorder* recorder() const { return recorder_; }

 private:
  template <typename F>
  WorkPtr run(const char* op, const at::Tensor& t, bool async, F&& issue);
  std::string name_;
  int rank_, size_;
  std::vector<int> global_ranks_;
  FlightRecorder* recorder_;
};

}  // namespace titan::dist
