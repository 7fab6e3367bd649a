// Communicator front end: argument checks, flight-recorder records, sync/async handling.
#include "titan/dist/communicator.h"

#include <mutex>

#include <ATen/ATen.h>

#include "titan/dist/flight_recorder.h"
#include "titan/util/error.h"

namespace titan::dist {

namespace {
std::mutex diagnosis_mutex;
PeerDiagnosis& diagnosis() {
  static PeerDiagnosis d;
  return d;
}
}  // namespace

void set_peer_diagnosis(PeerDiagnosis d) {
  std::lock_guard<std::mutex> lock(diagnosis_mutex);
  diagnosis() = std::move(d);
}

std::string diagnose_peers(const std::vector<int>& members) {
  PeerDiagnosis d;
  {
    std::lock_guard<std::mutex> lock(diagnosis_mutex);
    d = diagnosis();
  }
  try {
    return d ? d(members) : std::string();
  } catch (const std::exception&) {
    return std::string();
  }
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Avg: return "avg";
    case ReduceOp::Max: return "max";
  }
  return "?";
}

Communicator::Communicator(std::string name, int rank, int size, std::vector<int> global_ranks,
                           FlightRecorder* recorder)
    : name_(std::move(name)),
      rank_(rank),
      size_(size),
      global_ranks_(std::move(global_ranks)),
      recorder_(recorder) {}

template <typename F>
WorkPtr Communicator::run(const char* op, const at::Tensor& t, bool async, F&& issue) {
  uint64_t seq = 0;
  if (recorder_) {
    seq = recorder_->begin(name_, &global_ranks_, op, t.defined() ? t.numel() : 0,
                           t.defined() ? std::string(c10::toString(t.scalar_type())) : "-");
  }
  WorkPtr work = issue();
  if (recorder_) recorder_->attach(name_, seq, work);
  if (!async) {
    work->wait();
    return nullptr;
  }
  return work;
}

namespace {
void check_dense(const at::Tensor& t, const char* what, const std::string& group) {
  TITAN_INTERNAL_CHECK(t.defined() && t.is_contiguous(), "", what, " on group ", group,
                       " needs a contiguous tensor");
}
}  // namespace

WorkPtr Communicator::all_reduce(const at::Tensor& t, ReduceOp op, bool async) {
  check_dense(t, "all_reduce", name_);
  return run("all_reduce", t, async, [&] { return do_all_reduce(t, op); });
}

WorkPtr Communicator::all_gather_into(const at::Tensor& out, const at::Tensor& in, bool async) {
  check_dense(out, "all_gather", name_);
  check_dense(in, "all_gather", name_);
  TITAN_INTERNAL_CHECK(out.numel() == in.numel() * size_ && out.scalar_type() == in.scalar_type(),
                       "all_gather on ", name_, ": output holds ", out.numel(),
                       " elements, expected ", size_, " x ", in.numel());
  return run("all_gather", in, async, [&] { return do_all_gather(out, in); });
}

WorkPtr Communicator::reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op,
                                     bool async) {
  check_dense(out, "reduce_scatter", name_);
  check_dense(in, "reduce_scatter", name_);
  TITAN_INTERNAL_CHECK(in.numel() == out.numel() * size_ && out.scalar_type() == in.scalar_type(),
                       "reduce_scatter on ", name_, ": input holds ", in.numel(),
                       " elements, expected ", size_, " x ", out.numel());
  return run("reduce_scatter", in, async, [&] { return do_reduce_scatter(out, in, op); });
}

WorkPtr Communicator::broadcast(const at::Tensor& t, int root, bool async) {
  check_dense(t, "broadcast", name_);
  TITAN_INTERNAL_CHECK(root >= 0 && root < size_, "broadcast root ", root, " outside group ",
                       name_);
  return run("broadcast", t, async, [&] { return do_broadcast(t, root); });
}

WorkPtr Communicator::send_recv(const std::vector<P2POp>& ops, bool async) {
  int64_t numel = 0;
  for (const auto& o : ops) {
    check_dense(o.tensor, "send/recv", name_);
    TITAN_INTERNAL_CHECK(o.peer >= 0 && o.peer < size_ && o.peer != rank_, "send/recv peer ",
                         o.peer, " invalid in group ", name_);
    numel += o.tensor.numel();
  }
  at::Tensor first = ops.empty() ? at::Tensor() : ops.front().tensor;
  return run("send_recv", first, async, [&] { return do_send_recv(ops); });
}

WorkPtr Communicator::all_to_all(const at::Tensor& out, const at::Tensor& in, bool async) {
  check_dense(out, "all_to_all", name_);
  check_dense(in, "all_to_all", name_);
  TITAN_INTERNAL_CHECK(out.numel() == in.numel() && in.numel() % size_ == 0, "all_to_all on ",
                       name_, " needs equal sizes divisible by ", size_);
  return run("all_to_all", in, async, [&] { return do_all_to_all(out, in); });
}

void Communicator::barrier() {
  run("barrier", at::Tensor(), false, [&] { return do_barrier(); });
}

}  // namespace titan::dist
