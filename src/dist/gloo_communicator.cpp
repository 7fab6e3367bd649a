// Gloo backend: CPU collectives through LibTorch's ProcessGroupGloo (Debian's LibTorch ships
// the headers; pip wheels do not, so GPU builds are NCCL-only).
#include "titan/dist/backends.h"
#include "titan/util/error.h"

#ifdef TITAN_WITH_GLOO
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

namespace titan::dist {
namespace {

// A c10d work, plus the division that turns a sum into an average (Gloo has no AVG).
// A transfer that failed because the other side went away: the message of a user's problem (a
// rank died or was killed), naming the rank when the heartbeats tell.
[[noreturn]] void peer_failed(const std::string& group, const std::vector<int>& members,
                              const std::exception& e) {
  std::string what = e.what();
  what = what.substr(0, what.find('\n'));
  const std::string who = diagnose_peers(members);
  fail("communication on group ", group, " failed: ",
       who.empty() ? std::string("a peer closed its connection (it died or was killed)") : who,
       " (", what, ")");
}

bool looks_like_peer_failure(const std::string& what) {
  for (const char* s : {"Connection closed by peer", "Connection reset by peer", "Broken pipe",
                        "Connection refused", "closed by peer"}) {
    if (what.find(s) != std::string::npos) return true;
  }
  return false;
}

class GlooWork : public Work {
 public:
  GlooWork(std::vector<c10::intrusive_ptr<c10d::Work>> works, at::Tensor divide, int64_t by,
           std::string group, std::vector<int> members)
      : works_(std::move(works)),
        divide_(std::move(divide)),
        by_(by),
        group_(std::move(group)),
        members_(std::move(members)) {}
  void wait() override {
    if (done_) return;
    try {
      for (auto& w : works_) w->wait();
    } catch (const std::exception& e) {
      if (looks_like_peer_failure(e.what())) peer_failed(group_, members_, e);
      throw;
    }
    if (divide_.defined()) divide_.div_(by_);
    done_ = true;
  }
  bool completed() override {
    if (done_) return true;
    for (auto& w : works_) {
      if (!w->isCompleted()) return false;
    }
    return true;
  }

 private:
  std::vector<c10::intrusive_ptr<c10d::Work>> works_;
  at::Tensor divide_;
  int64_t by_;
  std::string group_;
  std::vector<int> members_;
  bool done_ = false;
};

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::Max: return c10d::ReduceOp::MAX;
    default: return c10d::ReduceOp::SUM;
  }
}

class GlooCommunicator : public Communicator {
 public:
  GlooCommunicator(std::string name, c10::intrusive_ptr<c10d::Store> store, int rank, int size,
                   std::vector<int> global_ranks, std::chrono::milliseconds timeout,
                   FlightRecorder* recorder)
      : Communicator(std::move(name), rank, size, std::move(global_ranks), recorder),
        store_(std::move(store)),
        timeout_(timeout) {
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    opts->threads = 2;
    pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store_, rank, size, opts);
  }

  std::string backend() const override { return "gloo"; }
  void abort() override {}  // the watchdog ends the process; Gloo needs no device reset

  std::unique_ptr<Communicator> split(const std::string& name, int color, int key,
                                      std::vector<int> global_ranks) override {
    if (color < 0) return nullptr;  // not a member of any new group
    auto prefix = c10::make_intrusive<c10d::PrefixStore>(
        "titan/group/" + name + "/" + std::to_string(color), store_);
    const int size = static_cast<int>(global_ranks.size());
    return std::make_unique<GlooCommunicator>(name, prefix, key, size, std::move(global_ranks),
                                              timeout_, recorder());
  }

 protected:
  WorkPtr do_all_reduce(const at::Tensor& t, ReduceOp op) override {
    std::vector<at::Tensor> v{t};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    auto w = pg_->allreduce(v, o);
    return wrap({w}, op == ReduceOp::Avg ? t : at::Tensor());
  }
  // Flat views: like NCCL, the collectives see contiguous elements whatever the shapes.
  WorkPtr do_all_gather(const at::Tensor& out, const at::Tensor& in) override {
    at::Tensor o = out.view({-1}), i = in.view({-1});
    return wrap({pg_->_allgather_base(o, i)}, at::Tensor());
  }
  WorkPtr do_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op) override {
    at::Tensor o = out.view({-1}), i = in.view({-1});
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = to_c10d(op);
    return wrap({pg_->_reduce_scatter_base(o, i, opts)}, op == ReduceOp::Avg ? out : at::Tensor());
  }
  WorkPtr do_broadcast(const at::Tensor& t, int root) override {
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return wrap({pg_->broadcast(v, o)}, at::Tensor());
  }
  WorkPtr do_send_recv(const std::vector<P2POp>& ops) override {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (const auto& op : ops) {
      std::vector<at::Tensor> v{op.tensor};
      works.push_back(op.kind == P2POp::Kind::Send ? pg_->send(v, op.peer, 0)
                                                   : pg_->recv(v, op.peer, 0));
    }
    return wrap(std::move(works), at::Tensor());
  }
  WorkPtr do_all_to_all(const at::Tensor& out, const at::Tensor& in) override {
    at::Tensor o = out, i = in;
    std::vector<int64_t> splits;
    c10d::AllToAllOptions opts;
    return wrap({pg_->alltoall_base(o, i, splits, splits, opts)}, at::Tensor());
  }
  WorkPtr do_barrier() override {
    // A one-element all-reduce: ProcessGroupGloo's barrier is a collective too, but this form
    // shows up in the flight recorder like every other operation.
    at::Tensor t = at::zeros({1});
    std::vector<at::Tensor> v{t};
    return wrap({pg_->allreduce(v)}, at::Tensor());
  }

 private:
  WorkPtr wrap(std::vector<c10::intrusive_ptr<c10d::Work>> works, at::Tensor divide) {
    return std::make_shared<GlooWork>(std::move(works), std::move(divide), size(), name(),
                                      global_ranks());
  }

  c10::intrusive_ptr<c10d::Store> store_;
  std::chrono::milliseconds timeout_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
};

}  // namespace

bool gloo_available() {
  return true;
}

std::unique_ptr<Communicator> make_gloo_world(c10d::Store* store, int rank, int size,
                                              std::chrono::milliseconds timeout,
                                              FlightRecorder* recorder) {
  c10::intrusive_ptr<c10d::Store> owned =
      c10::intrusive_ptr<c10d::Store>::unsafe_reclaim_from_nonowning(store);
  std::vector<int> ranks(static_cast<size_t>(size));
  for (int i = 0; i < size; ++i) ranks[static_cast<size_t>(i)] = i;
  auto prefix = c10::make_intrusive<c10d::PrefixStore>("titan/group/world", owned);
  return std::make_unique<GlooCommunicator>("world", prefix, rank, size, std::move(ranks), timeout,
                                            recorder);
}

}  // namespace titan::dist

#else  // no Gloo headers in this LibTorch

namespace titan::dist {
bool gloo_available() {
  return false;
}
std::unique_ptr<Communicator> make_gloo_world(c10d::Store*, int, int, std::chrono::milliseconds,
                                              FlightRecorder*) {
  fail(
      "CPU multi-process training needs Gloo, which this LibTorch build lacks (pip wheels ship "
      "no Gloo headers); use CUDA devices (NCCL) or build against Debian's LibTorch");
}
}  // namespace titan::dist
#endif
