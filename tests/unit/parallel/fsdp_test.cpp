// FsdpModel's bound on how far the host runs ahead of the device, checked with a communicator
// that behaves like the NCCL one: wait() only orders later work (the host goes on and nothing
// completes), synchronize() blocks until the operation is done, and operations of one stream
// finish in issue order.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "titan/dist/communicator.h"
#include "titan/model/layout.h"
#include "titan/model/llama_args.h"
#include "titan/parallel/fsdp.h"

namespace {

using titan::dist::Communicator;
using titan::dist::P2POp;
using titan::dist::ReduceOp;
using titan::dist::Work;
using titan::dist::WorkPtr;

// One in-order stream: operation k done means every operation before it is done too.
struct Stream {
  int64_t issued = 0;
  int64_t done = 0;
  int64_t max_outstanding = 0;  // issued but not known done, right after an issue
};

class StreamWork : public Work {
 public:
  explicit StreamWork(Stream* s) : stream_(s), seq_(++s->issued) {}
  void wait() override {}  // orders device work only; the host does not block
  void synchronize() override { stream_->done = std::max(stream_->done, seq_); }
  bool completed() override { return stream_->done >= seq_; }

 private:
  Stream* stream_;
  int64_t seq_;
};

class StreamCommunicator : public Communicator {
 public:
  explicit StreamCommunicator(Stream* s) : Communicator("dp_shard", 0, 2, {0, 1}, nullptr), s_(s) {}
  std::string backend() const override { return "in-order stream"; }
  void abort() override {}
  std::unique_ptr<Communicator> split(const std::string&, int, int, std::vector<int>) override {
    return nullptr;
  }

 protected:
  WorkPtr issue() {
    auto w = std::make_shared<StreamWork>(s_);
    s_->max_outstanding = std::max(s_->max_outstanding, s_->issued - s_->done);
    return w;
  }
  WorkPtr do_all_reduce(const at::Tensor&, ReduceOp) override { return issue(); }
  WorkPtr do_all_gather(const at::Tensor&, const at::Tensor&) override { return issue(); }
  WorkPtr do_reduce_scatter(const at::Tensor&, const at::Tensor&, ReduceOp) override {
    return issue();
  }
  WorkPtr do_broadcast(const at::Tensor&, int) override { return issue(); }
  WorkPtr do_send_recv(const std::vector<P2POp>&) override { return issue(); }
  WorkPtr do_all_to_all(const at::Tensor&, const at::Tensor&) override { return issue(); }
  WorkPtr do_barrier() override { return issue(); }

 private:
  Stream* s_;
};

}  // namespace

TEST(FsdpRunAhead, HostNeverHasMoreThanTwoCollectivesOutstanding) {
  Stream stream;
  StreamCommunicator comm(&stream);
  const auto units = titan::model::llama_units(titan::model::llama_flavor("debugmodel"));
  const size_t n = units.size();
  ASSERT_GE(n, 4u);
  titan::parallel::FsdpModel fsdp(units, &comm, nullptr, c10::Device(c10::kCPU), {});
  fsdp.init_weights(0);
  for (int step = 0; step < 2; ++step) {
    // The order a stage issues a step in: forward with prefetch, backward in reverse.
    for (size_t i = 0; i < n; ++i) {
      fsdp.prefetch(i + 1);
      fsdp.gather(i);
      fsdp.release(i, /*after_forward=*/true);
    }
    for (size_t i = n; i-- > 0;) {
      if (i > 0) fsdp.prefetch(i - 1);
      fsdp.gather(i);
      bool accumulate = false;
      fsdp.full_grad(i, &accumulate);
      fsdp.reduce_grad(i, /*last_microbatch=*/true);
      fsdp.release(i, /*after_forward=*/false);
    }
    fsdp.finish_grad_reduction();
    fsdp.zero_grad();
  }
  // Every unit was gathered twice and reduced once per step: many more than the bound.
  EXPECT_GE(stream.issued, static_cast<int64_t>(4 * n));
  // Right after an issue at most the bound (2) plus the new operation are outstanding.
  EXPECT_LE(stream.max_outstanding, 3);
}
